// What every loader of the library does with a GGUF file before and after its own model's
// keys and tensors: open and check it (magic, header, no tensor past the end), choose the
// compute device, upload the declared weights, set CPU threads. Used by the vision engine
// (load.cpp) and the decoder (decoder/load.cpp).
#pragma once

#include "loader.h"
#include "model.h"

#include "ggml-backend.h"
#include "gguf.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mmv {

struct GgufDeleter {
    void operator()(gguf_context * g) const { gguf_free(g); }
};
using gguf_ptr = std::unique_ptr<gguf_context, GgufDeleter>;

// A GGUF opened with no_alloc: its header (`g`) and the tensor metadata context (`meta`).
struct GgufFile {
    std::string path;
    uint64_t size = 0;
    gguf_ptr g;
    context_ptr meta;
};

// Open `path` and check it; format/IO errors are thrown as mmv::Error.
GgufFile open_gguf(const std::string & path);

// "auto"/"" (the best GPU, else iGPU, else CPU), "cpu", or a device by name.
ggml_backend_dev_t pick_device(const char * device);

// Allocate `ctx_w`'s tensors on `dev` and fill them from the file (converting to f32 where
// a tensor was declared Store::F32); returns the weight buffer.
buffer_ptr upload_weights(const GgufFile & file, ggml_context * ctx_w, ggml_backend_dev_t dev,
                          const std::vector<WeightLoader::Pending> & pending);

// Set the thread count of a CPU backend (no-op for other devices or a null backend).
void set_cpu_threads(ggml_backend_t backend, int32_t n_threads);

// `requested` if positive, else the machine's hardware threads.
int32_t thread_count(int32_t requested);

}  // namespace mmv
