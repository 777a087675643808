// OpenFlamingo (docs/openflamingo-gguf.md): GPT-NeoX decoder layers (RedPajama-INCITE) with
// open_flamingo's GatedCrossAttentionBlock before layer i when (i + 1) % every_n == 0 (the
// converter places blk.{i}.xattn_*).
//
// One decoder step (open_flamingo FlamingoLayer over transformers' GPTNeoXLayer):
//   for each layer l:
//     if a gated block sits before l (GatedCrossAttentionBlock, LayerNorm eps 1e-5):
//       q = Wq LN(x)                                   (8 heads of 64: inner width 512)
//       a = softmax(q K^T / sqrt(64) + media mask) V; zero for tokens before any image
//       x += tanh(attn_gate) * Wo a
//       x += tanh(ff_gate) * W2 gelu(W1 LN(x))          (exact GELU, no biases)
//     h1 = LN1(x), h2 = LN2(x)   (LayerNorms with bias, eps layer_norm_eps)
//     a  = Wo attn(rope(Wq h1 + bq), rope(Wk h1 + bk), Wv h1 + bv) + bo
//          (rotate-half rope on the first rope_dim dims of each head: GPT-NeoX rotary_pct)
//     parallel residual:   x = x + a + mlp(h2)        mlp(h) = W4 gelu(W3 h + b3) + b4
//     else:                x = x + a; x = x + mlp(LN2(x))
// Final LayerNorm, then the output head (no bias). The image keys/values are
// to_kv(rows) split in halves by the converter (xattn_k / xattn_v).
#include "../internal.h"
#include "decoder.h"

#include <cmath>

namespace mmd {
namespace {

using mmv::format_error;
using mmv::Store;

constexpr float kBlockEps = 1e-5f;  // nn.LayerNorm's default in open_flamingo's helpers

}  // namespace

void load_openflamingo(mmv::WeightLoader & w, mmd_model & m, const std::string & path) {
    Hparams & hp = m.hp;
    hp.arch = Arch::OpenFlamingo;
    hp.n_embd = w.get_int_in("gptneox.embedding_length", 1, 1 << 17);
    hp.n_layer = w.get_int_in("gptneox.block_count", 1, 4096);
    hp.n_ff = w.get_int_in("gptneox.feed_forward_length", 1, 1 << 20);
    hp.n_head = w.get_int_in("gptneox.attention.head_count", 1, 4096);
    hp.n_head_kv = hp.n_head;
    hp.n_ctx_train = static_cast<int32_t>(w.get_int("gptneox.context_length", 2048));
    hp.rms_eps = static_cast<float>(w.get_float("gptneox.attention.layer_norm_epsilon", 1e-5));
    hp.rope_base = static_cast<float>(w.get_float("gptneox.rope.freq_base", 10000.0));
    hp.parallel_residual = w.get_bool("gptneox.use_parallel_residual", true);
    if (hp.n_embd % hp.n_head != 0) format_error("embedding_length is not a multiple of head_count");
    hp.head_dim = hp.n_embd / hp.n_head;
    hp.rope_dim = w.get_int_in("gptneox.rope.dimension_count", 0, hp.head_dim);
    if (hp.rope_dim % 2) format_error("rope.dimension_count is odd");
    if (!(hp.rms_eps > 0.f) || !std::isfinite(hp.rms_eps)) format_error("layer_norm_epsilon is not positive");
    hp.x_head_dim = w.get_int_in("openflamingo.cross_attention.head_dim", 1, 4096);
    hp.x_n_head = w.get_int_in("openflamingo.cross_attention.head_count", 1, 4096);

    std::vector<int64_t> emb = w.shape_of("token_embd.weight");
    if (emb.size() != 2 || emb[0] != hp.n_embd) format_error(path + ": missing or malformed token_embd.weight");
    hp.n_vocab = static_cast<int32_t>(emb[1]);
    const int64_t E = hp.n_embd, F = hp.n_ff, V = hp.n_vocab, I = hp.n_embd_x();
    m.tok_embd = w.declare("token_embd.weight", {E, V}, true, Store::AsIs);
    m.output_norm = w.declare("output_norm.weight", {E}, true, Store::F32);
    m.output_norm_b = w.declare("output_norm.bias", {E}, true, Store::F32);
    m.output = w.declare("output.weight", {E, V}, true, Store::AsIs);
    if (!w.has_tensor("blk." + std::to_string(hp.n_layer - 1) + ".xattn_q.weight")) {
        format_error(path + " has no gated cross-attention block before its last layer (blk.N.xattn_*): it is "
                            "not an OpenFlamingo model");
    }
    m.layers.resize(static_cast<size_t>(hp.n_layer));
    for (int32_t il = 0; il < hp.n_layer; ++il) {
        Layer & L = m.layers[static_cast<size_t>(il)];
        const std::string p = "blk." + std::to_string(il) + ".";
        auto f32 = [&](const std::string & n, int64_t len) { return w.declare(p + n, {len}, true, Store::F32); };
        L.attn_norm = f32("attn_norm.weight", E);
        L.attn_norm_b = f32("attn_norm.bias", E);
        L.q = w.declare(p + "attn_q.weight", {E, E}, true, Store::AsIs);
        L.k = w.declare(p + "attn_k.weight", {E, E}, true, Store::AsIs);
        L.v = w.declare(p + "attn_v.weight", {E, E}, true, Store::AsIs);
        L.o = w.declare(p + "attn_output.weight", {E, E}, true, Store::AsIs);
        L.q_b = f32("attn_q.bias", E);
        L.k_b = f32("attn_k.bias", E);
        L.v_b = f32("attn_v.bias", E);
        L.o_b = f32("attn_output.bias", E);
        L.ffn_norm = f32("ffn_norm.weight", E);
        L.ffn_norm_b = f32("ffn_norm.bias", E);
        L.up = w.declare(p + "ffn_up.weight", {E, F}, true, Store::AsIs);
        L.up_b = f32("ffn_up.bias", F);
        L.down = w.declare(p + "ffn_down.weight", {F, E}, true, Store::AsIs);
        L.down_b = f32("ffn_down.bias", E);
        if (!w.has_tensor(p + "xattn_q.weight")) continue;
        std::vector<int64_t> ks = w.shape_of(p + "xattn_k.weight");
        if (ks.size() != 2 || ks[1] != I) format_error(path + ": malformed " + p + "xattn_k.weight");
        if (hp.n_embd_image == 0) hp.n_embd_image = static_cast<int32_t>(ks[0]);
        if (ks[0] != hp.n_embd_image) format_error(path + ": cross-attention blocks read different image widths");
        const int64_t D = hp.n_embd_image;
        XBlock x;
        x.layer = il;
        x.attn_norm = f32("xattn_norm.weight", E);
        x.attn_norm_b = f32("xattn_norm.bias", E);
        x.q = w.declare(p + "xattn_q.weight", {E, I}, true, Store::AsIs);
        x.k = w.declare(p + "xattn_k.weight", {D, I}, true, Store::AsIs);
        x.v = w.declare(p + "xattn_v.weight", {D, I}, true, Store::AsIs);
        x.o = w.declare(p + "xattn_out.weight", {I, E}, true, Store::AsIs);
        x.alpha_attn = f32("xattn_alpha", 1);
        x.alpha_ffn = f32("xffn_alpha", 1);
        x.ffn_norm = f32("xffn_norm.weight", E);
        x.ffn_norm_b = f32("xffn_norm.bias", E);
        std::vector<int64_t> us = w.shape_of(p + "xffn_up.weight");
        if (us.size() != 2 || us[0] != E) format_error(path + ": malformed " + p + "xffn_up.weight");
        x.up = w.declare(p + "xffn_up.weight", {E, us[1]}, true, Store::AsIs);
        x.down = w.declare(p + "xffn_down.weight", {us[1], E}, true, Store::AsIs);
        L.xblock = static_cast<int32_t>(m.xblocks.size());
        m.xblocks.push_back(x);
    }
}

ggml_tensor * openflamingo_layers(ggml_context * ctx, mmd_context & c, ggml_tensor * x, const StepInputs & in) {
    const mmd_model & m = *c.model;
    const Hparams & hp = m.hp;
    const int64_t NT = in.n_tokens, DH = hp.head_dim, NH = hp.n_head;
    const float eps = hp.rms_eps;
    auto rope = [&](ggml_tensor * t) {
        return ggml_rope_ext(ctx, t, in.pos, nullptr, hp.rope_dim, GGML_ROPE_TYPE_NEOX, hp.n_ctx_train, hp.rope_base,
                             1.0f, 0.0f, 1.0f, 32.0f, 1.0f);
    };
    for (int32_t il = 0; il < hp.n_layer; ++il) {
        const Layer & L = m.layers[static_cast<size_t>(il)];
        if (L.xblock >= 0) {
            const XBlock & X = m.xblocks[static_cast<size_t>(L.xblock)];
            if (in.n_xrows > 0) {
                ggml_tensor * q = ggml_mul_mat(ctx, X.q, norm(ctx, x, X.attn_norm, X.attn_norm_b, kBlockEps));
                ggml_tensor * a = ggml_mul_mat(ctx, X.o, cross_attention(ctx, c, L.xblock, q, in));
                x = ggml_add(ctx, x, ggml_mul(ctx, a, ggml_tanh(ctx, X.alpha_attn)));
            }
            ggml_tensor * f = ggml_mul_mat(ctx, X.up, norm(ctx, x, X.ffn_norm, X.ffn_norm_b, kBlockEps));
            f = ggml_mul_mat(ctx, X.down, ggml_gelu_erf(ctx, f));
            x = ggml_add(ctx, x, ggml_mul(ctx, f, ggml_tanh(ctx, X.alpha_ffn)));
        }
        ggml_tensor * h = norm(ctx, x, L.attn_norm, L.attn_norm_b, eps);
        ggml_tensor * q = rope(ggml_reshape_3d(ctx, lin(ctx, h, L.q, L.q_b), DH, NH, NT));
        ggml_tensor * k = rope(ggml_reshape_3d(ctx, lin(ctx, h, L.k, L.k_b), DH, NH, NT));
        ggml_tensor * v = lin(ctx, h, L.v, L.v_b);
        ggml_tensor * a = lin(ctx, self_attention(ctx, c, il, q, k, v, in), L.o, L.o_b);
        ggml_tensor * mlp_in = hp.parallel_residual ? norm(ctx, x, L.ffn_norm, L.ffn_norm_b, eps) : nullptr;
        x = ggml_add(ctx, x, a);
        if (!mlp_in) mlp_in = norm(ctx, x, L.ffn_norm, L.ffn_norm_b, eps);
        ggml_tensor * f = lin(ctx, ggml_gelu_erf(ctx, lin(ctx, mlp_in, L.up, L.up_b)), L.down, L.down_b);
        x = ggml_add(ctx, x, f);
    }
    return x;
}

void openflamingo_image_kv(ggml_context * ctx, const mmd_model & m, size_t xb, ggml_tensor * rows, ggml_tensor ** k,
                           ggml_tensor ** v) {
    const XBlock & X = m.xblocks[xb];
    *k = ggml_mul_mat(ctx, X.k, rows);
    *v = ggml_mul_mat(ctx, X.v, rows);
}

}  // namespace mmd
