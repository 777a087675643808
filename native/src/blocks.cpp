// Building blocks shared by every family's graph (see blocks.h).
#include "blocks.h"

#include "host_kernels.h"

#include <cmath>
#include <cstring>

namespace mmv {

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    x = ggml_norm(ctx, x, eps);
    if (w) x = ggml_mul(ctx, x, w);
    if (b) x = ggml_add(ctx, x, b);
    return x;
}

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps,
                         const Arith & ar) {
    if (ar.host_kernels) {
        if (ggml_tensor * y = host_layer_norm(ctx, x, w, b, eps)) return y;
    }
    return layer_norm(ctx, x, w, b, eps);
}

ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    x = ggml_mul_mat(ctx, w, x);
    if (b) x = ggml_add(ctx, x, b);
    return x;
}

ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, const Arith & ar) {
    if (ar.host_kernels) {
        if (ggml_tensor * y = host_linear(ctx, x, w, b)) return y;
    }
    return linear(ctx, x, w, b);
}

// quick-GELU written as silu(1.702 x) / 1.702: ggml's silu is computed in f32 (vectorised),
// whereas its gelu_quick goes through an f16 lookup table on the CPU.
ggml_tensor * quick_gelu(ggml_context * ctx, ggml_tensor * x, bool fast) {
    if (fast) return ggml_gelu_quick(ctx, x);
    const float a = 1.702f;
    return ggml_scale(ctx, ggml_silu(ctx, ggml_scale(ctx, x, a)), 1.0f / a);
}

ggml_tensor * gelu(ggml_context * ctx, ggml_tensor * x, bool fast) {
    return fast ? ggml_gelu(ctx, x) : ggml_gelu_erf(ctx, x);
}

ggml_tensor * gelu(ggml_context * ctx, ggml_tensor * x, const Arith & ar) {
    if (ar.host_kernels && !ar.fast_math) {
        if (ggml_tensor * y = host_gelu_erf(ctx, x)) return y;
    }
    return gelu(ctx, x, ar.fast_math);
}

ggml_tensor * attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, int64_t n_head,
                        const Arith & ar) {
    if (ar.host_kernels) {
        if (ggml_tensor * y = host_attention(ctx, q, k, v, n_head)) return y;
    }
    const int64_t H = q->ne[0], NQ = q->ne[1], NK = k->ne[1], B = q->ne[2];
    const int64_t DH = H / n_head;
    const float kq_scale = 1.0f / std::sqrt(static_cast<float>(DH));
    q = ggml_permute(ctx, ggml_reshape_4d(ctx, q, DH, n_head, NQ, B), 0, 2, 1, 3);  // [DH, NQ, NH, B]
    k = ggml_permute(ctx, ggml_reshape_4d(ctx, k, DH, n_head, NK, B), 0, 2, 1, 3);  // [DH, NK, NH, B]
    if (ar.flash_attn) {
        // fused attention on f32 K/V (exact; the CPU kernel avoids materialising KQ)
        ggml_tensor * vf = ggml_permute(ctx, ggml_reshape_4d(ctx, v, DH, n_head, NK, B), 0, 2, 1, 3);
        if (ar.fast_math) {  // f16 K/V, as mtmd
            k = ggml_cast(ctx, k, GGML_TYPE_F16);
            vf = ggml_cast(ctx, vf, GGML_TYPE_F16);
        }
        ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, vf, nullptr, kq_scale, 0.0f, 0.0f);
        ggml_prec_set_acc(fa, GGML_PREC_F32);
        return ggml_reshape_3d(ctx, fa, H, NQ, B);  // fa: [DH, NH, NQ, B]
    }
    ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_4d(ctx, v, DH, n_head, NK, B), 1, 2, 0, 3));
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q);  // [NK, NQ, NH, B]
    kq = ggml_soft_max_ext(ctx, kq, nullptr, kq_scale, 0.0f);
    ggml_tensor * kqv = ggml_mul_mat(ctx, vt, kq);  // [DH, NQ, NH, B]
    kqv = ggml_permute(ctx, kqv, 0, 2, 1, 3);       // [DH, NH, NQ, B]
    return ggml_cont_3d(ctx, kqv, H, NQ, B);
}

ggml_tensor * mha(ggml_context * ctx, const AttnWeights & a, ggml_tensor * x, ggml_tensor * kv_src, int64_t n_head,
                  const Arith & ar) {
    ggml_tensor * src = kv_src ? kv_src : x;
    ggml_tensor * q = apply(ctx, a.q, x, ar);
    ggml_tensor * k = apply(ctx, a.k, src, ar);
    ggml_tensor * v = apply(ctx, a.v, src, ar);
    return apply(ctx, a.o, attention(ctx, q, k, v, n_head, ar), ar);
}

ggml_tensor * vit_embed(ggml_context * ctx, const VitEmbedWeights & w, ggml_tensor * patches, int64_t hidden) {
    const int64_t B = patches->ne[2];
    ggml_tensor * kernel = ggml_reshape_2d(ctx, w.patch_w, patches->ne[0], hidden);
    ggml_tensor * x = linear(ctx, patches, kernel, w.patch_b);  // [H, NP, B]
    ggml_tensor * cls = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, w.class_embd, hidden, 1, 1), hidden, 1, B, 1);
    x = ggml_concat(ctx, cls, x, 1);  // [H, 1 + NP, B]: class token first
    return ggml_add(ctx, x, w.pos_embd);
}

ggml_tensor * pre_ln_block(ggml_context * ctx, const PreLnBlock & blk, ggml_tensor * x, int64_t n_head, float eps,
                           Act act, const Arith & ar) {
    ggml_tensor * cur = apply(ctx, blk.ln1, x, eps, ar);
    x = ggml_add(ctx, x, mha(ctx, blk.attn, cur, nullptr, n_head, ar));
    cur = apply(ctx, blk.ln2, x, eps, ar);
    cur = apply(ctx, blk.fc1, cur, ar);
    cur = act == Act::Gelu ? gelu(ctx, cur, ar) : quick_gelu(ctx, cur, ar.fast_math);
    cur = apply(ctx, blk.fc2, cur, ar);
    return ggml_add(ctx, x, cur);
}

void im2col(int32_t image_size, int32_t patch_size, const float * chw, float * dst) {
    const int S = image_size, P = patch_size, G = image_size / patch_size;
    const size_t K = 3ull * static_cast<size_t>(P) * static_cast<size_t>(P);
    for (int py = 0; py < G; ++py) {
        for (int px = 0; px < G; ++px) {
            float * row = dst + static_cast<size_t>(py * G + px) * K;
            for (int c = 0; c < 3; ++c) {
                for (int ky = 0; ky < P; ++ky) {
                    const float * src = chw + (static_cast<size_t>(c) * S + static_cast<size_t>(py * P + ky)) * S +
                                        static_cast<size_t>(px * P);
                    std::memcpy(row + static_cast<size_t>(P) * (ky + static_cast<size_t>(P) * c), src,
                                sizeof(float) * static_cast<size_t>(P));
                }
            }
        }
    }
}

}  // namespace mmv
