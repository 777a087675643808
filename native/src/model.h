// The in-memory vision model (mmv_model) shared by the loader and the graph builder.
#pragma once

#include "mmvision.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace mmv {

struct ClipLayer {
    ggml_tensor * ln1_w = nullptr;
    ggml_tensor * ln1_b = nullptr;
    ggml_tensor * q_w = nullptr;
    ggml_tensor * q_b = nullptr;
    ggml_tensor * k_w = nullptr;
    ggml_tensor * k_b = nullptr;
    ggml_tensor * v_w = nullptr;
    ggml_tensor * v_b = nullptr;
    ggml_tensor * o_w = nullptr;
    ggml_tensor * o_b = nullptr;
    ggml_tensor * ln2_w = nullptr;
    ggml_tensor * ln2_b = nullptr;
    ggml_tensor * fc1_w = nullptr;  // hidden -> n_ff (CLIP mlp.fc1)
    ggml_tensor * fc1_b = nullptr;
    ggml_tensor * fc2_w = nullptr;  // n_ff -> hidden (CLIP mlp.fc2)
    ggml_tensor * fc2_b = nullptr;
};

enum class Projector { Mlp, MlpNorm };

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

struct Hparams {
    Projector projector = Projector::Mlp;
    std::string projector_name;
    int32_t image_size = 0;
    int32_t patch_size = 0;
    int32_t n_embd = 0;        // ViT hidden width
    int32_t n_head = 0;
    int32_t n_ff = 0;
    int32_t n_layer_file = 0;  // clip.vision.block_count
    int32_t n_layer_run = 0;   // blocks run: the deepest feature layer
    std::vector<int32_t> feature_layers;  // hidden_states indices, ascending, each <= n_layer_run
    int32_t n_embd_out = 0;    // projector output width
    float eps = 1e-5f;
    float image_mean[3] = {0.f, 0.f, 0.f};
    float image_std[3] = {1.f, 1.f, 1.f};
    bool use_gelu = false;
    bool legacy_layout = false;
    bool ffn_swapped = false;
    bool fast_math = false;
    bool no_flash_attn = false;

    int32_t grid() const { return image_size / patch_size; }
    int32_t n_patches() const { return grid() * grid(); }
    int32_t n_pos() const { return n_patches() + 1; }  // class token + patches
    int32_t patch_k() const { return 3 * patch_size * patch_size; }
};

}  // namespace mmv

struct mmv_model {
    mmv::Hparams hp;

    // weights: matmul weights keep the file's type; everything used element-wise (norms,
    // biases, class/position embeddings) and the small patch kernel are stored as f32.
    mmv::context_ptr ctx_w;
    mmv::buffer_ptr buf_w;
    ggml_tensor * patch_w = nullptr;  // [3*p*p, hidden], f32
    ggml_tensor * patch_b = nullptr;
    ggml_tensor * class_embd = nullptr;
    ggml_tensor * pos_embd = nullptr;  // [hidden, n_pos]
    ggml_tensor * pre_ln_w = nullptr;
    ggml_tensor * pre_ln_b = nullptr;
    std::vector<mmv::ClipLayer> layers;  // n_layer_run of them
    // projector: mlp = mm.0, GELU, mm.2; mlp_norm = mm.0, LN(mm.1), GELU, mm.3, LN(mm.4)
    ggml_tensor * mm_a_w = nullptr;
    ggml_tensor * mm_a_b = nullptr;
    ggml_tensor * mm_norm1_w = nullptr;
    ggml_tensor * mm_norm1_b = nullptr;
    ggml_tensor * mm_b_w = nullptr;
    ggml_tensor * mm_b_b = nullptr;
    ggml_tensor * mm_norm2_w = nullptr;
    ggml_tensor * mm_norm2_b = nullptr;

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
mmv_status encode(mmv_model & model, const float * pixels, int32_t n_images, float * out);
// backend.cpp helpers
void apply_n_threads(mmv_model & model);
}  // namespace mmv
