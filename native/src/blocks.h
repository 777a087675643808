// Building blocks shared by every family's graph: norms, linear layers, activations,
// multi-head attention, ViT patch/position embedding and the host-side im2col.
//
// Layout convention (ggml ne order, innermost first): activations are [width, n_rows, batch].
#pragma once

#include "ggml.h"

#include <cstdint>

namespace mmv {

// Arithmetic switches that every block honours (from the load flags).
struct Arith {
    bool fast_math = false;   // ggml's f16-table/tanh activations, f16 K/V in attention
    bool flash_attn = false;  // use the fused attention op (decided per device at load)
    bool host_kernels = false;  // the graph runs on the CPU backend of an AVX-512 CPU: f16 linear
                                // layers, attention and exact GELU through host_kernels.h
};

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps);
// The same, in one host pass where `ar` allows it and the operands fit.
ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps,
                         const Arith & ar);
ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b);
// The same, through the host f16 kernel where `ar` allows it and the operands fit.
ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, const Arith & ar);

// quick-GELU x * sigmoid(1.702 x) (CLIP), exact in f32 unless fast.
ggml_tensor * quick_gelu(ggml_context * ctx, ggml_tensor * x, bool fast);
// Exact GELU (erf), as torch.nn.GELU() / transformers' "gelu"; tanh approximation if fast.
ggml_tensor * gelu(ggml_context * ctx, ggml_tensor * x, bool fast);
// The same honouring all of `ar` (fast_math, host_kernels).
ggml_tensor * gelu(ggml_context * ctx, ggml_tensor * x, const Arith & ar);

// Scaled dot-product attention over already projected q [H, Nq, B] and k, v [H, Nk, B]
// with n_head heads (H = n_head * head_dim), no mask. Returns [H, Nq, B].
ggml_tensor * attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, int64_t n_head,
                        const Arith & ar);

// Weights of one linear layer / one LayerNorm.
struct Linear {
    ggml_tensor * w = nullptr;
    ggml_tensor * b = nullptr;
};
struct Norm {
    ggml_tensor * w = nullptr;
    ggml_tensor * b = nullptr;
};
inline ggml_tensor * apply(ggml_context * ctx, const Linear & l, ggml_tensor * x) { return linear(ctx, x, l.w, l.b); }
inline ggml_tensor * apply(ggml_context * ctx, const Linear & l, ggml_tensor * x, const Arith & ar) {
    return linear(ctx, x, l.w, l.b, ar);
}
inline ggml_tensor * apply(ggml_context * ctx, const Norm & n, ggml_tensor * x, float eps) {
    return layer_norm(ctx, x, n.w, n.b, eps);
}
inline ggml_tensor * apply(ggml_context * ctx, const Norm & n, ggml_tensor * x, float eps, const Arith & ar) {
    return layer_norm(ctx, x, n.w, n.b, eps, ar);
}

// Multi-head attention with separate q/k/v/out projections (CLIP, EVA, BERT all share it);
// kv_src = nullptr means self-attention.
struct AttnWeights {
    Linear q, k, v, o;
};
ggml_tensor * mha(ggml_context * ctx, const AttnWeights & a, ggml_tensor * x, ggml_tensor * kv_src, int64_t n_head,
                  const Arith & ar);

// ViT input: patch embedding of the host-im2col'd patches [3*p*p, n_patches, B] (a stride-p
// convolution = one matmul), class token first, then learned positions [H, 1 + n_patches].
struct VitEmbedWeights {
    ggml_tensor * patch_w = nullptr;  // ggml ne [p, p, 3, H], f32
    ggml_tensor * patch_b = nullptr;  // [H] or null
    ggml_tensor * class_embd = nullptr;  // [H]
    ggml_tensor * pos_embd = nullptr;    // [H, 1 + n_patches]
};
ggml_tensor * vit_embed(ggml_context * ctx, const VitEmbedWeights & w, ggml_tensor * patches, int64_t hidden);

// One pre-LN transformer block as CLIP and EVA write it:
//   x += o(attn(LN1(x))); x += fc2(act(fc1(LN2(x))))
struct PreLnBlock {
    Norm ln1, ln2;
    AttnWeights attn;
    Linear fc1, fc2;  // hidden -> n_ff -> hidden
};
enum class Act { QuickGelu, Gelu };
ggml_tensor * pre_ln_block(ggml_context * ctx, const PreLnBlock & blk, ggml_tensor * x, int64_t n_head, float eps,
                           Act act, const Arith & ar);

// im2col on the host: CHW pixels of one square image (side S, patch P) ->
// [n_patches][3*P*P] rows (k = kx + P*(ky + P*c)), the layout of the patches input tensor.
void im2col(int32_t image_size, int32_t patch_size, const float * chw, float * dst);

}  // namespace mmv
