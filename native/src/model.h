// The in-memory vision model (mmv_model): common engine state + the family that runs it.
#pragma once

#include "family.h"
#include "mmvision.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace mmv {

struct ContextDeleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};
struct BufferDeleter {
    void operator()(ggml_backend_buffer * b) const { ggml_backend_buffer_free(b); }
};
struct BackendDeleter {
    void operator()(ggml_backend * b) const { ggml_backend_free(b); }
};
struct SchedDeleter {
    void operator()(ggml_backend_sched * s) const { ggml_backend_sched_free(s); }
};

using context_ptr = std::unique_ptr<ggml_context, ContextDeleter>;
using buffer_ptr = std::unique_ptr<ggml_backend_buffer, BufferDeleter>;
using backend_ptr = std::unique_ptr<ggml_backend, BackendDeleter>;
using sched_ptr = std::unique_ptr<ggml_backend_sched, SchedDeleter>;

}  // namespace mmv

struct mmv_model {
    mmv::Hparams hp;
    std::unique_ptr<mmv::Family> family;

    // weights: matmul weights keep the file's type; everything used element-wise (norms,
    // biases, embeddings) and the small patch kernel are stored as f32.
    mmv::context_ptr ctx_w;
    mmv::buffer_ptr buf_w;

    // compute
    ggml_backend_dev_t device = nullptr;
    std::string device_name;
    mmv::backend_ptr backend;      // the device's backend (may be the CPU one)
    mmv::backend_ptr backend_cpu;  // CPU fallback when the device is not the CPU
    mmv::sched_ptr sched;
    int32_t n_threads = 1;
    int32_t max_batch = 1;
    bool flash_attn = false;  // decided by build_and_reserve
    size_t graph_size = 0;
    std::vector<uint8_t> graph_meta;  // scratch memory for graph-building contexts
    std::vector<float> patches;       // host im2col scratch

    std::mutex mutex;
};

namespace mmv {
// graph.cpp
mmv_status build_and_reserve(mmv_model & model);
// text: token ids shared by every image (n_text > 0 only for families with text input)
mmv_status encode(mmv_model & model, const float * pixels, int32_t n_images, const int32_t * text, int32_t n_text,
                  float * out);
// load.cpp
void apply_n_threads(mmv_model & model);
}  // namespace mmv
