// The cross-attention decoder's in-memory model and context (internal, see mmdecoder.h).
#pragma once

#include "../model.h"
#include "mmdecoder.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <string>
#include <vector>

namespace mmd {

struct Layer {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * q = nullptr;
    ggml_tensor * k = nullptr;
    ggml_tensor * v = nullptr;
    ggml_tensor * o = nullptr;
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * gate = nullptr;
    ggml_tensor * up = nullptr;
    ggml_tensor * down = nullptr;
    int32_t xblock = -1;  // the gated cross-attention block run before this layer, or -1
};

// IdeficsGatedCrossAttentionLayer
struct XBlock {
    int32_t layer = 0;
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * q = nullptr;  // [n_embd, n_embd]
    ggml_tensor * k = nullptr;  // [n_embd_image, n_embd]
    ggml_tensor * v = nullptr;
    ggml_tensor * o = nullptr;
    ggml_tensor * q_norm = nullptr;  // RMS weight [head_dim] or null
    ggml_tensor * k_norm = nullptr;
    ggml_tensor * alpha_attn = nullptr;  // [1] or [n_embd]; tanh applied in the graph
    ggml_tensor * alpha_ffn = nullptr;
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * gate = nullptr;
    ggml_tensor * up = nullptr;
    ggml_tensor * down = nullptr;
};

struct Hparams {
    int32_t n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0;
    int32_t n_ctx_train = 0, n_embd_image = 0;
    float rms_eps = 1e-6f;
    float rope_base = 10000.f;
    float rope_scale = 1.f;  // ggml freq_scale (1 / linear factor)
    int32_t n_embd_kv() const { return n_head_kv * head_dim; }
};

}  // namespace mmd

struct mmd_model {
    mmd::Hparams hp;
    ggml_tensor * tok_embd = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;
    std::vector<mmd::Layer> layers;
    std::vector<mmd::XBlock> xblocks;

    mmv::context_ptr ctx_w;
    mmv::buffer_ptr buf_w;
    ggml_backend_dev_t device = nullptr;
    std::string device_name;
    int32_t n_threads = 1;
};

struct mmd_context {
    struct Image {
        int32_t pos = 0;
        int32_t slot = 0;
        int32_t n_rows = 0;
    };
    struct Seq {
        std::vector<uint8_t> used;  // per position
        std::vector<Image> images;  // ascending pos
        std::vector<int32_t> eos;   // positions of end-of-sequence tokens, ascending
    };

    mmd_model * model = nullptr;
    mmd_context_params params{};
    mmv::backend_ptr backend;
    mmv::backend_ptr backend_cpu;
    mmv::sched_ptr sched;
    size_t graph_size = 0;
    std::vector<uint8_t> graph_meta;

    mmv::context_ptr ctx_kv;
    mmv::buffer_ptr buf_kv;
    std::vector<ggml_tensor *> k_cache, v_cache;   // per layer [n_embd_kv, n_ctx * n_seq]
    std::vector<ggml_tensor *> xk_cache, xv_cache; // per block [n_embd, n_image_slots * n_image_rows]
    std::vector<uint8_t> slot_used;

    std::vector<Seq> seqs;
    std::vector<float> logits;
    bool has_logits = false;
};

namespace mmd {
void apply_n_threads(ggml_backend_t backend, int32_t n_threads);
}
