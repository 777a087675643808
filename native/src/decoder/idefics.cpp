// IDEFICS v1 (docs/idefics-gguf.md): Llama decoder layers with the
// IdeficsGatedCrossAttentionLayer before layer i when i % cross_layer_interval == 0.
//
// One decoder step for a batch of tokens of one sequence (transformers' IdeficsModel):
//   for each layer l:
//     if a gated block sits before l:
//       h = RMS(x) q = Wq h (per-head RMS q-norm); K/V of the image each token sees
//       a = softmax(q K^T / sqrt(d) + media mask) V; a *= token_has_image (0/1); a = Wo a
//       x += tanh(alpha_attn) * a
//       x += tanh(alpha_ffn) * down(silu(gate(RMS(x))) * up(RMS(x)))
//     x += Wo attn(rope(Wq RMS(x)), rope(Wk RMS(x)), Wv RMS(x))   (causal over the sequence)
//     x += down(silu(gate(RMS(x))) * up(RMS(x)))
// The converter stores Q/K of the self-attention in llama.cpp's interleaved rope order, so
// ggml's normal rope mode is the rotate-half rope of transformers.
#include "../internal.h"
#include "decoder.h"

#include <cmath>

namespace mmd {
namespace {

using mmv::format_error;
using mmv::Store;

ggml_tensor * swiglu(ggml_context * ctx, ggml_tensor * x, ggml_tensor * gate, ggml_tensor * up, ggml_tensor * down) {
    ggml_tensor * g = ggml_silu(ctx, ggml_mul_mat(ctx, gate, x));
    return ggml_mul_mat(ctx, down, ggml_mul(ctx, g, ggml_mul_mat(ctx, up, x)));
}

}  // namespace

void load_idefics(mmv::WeightLoader & w, mmd_model & m, const std::string & path) {
    Hparams & hp = m.hp;
    hp.arch = Arch::Idefics;
    hp.n_embd = w.get_int_in("llama.embedding_length", 1, 1 << 17);
    hp.n_layer = w.get_int_in("llama.block_count", 1, 4096);
    hp.n_ff = w.get_int_in("llama.feed_forward_length", 1, 1 << 20);
    hp.n_head = w.get_int_in("llama.attention.head_count", 1, 4096);
    hp.n_head_kv = static_cast<int32_t>(w.get_int("llama.attention.head_count_kv", hp.n_head));
    hp.n_ctx_train = static_cast<int32_t>(w.get_int("llama.context_length", 2048));
    hp.rms_eps = static_cast<float>(w.get_float("llama.attention.layer_norm_rms_epsilon", 1e-6));
    hp.rope_base = static_cast<float>(w.get_float("llama.rope.freq_base", 10000.0));
    const double factor = w.get_float("llama.rope.scaling.factor", 1.0);
    hp.rope_scale = factor > 0 ? static_cast<float>(1.0 / factor) : 1.f;
    if (hp.n_head_kv <= 0 || hp.n_head % hp.n_head_kv != 0) format_error("head_count_kv does not divide head_count");
    hp.head_dim = static_cast<int32_t>(w.get_int("llama.attention.key_length", hp.n_embd / hp.n_head));
    if (hp.head_dim * hp.n_head != hp.n_embd || hp.head_dim % 2) {
        mmv::unsupported("attention heads of " + std::to_string(hp.head_dim) + " do not tile the width " +
                         std::to_string(hp.n_embd));
    }
    if (!(hp.rms_eps > 0.f) || !std::isfinite(hp.rms_eps)) format_error("layer_norm_rms_epsilon is not positive");
    hp.rope_dim = hp.head_dim;
    hp.x_n_head = hp.n_head;
    hp.x_head_dim = hp.head_dim;

    std::vector<int64_t> emb = w.shape_of("token_embd.weight");
    if (emb.size() != 2 || emb[0] != hp.n_embd) format_error(path + ": missing or malformed token_embd.weight");
    hp.n_vocab = static_cast<int32_t>(emb[1]);
    const int64_t E = hp.n_embd, EKV = hp.n_embd_kv(), F = hp.n_ff, V = hp.n_vocab;
    m.tok_embd = w.declare("token_embd.weight", {E, V}, true, Store::AsIs);
    m.output_norm = w.declare("output_norm.weight", {E}, true, Store::F32);
    m.output = w.declare("output.weight", {E, V}, true, Store::AsIs);
    if (!w.has_tensor("blk.0.xattn_q.weight")) {
        format_error(path + " has no gated cross-attention blocks (blk.N.xattn_*): it is a plain Llama "
                            "model, run it with llama.cpp");
    }
    m.layers.resize(static_cast<size_t>(hp.n_layer));
    for (int32_t il = 0; il < hp.n_layer; ++il) {
        Layer & L = m.layers[static_cast<size_t>(il)];
        const std::string p = "blk." + std::to_string(il) + ".";
        L.attn_norm = w.declare(p + "attn_norm.weight", {E}, true, Store::F32);
        L.q = w.declare(p + "attn_q.weight", {E, E}, true, Store::AsIs);
        L.k = w.declare(p + "attn_k.weight", {E, EKV}, true, Store::AsIs);
        L.v = w.declare(p + "attn_v.weight", {E, EKV}, true, Store::AsIs);
        L.o = w.declare(p + "attn_output.weight", {E, E}, true, Store::AsIs);
        L.ffn_norm = w.declare(p + "ffn_norm.weight", {E}, true, Store::F32);
        L.gate = w.declare(p + "ffn_gate.weight", {E, F}, true, Store::AsIs);
        L.up = w.declare(p + "ffn_up.weight", {E, F}, true, Store::AsIs);
        L.down = w.declare(p + "ffn_down.weight", {F, E}, true, Store::AsIs);
        if (!w.has_tensor(p + "xattn_q.weight")) continue;
        std::vector<int64_t> ks = w.shape_of(p + "xattn_k.weight");
        if (ks.size() != 2 || ks[1] != E) format_error(path + ": malformed " + p + "xattn_k.weight");
        if (hp.n_embd_image == 0) hp.n_embd_image = static_cast<int32_t>(ks[0]);
        if (ks[0] != hp.n_embd_image) format_error(path + ": cross-attention blocks read different image widths");
        const int64_t D = hp.n_embd_image;
        XBlock x;
        x.layer = il;
        x.attn_norm = w.declare(p + "xattn_norm.weight", {E}, true, Store::F32);
        x.q = w.declare(p + "xattn_q.weight", {E, E}, true, Store::AsIs);
        x.k = w.declare(p + "xattn_k.weight", {D, E}, true, Store::AsIs);
        x.v = w.declare(p + "xattn_v.weight", {D, E}, true, Store::AsIs);
        x.o = w.declare(p + "xattn_out.weight", {E, E}, true, Store::AsIs);
        x.q_norm = w.declare(p + "xattn_q_norm.weight", {hp.head_dim}, false, Store::F32);
        x.k_norm = w.declare(p + "xattn_k_norm.weight", {hp.head_dim}, false, Store::F32);
        if ((x.q_norm == nullptr) != (x.k_norm == nullptr)) format_error(path + ": only one of the qk norms in " + p);
        for (auto [name, dst] : {std::pair<const char *, ggml_tensor **>{"xattn_alpha", &x.alpha_attn},
                                 std::pair<const char *, ggml_tensor **>{"xffn_alpha", &x.alpha_ffn}}) {
            std::vector<int64_t> s = w.shape_of(p + name);
            if (s.empty() || (s[0] != 1 && s[0] != E) || s.size() > 1) {
                format_error(path + ": missing or malformed " + p + name + " (1 or " + std::to_string(E) + " values)");
            }
            *dst = w.declare(p + name, {s[0]}, true, Store::F32);
        }
        x.ffn_norm = w.declare(p + "xffn_norm.weight", {E}, true, Store::F32);
        x.gate = w.declare(p + "xffn_gate.weight", {E, F}, true, Store::AsIs);
        x.up = w.declare(p + "xffn_up.weight", {E, F}, true, Store::AsIs);
        x.down = w.declare(p + "xffn_down.weight", {F, E}, true, Store::AsIs);
        L.xblock = static_cast<int32_t>(m.xblocks.size());
        m.xblocks.push_back(x);
    }
}

ggml_tensor * idefics_layers(ggml_context * ctx, mmd_context & c, ggml_tensor * x, const StepInputs & in) {
    const mmd_model & m = *c.model;
    const Hparams & hp = m.hp;
    const int64_t NT = in.n_tokens, DH = hp.head_dim, NH = hp.n_head, NHKV = hp.n_head_kv;
    const float eps = hp.rms_eps;
    for (int32_t il = 0; il < hp.n_layer; ++il) {
        const Layer & L = m.layers[static_cast<size_t>(il)];
        if (L.xblock >= 0) {
            const XBlock & X = m.xblocks[static_cast<size_t>(L.xblock)];
            if (in.n_xrows > 0) {
                ggml_tensor * q = ggml_mul_mat(ctx, X.q, norm(ctx, x, X.attn_norm, nullptr, eps));
                if (X.q_norm) {
                    q = norm(ctx, ggml_reshape_3d(ctx, q, DH, NH, NT), X.q_norm, nullptr, eps);
                    q = ggml_reshape_2d(ctx, q, DH * NH, NT);
                }
                ggml_tensor * a = ggml_mul_mat(ctx, X.o, cross_attention(ctx, c, L.xblock, q, in));
                x = ggml_add(ctx, x, ggml_mul(ctx, a, ggml_tanh(ctx, X.alpha_attn)));
            }
            ggml_tensor * f = swiglu(ctx, norm(ctx, x, X.ffn_norm, nullptr, eps), X.gate, X.up, X.down);
            x = ggml_add(ctx, x, ggml_mul(ctx, f, ggml_tanh(ctx, X.alpha_ffn)));
        }
        ggml_tensor * h = norm(ctx, x, L.attn_norm, nullptr, eps);
        ggml_tensor * q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.q, h), DH, NH, NT);
        ggml_tensor * k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.k, h), DH, NHKV, NT);
        ggml_tensor * v = ggml_mul_mat(ctx, L.v, h);  // [EKV, NT]
        q = ggml_rope_ext(ctx, q, in.pos, nullptr, static_cast<int>(DH), 0, hp.n_ctx_train, hp.rope_base, hp.rope_scale,
                          0.0f, 1.0f, 32.0f, 1.0f);
        k = ggml_rope_ext(ctx, k, in.pos, nullptr, static_cast<int>(DH), 0, hp.n_ctx_train, hp.rope_base, hp.rope_scale,
                          0.0f, 1.0f, 32.0f, 1.0f);
        x = ggml_add(ctx, x, ggml_mul_mat(ctx, L.o, self_attention(ctx, c, il, q, k, v, in)));
        x = ggml_add(ctx, x, swiglu(ctx, norm(ctx, x, L.ffn_norm, nullptr, eps), L.gate, L.up, L.down));
    }
    return x;
}

void idefics_image_kv(ggml_context * ctx, const mmd_model & m, size_t xb, ggml_tensor * rows, ggml_tensor ** k,
                      ggml_tensor ** v) {
    const Hparams & hp = m.hp;
    const XBlock & X = m.xblocks[xb];
    const int64_t n_rows = rows->ne[1], E = hp.n_embd_x();
    *k = ggml_mul_mat(ctx, X.k, rows);  // [E, n_rows]
    if (X.k_norm) {
        ggml_tensor * k3 = ggml_reshape_3d(ctx, *k, hp.x_head_dim, hp.x_n_head, n_rows);
        *k = ggml_reshape_2d(ctx, norm(ctx, k3, X.k_norm, nullptr, hp.rms_eps), E, n_rows);
    }
    *v = ggml_mul_mat(ctx, X.v, rows);
}

}  // namespace mmd
