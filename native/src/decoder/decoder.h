// The cross-attention decoder's in-memory model and context (internal, see mmdecoder.h).
//
// One core (context.cpp: KV cache, image slots, media mask, batches, the C ABI) and one file
// per architecture, each with its weight declarations, its decoder layers + gated block and
// the keys/values of an image for its blocks:
//   idefics.cpp       IDEFICS v1: Llama layers, IdeficsGatedCrossAttentionLayer before layer
//                     i when i % cross_layer_interval == 0 (docs/idefics-gguf.md)
//   openflamingo.cpp  OpenFlamingo: GPT-NeoX or MPT layers, open_flamingo's GatedCrossAttentionBlock
//                     before layer i when (i + 1) % cross_attn_every_n_layers == 0
//                     (docs/openflamingo-gguf.md)
// Where a block sits is the converter's business: blk.{i}.xattn_* tensors are the block run
// before layer i.
#pragma once

#include "../loader.h"
#include "../model.h"
#include "mmdecoder.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <cstdint>
#include <string>
#include <vector>

namespace mmd {

enum class Arch { Idefics, OpenFlamingo };
// OpenFlamingo's base LLM: GPT-NeoX (RedPajama-INCITE) or MPT (transformers' MptForCausalLM)
enum class Base { Llama, NeoX, Mpt };

// A decoder layer; the biases and norm biases are null where an architecture has none
// (Llama: RMS norms, no biases; GPT-NeoX: LayerNorms and biases everywhere, no gate).
struct Layer {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * attn_norm_b = nullptr;
    ggml_tensor * q = nullptr;
    ggml_tensor * k = nullptr;
    ggml_tensor * v = nullptr;
    ggml_tensor * o = nullptr;
    ggml_tensor * q_b = nullptr;
    ggml_tensor * k_b = nullptr;
    ggml_tensor * v_b = nullptr;
    ggml_tensor * o_b = nullptr;
    ggml_tensor * q_norm = nullptr;  // LayerNorm over the whole Q / K (MosaicGPT attn_qk_ln), or null
    ggml_tensor * q_norm_b = nullptr;
    ggml_tensor * k_norm = nullptr;
    ggml_tensor * k_norm_b = nullptr;
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_norm_b = nullptr;
    ggml_tensor * gate = nullptr;
    ggml_tensor * up = nullptr;
    ggml_tensor * down = nullptr;
    ggml_tensor * up_b = nullptr;
    ggml_tensor * down_b = nullptr;
    int32_t xblock = -1;  // the gated cross-attention block run before this layer, or -1
};

// A gated cross-attention block (IdeficsGatedCrossAttentionLayer; open_flamingo's
// GatedCrossAttentionBlock: LayerNorms with bias, no gate, exact GELU, inner width
// x_n_head * x_head_dim = 512).
struct XBlock {
    int32_t layer = 0;
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * attn_norm_b = nullptr;
    ggml_tensor * q = nullptr;  // [n_embd, inner]
    ggml_tensor * k = nullptr;  // [n_embd_image, inner]
    ggml_tensor * v = nullptr;
    ggml_tensor * o = nullptr;
    ggml_tensor * q_norm = nullptr;  // RMS weight [head_dim] or null
    ggml_tensor * k_norm = nullptr;
    ggml_tensor * alpha_attn = nullptr;  // [1] or [n_embd]; tanh applied in the graph
    ggml_tensor * alpha_ffn = nullptr;
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_norm_b = nullptr;
    ggml_tensor * gate = nullptr;
    ggml_tensor * up = nullptr;
    ggml_tensor * down = nullptr;
};

struct Hparams {
    Arch arch = Arch::Idefics;
    Base base = Base::Llama;
    int32_t n_vocab = 0, n_embd = 0, n_layer = 0, n_head = 0, n_head_kv = 0, head_dim = 0, n_ff = 0;
    int32_t n_ctx_train = 0, n_embd_image = 0;
    float rms_eps = 1e-6f;
    float rope_base = 10000.f;
    float rope_scale = 1.f;  // ggml freq_scale (1 / linear factor)
    int32_t rope_dim = 0;    // rotated dims per head (GPT-NeoX rotary_pct); head_dim for Llama
    bool parallel_residual = false;  // GPT-NeoX use_parallel_residual
    float alibi_max_bias = 0.f;      // > 0: ALiBi instead of rope (MPT alibi_bias_max)
    float clip_qkv = 0.f;            // > 0: QKV clamped to [-clip, clip] (MPT clip_qkv)
    float attn_scale = 0.f;          // self-attention scale; 0: 1/sqrt(head_dim)
    float logit_scale = 1.f;         // logits multiplied by it (MosaicGPT logit_scale)
    int32_t x_n_head = 0, x_head_dim = 0;  // the cross-attention's heads (inner width)
    int32_t n_embd_kv() const { return n_head_kv * head_dim; }
    int32_t n_embd_x() const { return x_n_head * x_head_dim; }
};

}  // namespace mmd

struct mmd_model {
    mmd::Hparams hp;
    ggml_tensor * tok_embd = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output_norm_b = nullptr;  // LayerNorm bias (GPT-NeoX), or null: RMS norm
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
    std::vector<ggml_tensor *> xk_cache, xv_cache; // per block [n_embd_x, n_image_slots * n_image_rows]
    std::vector<uint8_t> slot_used;

    std::vector<Seq> seqs;
    std::vector<float> logits;       // n_vocab per token of the last batch that computed logits
    std::vector<int32_t> logits_row;  // per token of the last batch: its row in logits, or -1
};

namespace mmd {
void apply_n_threads(ggml_backend_t backend, int32_t n_threads);

// The tokens of one sequence in a batch (contiguous: the core groups a batch by sequence) and
// the cells they attend: n_kv cells of the cache from cell0 on (the sequence's 0..top).
struct SeqSpan {
    int64_t tok0 = 0, n_tok = 0, cell0 = 0, n_kv = 0;
    ggml_tensor * mask = nullptr;  // [n_kv, n_tok] causal mask over those cells
};

// The inputs of one decoder step (one batch of tokens of one or several sequences), set by the
// core.
struct StepInputs {
    ggml_tensor * pos = nullptr;     // [NT] i32
    ggml_tensor * kv_idx = nullptr;  // [NT] i64 cells the batch writes
    std::vector<SeqSpan> spans;      // per sequence of the batch, in token order
    ggml_tensor * x_rows = nullptr;  // [n_xrows] image rows (slot rows) the batch sees, or null
    ggml_tensor * x_mask = nullptr;  // [n_xrows, NT] each token sees its own sequence's image's rows only
    ggml_tensor * x_gate = nullptr;  // [1, NT] 0 for a token without an image, else 1
    int64_t n_tokens = 0, n_xrows = 0;
};

// --- shared graph pieces (context.cpp) ---
// RMS norm (b == nullptr) or LayerNorm (with bias b) times w.
ggml_tensor * norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps);
// x W^T (+ b)
ggml_tensor * lin(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b);
// Causal self-attention of layer il: roped q [DH, NH, NT], k [DH, NKV, NT], v [EKV, NT] are
// written into the cache at the batch's cells, then each sequence's tokens attend to that
// sequence's cells; returns [DH * NH, NT] (before the output projection).
ggml_tensor * self_attention(ggml_context * ctx, mmd_context & c, int32_t il, ggml_tensor * q, ggml_tensor * k,
                             ggml_tensor * v, const StepInputs & in);
// Cross-attention of block xb for q [inner, NT] over the image rows each token sees, zero for
// tokens without one; returns [inner, NT] (before the output projection). Only when n_xrows > 0.
ggml_tensor * cross_attention(ggml_context * ctx, mmd_context & c, int32_t xb, ggml_tensor * q, const StepInputs & in);

// --- per architecture ---
// The weights (the tensors and keys after the architecture check).
void load_idefics(mmv::WeightLoader & w, mmd_model & m, const std::string & path);
void load_openflamingo(mmv::WeightLoader & w, mmd_model & m, const std::string & path);
// Embeddings -> the last layer's output (before the final norm).
ggml_tensor * idefics_layers(ggml_context * ctx, mmd_context & c, ggml_tensor * x, const StepInputs & in);
ggml_tensor * openflamingo_layers(ggml_context * ctx, mmd_context & c, ggml_tensor * x, const StepInputs & in);
// Keys and values [inner, n_rows] of image rows [n_embd_image, n_rows] for block xb.
void idefics_image_kv(ggml_context * ctx, const mmd_model & m, size_t xb, ggml_tensor * rows, ggml_tensor ** k,
                      ggml_tensor ** v);
void openflamingo_image_kv(ggml_context * ctx, const mmd_model & m, size_t xb, ggml_tensor * rows, ggml_tensor ** k,
                           ggml_tensor ** v);
}  // namespace mmd
