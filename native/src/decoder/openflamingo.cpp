// OpenFlamingo (docs/openflamingo-gguf.md): GPT-NeoX (RedPajama-INCITE) or MPT decoder layers
// with open_flamingo's GatedCrossAttentionBlock before layer i when (i + 1) % every_n == 0
// (the converter places blk.{i}.xattn_*).
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
// MPT (transformers' MptBlock, mosaicml's MosaicGPT GPTBlock; general.architecture "mpt"): no
// rope but ALiBi (slopes from alibi_bias_max, through the core's mask), LayerNorms and linears
// with optional biases, QKV optionally clamped (clip_qkv), then optionally LayerNorms over the
// whole Q and K (MosaicGPT attn_qk_ln), sequential residual, exact-GELU MLP, output head tied
// to the token embeddings when the file has no output.weight, logits times logit_scale:
//     x += Wo attn(LNq(clamp(Wq h)), LNk(clamp(Wk h)), clamp(Wv h))   h = LN1(x)
//     x += W4 gelu(W3 LN2(x))
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

// LayerNorm with an optional bias (MPT's have none)
ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    x = ggml_mul(ctx, ggml_norm(ctx, x, eps), w);
    return b ? ggml_add(ctx, x, b) : x;
}

}  // namespace

void load_openflamingo(mmv::WeightLoader & w, mmd_model & m, const std::string & path) {
    Hparams & hp = m.hp;
    hp.arch = Arch::OpenFlamingo;
    const std::string arch = w.get_str("general.architecture", "");
    hp.base = arch == "mpt" ? Base::Mpt : Base::NeoX;
    const bool neox = hp.base == Base::NeoX;
    auto key = [&](const char * k) { return arch + "." + k; };
    hp.n_embd = w.get_int_in(key("embedding_length").c_str(), 1, 1 << 17);
    hp.n_layer = w.get_int_in(key("block_count").c_str(), 1, 4096);
    hp.n_ff = w.get_int_in(key("feed_forward_length").c_str(), 1, 1 << 20);
    hp.n_head = w.get_int_in(key("attention.head_count").c_str(), 1, 4096);
    hp.n_head_kv = hp.n_head;
    hp.n_ctx_train = static_cast<int32_t>(w.get_int(key("context_length").c_str(), 2048));
    hp.rms_eps = static_cast<float>(w.get_float(key("attention.layer_norm_epsilon").c_str(), 1e-5));
    if (hp.n_embd % hp.n_head != 0) format_error("embedding_length is not a multiple of head_count");
    hp.head_dim = hp.n_embd / hp.n_head;
    if (neox) {
        hp.rope_base = static_cast<float>(w.get_float("gptneox.rope.freq_base", 10000.0));
        hp.parallel_residual = w.get_bool("gptneox.use_parallel_residual", true);
        hp.rope_dim = w.get_int_in("gptneox.rope.dimension_count", 0, hp.head_dim);
        if (hp.rope_dim % 2) format_error("rope.dimension_count is odd");
    } else {
        hp.alibi_max_bias = static_cast<float>(w.get_float("mpt.attention.max_alibi_bias", 8.0));
        hp.clip_qkv = static_cast<float>(w.get_float("mpt.attention.clamp_kqv", 0.0));
        hp.attn_scale = static_cast<float>(w.get_float("openflamingo.attention.scale", 0.0));
        hp.logit_scale = static_cast<float>(w.get_float("openflamingo.logit_scale", 1.0));
        if (!(hp.alibi_max_bias > 0.f)) mmv::unsupported("MPT without ALiBi");
    }
    if (!(hp.rms_eps > 0.f) || !std::isfinite(hp.rms_eps)) format_error("layer_norm_epsilon is not positive");
    hp.x_head_dim = w.get_int_in("openflamingo.cross_attention.head_dim", 1, 4096);
    hp.x_n_head = w.get_int_in("openflamingo.cross_attention.head_count", 1, 4096);

    std::vector<int64_t> emb = w.shape_of("token_embd.weight");
    if (emb.size() != 2 || emb[0] != hp.n_embd) format_error(path + ": missing or malformed token_embd.weight");
    hp.n_vocab = static_cast<int32_t>(emb[1]);
    const int64_t E = hp.n_embd, F = hp.n_ff, V = hp.n_vocab, I = hp.n_embd_x();
    auto f32 = [&](const std::string & n, int64_t len, bool req) { return w.declare(n, {len}, req, Store::F32); };
    m.tok_embd = w.declare("token_embd.weight", {E, V}, true, Store::AsIs);
    m.output_norm = f32("output_norm.weight", E, true);
    m.output_norm_b = f32("output_norm.bias", E, neox);
    m.output = w.declare("output.weight", {E, V}, neox, Store::AsIs);
    if (m.output == nullptr) m.output = m.tok_embd;  // MPT ties the head to wte
    if (!w.has_tensor("blk." + std::to_string(hp.n_layer - 1) + ".xattn_q.weight")) {
        format_error(path + " has no gated cross-attention block before its last layer (blk.N.xattn_*): it is "
                            "not an OpenFlamingo model");
    }
    m.layers.resize(static_cast<size_t>(hp.n_layer));
    for (int32_t il = 0; il < hp.n_layer; ++il) {
        Layer & L = m.layers[static_cast<size_t>(il)];
        const std::string p = "blk." + std::to_string(il) + ".";
        auto mat = [&](const std::string & n, int64_t in, int64_t out) {
            return w.declare(p + n, {in, out}, true, Store::AsIs);
        };
        L.attn_norm = f32(p + "attn_norm.weight", E, true);
        L.attn_norm_b = f32(p + "attn_norm.bias", E, neox);
        L.q = mat("attn_q.weight", E, E);
        L.k = mat("attn_k.weight", E, E);
        L.v = mat("attn_v.weight", E, E);
        L.o = mat("attn_output.weight", E, E);
        L.q_b = f32(p + "attn_q.bias", E, neox);
        L.k_b = f32(p + "attn_k.bias", E, neox);
        L.v_b = f32(p + "attn_v.bias", E, neox);
        L.o_b = f32(p + "attn_output.bias", E, neox);
        if (!neox) {  // MosaicGPT's attn_qk_ln
            L.q_norm = f32(p + "attn_q_norm.weight", E, false);
            L.q_norm_b = f32(p + "attn_q_norm.bias", E, false);
            L.k_norm = f32(p + "attn_k_norm.weight", E, L.q_norm != nullptr);
            L.k_norm_b = f32(p + "attn_k_norm.bias", E, false);
        }
        L.ffn_norm = f32(p + "ffn_norm.weight", E, true);
        L.ffn_norm_b = f32(p + "ffn_norm.bias", E, neox);
        L.up = mat("ffn_up.weight", E, F);
        L.up_b = f32(p + "ffn_up.bias", F, neox);
        L.down = mat("ffn_down.weight", F, E);
        L.down_b = f32(p + "ffn_down.bias", E, neox);
        if (!w.has_tensor(p + "xattn_q.weight")) continue;
        std::vector<int64_t> ks = w.shape_of(p + "xattn_k.weight");
        if (ks.size() != 2 || ks[1] != I) format_error(path + ": malformed " + p + "xattn_k.weight");
        if (hp.n_embd_image == 0) hp.n_embd_image = static_cast<int32_t>(ks[0]);
        if (ks[0] != hp.n_embd_image) format_error(path + ": cross-attention blocks read different image widths");
        const int64_t D = hp.n_embd_image;
        XBlock x;
        x.layer = il;
        x.attn_norm = f32(p + "xattn_norm.weight", E, true);
        x.attn_norm_b = f32(p + "xattn_norm.bias", E, true);
        x.q = mat("xattn_q.weight", E, I);
        x.k = mat("xattn_k.weight", D, I);
        x.v = mat("xattn_v.weight", D, I);
        x.o = mat("xattn_out.weight", I, E);
        x.alpha_attn = f32(p + "xattn_alpha", 1, true);
        x.alpha_ffn = f32(p + "xffn_alpha", 1, true);
        x.ffn_norm = f32(p + "xffn_norm.weight", E, true);
        x.ffn_norm_b = f32(p + "xffn_norm.bias", E, true);
        std::vector<int64_t> us = w.shape_of(p + "xffn_up.weight");
        if (us.size() != 2 || us[0] != E) format_error(path + ": malformed " + p + "xffn_up.weight");
        x.up = mat("xffn_up.weight", E, us[1]);
        x.down = mat("xffn_down.weight", us[1], E);
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
                ggml_tensor * q = ggml_mul_mat(ctx, X.q, layer_norm(ctx, x, X.attn_norm, X.attn_norm_b, kBlockEps));
                ggml_tensor * a = ggml_mul_mat(ctx, X.o, cross_attention(ctx, c, L.xblock, q, in));
                x = ggml_add(ctx, x, ggml_mul(ctx, a, ggml_tanh(ctx, X.alpha_attn)));
            }
            ggml_tensor * f = ggml_mul_mat(ctx, X.up, layer_norm(ctx, x, X.ffn_norm, X.ffn_norm_b, kBlockEps));
            f = ggml_mul_mat(ctx, X.down, ggml_gelu_erf(ctx, f));
            x = ggml_add(ctx, x, ggml_mul(ctx, f, ggml_tanh(ctx, X.alpha_ffn)));
        }
        ggml_tensor * h = layer_norm(ctx, x, L.attn_norm, L.attn_norm_b, eps);
        ggml_tensor * q = lin(ctx, h, L.q, L.q_b);
        ggml_tensor * k = lin(ctx, h, L.k, L.k_b);
        ggml_tensor * v = lin(ctx, h, L.v, L.v_b);
        if (hp.clip_qkv > 0.f) {
            q = ggml_clamp(ctx, q, -hp.clip_qkv, hp.clip_qkv);
            k = ggml_clamp(ctx, k, -hp.clip_qkv, hp.clip_qkv);
            v = ggml_clamp(ctx, v, -hp.clip_qkv, hp.clip_qkv);
        }
        if (L.q_norm) {
            q = layer_norm(ctx, q, L.q_norm, L.q_norm_b, eps);
            k = layer_norm(ctx, k, L.k_norm, L.k_norm_b, eps);
        }
        q = ggml_reshape_3d(ctx, q, DH, NH, NT);
        k = ggml_reshape_3d(ctx, k, DH, NH, NT);
        if (hp.base == Base::NeoX) {
            q = rope(q);
            k = rope(k);
        }
        ggml_tensor * a = lin(ctx, self_attention(ctx, c, il, q, k, v, in), L.o, L.o_b);
        ggml_tensor * mlp_in = hp.parallel_residual ? layer_norm(ctx, x, L.ffn_norm, L.ffn_norm_b, eps) : nullptr;
        x = ggml_add(ctx, x, a);
        if (!mlp_in) mlp_in = layer_norm(ctx, x, L.ffn_norm, L.ffn_norm_b, eps);
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
