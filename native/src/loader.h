// Reading a GGUF for a family: typed keys that never trip gguf's assertions, and tensor
// declarations with shape checks (the weights are uploaded by the engine afterwards).
#pragma once

#include "blocks.h"
#include "internal.h"
#include "mmvision.h"

#include "ggml.h"
#include "gguf.h"

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mmv {

[[noreturn]] void format_error(const std::string & m);
[[noreturn]] void unsupported(const std::string & m);

// How a tensor is kept on the device.
enum class Store { AsIs, F32 };

class WeightLoader {
  public:
    WeightLoader(const std::string & path, gguf_context * g, ggml_context * meta, ggml_context * weights)
        : path_(path), g_(g), meta_(meta), w_(weights) {}

    const std::string & path() const { return path_; }

    // keys
    bool has(const char * key) const;
    int64_t get_int(const char * key) const;
    int64_t get_int(const char * key, int64_t fallback) const;
    // an integer key in [lo, hi] (format error otherwise)
    int32_t get_int_in(const char * key, int64_t lo, int64_t hi) const;
    double get_float(const char * key, double fallback) const;
    bool get_bool(const char * key, bool fallback) const;
    std::string get_str(const char * key, const std::string & fallback) const;
    std::vector<double> get_float_array(const char * key) const;
    // image_mean / image_std (3 values each, defaults when absent) into hp-style arrays
    void image_norm(float mean[3], float stdv[3], const double def_mean[3], const double def_std[3]) const;

    // tensors
    bool has_tensor(const std::string & name) const;
    // shape of a tensor in the file (ggml ne order, trailing 1s dropped), or empty if absent
    std::vector<int64_t> shape_of(const std::string & name) const;
    ggml_type type_of(const std::string & name) const;
    // Declare a tensor of shape ne (ggml order); null when optional and absent.
    ggml_tensor * declare(const std::string & name, const std::vector<int64_t> & ne, bool required, Store store);
    // A matmul weight [in, out] kept in the file's type, with an f32 bias [out].
    Linear linear(const std::string & prefix, int64_t in, int64_t out, bool bias_required);
    Norm norm(const std::string & prefix, int64_t n, bool required);

    struct Pending {
        ggml_tensor * dst;
        int64_t gguf_id;
        Store store;
    };
    const std::vector<Pending> & pending() const { return pending_; }

  private:
    int64_t require_key(const char * key) const;
    int64_t find(const std::string & name, const std::vector<int64_t> & ne, bool required) const;

    std::string path_;
    gguf_context * g_;
    ggml_context * meta_;
    ggml_context * w_;
    std::vector<Pending> pending_;
};

}  // namespace mmv
