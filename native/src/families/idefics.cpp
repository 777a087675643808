// IDEFICS v1 vision side (projector type "idefics"): CLIP ViT as transformers'
// IdeficsVisionTransformer + the Perceiver resampler (IdeficsPerceiverResampler).
//
// Per image: x = [class; patches] + positions, pre-LN, every block, no post-LN (IDEFICS reads
// last_hidden_state, class token included). With idefics.use_resampler the Perceiver turns
// those 1 + n_patches rows into n_latents rows:
//   latents = learned [n_latents, W]
//   per block: c = LN_ctx(x), l = LN_lat(latents)
//              q = Wq l, k = Wk [c; l], v = Wv [c; l]   (n_head heads of head_dim, inner width
//              n_head * head_dim may differ from W); optional LayerNorm(head_dim) on q and k
//              latents += Wo softmax(q k^T / sqrt(head_dim)) v
//              latents += c_proj(relu(fc(LN(latents))))     (fc: W -> 4W, no biases)
//   out = LN(latents)
// All Perceiver LayerNorms use torch's default eps 1e-5. The output rows have the ViT width;
// the decoder's gated cross-attention projects them (native/src/decoder/).
//
// OpenFlamingo (projector type "openflamingo", docs/openflamingo-gguf.md) is the same graph
// with three differences, read from the projector type: the Perceiver reads the patch rows
// only (open_clip's `visual(...)[1]`: class token dropped, no ln_post, as the released
// checkpoints were trained), its MLP uses exact GELU instead of ReLU, the resampler always
// runs, and its keys live under "openflamingo." instead of "idefics.".
#include "../family.h"
#include "../loader.h"

#include <cmath>

namespace mmv {
namespace {

constexpr float kPerceiverEps = 1e-5f;

struct PerceiverBlock {
    Norm ctx_norm, lat_norm, q_norm, k_norm, ffn_norm;
    ggml_tensor * q = nullptr;
    ggml_tensor * k = nullptr;
    ggml_tensor * v = nullptr;
    ggml_tensor * o = nullptr;
    ggml_tensor * up = nullptr;
    ggml_tensor * down = nullptr;
};

class IdeficsFamily final : public Family {
  public:
    void load(WeightLoader & w, Hparams & hp) override {
        hp.image_size = w.get_int_in("clip.vision.image_size", 1, 8192);
        hp.patch_size = w.get_int_in("clip.vision.patch_size", 1, 1024);
        H_ = w.get_int_in("clip.vision.embedding_length", 1, 1 << 16);
        F_ = w.get_int_in("clip.vision.feed_forward_length", 1, 1 << 18);
        hp.n_layer_file = w.get_int_in("clip.vision.block_count", 0, 1024);
        hp.n_layer_run = hp.n_layer_file;
        n_head_ = w.get_int_in("clip.vision.attention.head_count", 1, 4096);
        eps_ = static_cast<float>(w.get_float("clip.vision.attention.layer_norm_epsilon", 1e-5));
        if (!(eps_ > 0.f) || !std::isfinite(eps_)) format_error("layer_norm_epsilon is not positive");
        hp.eps = eps_;
        if (hp.image_size % hp.patch_size != 0) format_error("image_size is not a multiple of patch_size");
        if (H_ % n_head_ != 0) format_error("embedding_length is not a multiple of head_count");
        hp.n_embd_vision = static_cast<int32_t>(H_);
        hp.use_gelu = w.get_bool("clip.use_gelu", true);
        const double def_mean[3] = {0.48145466, 0.4578275, 0.40821073};
        const double def_std[3] = {0.26862954, 0.26130258, 0.27577711};
        w.image_norm(hp.image_mean, hp.image_std, def_mean, def_std);

        of_ = w.get_str("clip.projector_type", "") == "openflamingo";
        const std::string ns = of_ ? "openflamingo." : "idefics.";
        auto key = [&](const char * k) { return ns + k; };
        resampler_ = of_ || w.get_bool("idefics.use_resampler", false);
        const int64_t H = H_, P = hp.patch_size;
        embed_.patch_w = w.declare("v.patch_embd.weight", {P, P, 3, H}, true, Store::F32);
        embed_.patch_b = w.declare("v.patch_embd.bias", {H}, false, Store::F32);
        embed_.class_embd = w.declare("v.class_embd", {H}, true, Store::F32);
        embed_.pos_embd = w.declare("v.position_embd.weight", {H, hp.n_patches() + 1}, true, Store::F32);
        pre_ln_ = w.norm("v.pre_ln", H, false);
        layers_.resize(static_cast<size_t>(hp.n_layer_run));
        for (int32_t il = 0; il < hp.n_layer_run; ++il) {
            PreLnBlock & L = layers_[static_cast<size_t>(il)];
            const std::string p = "v.blk." + std::to_string(il) + ".";
            L.ln1 = w.norm(p + "ln1", H, true);
            L.ln2 = w.norm(p + "ln2", H, true);
            L.attn.q = w.linear(p + "attn_q", H, H, false);
            L.attn.k = w.linear(p + "attn_k", H, H, false);
            L.attn.v = w.linear(p + "attn_v", H, H, false);
            L.attn.o = w.linear(p + "attn_out", H, H, false);
            L.fc1 = w.linear(p + "ffn_up", H, F_, false);
            L.fc2 = w.linear(p + "ffn_down", F_, H, false);
        }
        hp.n_embd_out = static_cast<int32_t>(H);
        if (!resampler_) {
            hp.n_tokens = hp.n_patches() + 1;
            return;
        }
        n_lat_ = w.get_int_in(key("perceiver.n_latents").c_str(), 1, 1 << 16);
        const int32_t depth = w.get_int_in(key("perceiver.block_count").c_str(), 1, 64);
        p_head_ = w.get_int_in(key("perceiver.head_count").c_str(), 1, 1024);
        p_hd_ = w.get_int_in(key("perceiver.head_dim").c_str(), 1, 4096);
        const bool qk = !of_ && w.get_bool("idefics.perceiver.qk_norms", false);
        const int64_t inner = p_head_ * p_hd_;
        latents_ = w.declare("perc.latents", {H, n_lat_}, true, Store::F32);
        blocks_.resize(static_cast<size_t>(depth));
        for (int32_t i = 0; i < depth; ++i) {
            PerceiverBlock & b = blocks_[static_cast<size_t>(i)];
            const std::string p = "perc.blk." + std::to_string(i) + ".";
            b.ctx_norm = w.norm(p + "ctx_norm", H, true);
            b.lat_norm = w.norm(p + "lat_norm", H, true);
            if (qk) {
                b.q_norm = w.norm(p + "q_norm", p_hd_, true);
                b.k_norm = w.norm(p + "k_norm", p_hd_, true);
            }
            b.q = w.linear(p + "attn_q", H, inner, false).w;
            b.k = w.linear(p + "attn_k", H, inner, false).w;
            b.v = w.linear(p + "attn_v", H, inner, false).w;
            b.o = w.linear(p + "attn_out", inner, H, false).w;
            b.ffn_norm = w.norm(p + "ffn_norm", H, true);
            b.up = w.linear(p + "ffn_up", H, 4 * H, false).w;
            b.down = w.linear(p + "ffn_down", 4 * H, H, false).w;
        }
        post_norm_ = w.norm("perc.post_norm", H, true);
        hp.n_tokens = static_cast<int32_t>(n_lat_);
    }

    size_t graph_size(const Hparams & hp) const override {
        return 64 * static_cast<size_t>(hp.n_layer_run) + 96 * blocks_.size() + 256;
    }

    ggml_tensor * build(ggml_context * ctx, const Hparams & hp, const GraphInputs & in, const Arith & ar) const override {
        const int64_t B = in.batch;
        ggml_tensor * x = vit_embed(ctx, embed_, in.patches, H_);  // [H, 1 + NP, B]
        if (pre_ln_.w) x = apply(ctx, pre_ln_, x, eps_);
        const Act act = hp.use_gelu ? Act::Gelu : Act::QuickGelu;
        for (const PreLnBlock & L : layers_) x = pre_ln_block(ctx, L, x, n_head_, eps_, act, ar);
        if (!resampler_) return x;
        if (of_) {  // the patch rows only
            x = ggml_cont(ctx, ggml_view_3d(ctx, x, H_, x->ne[1] - 1, B, x->nb[1], x->nb[2], x->nb[1]));
        }

        const int64_t NC = x->ne[1], NL = n_lat_, inner = p_head_ * p_hd_;
        ggml_tensor * lat = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, latents_, H_, NL, 1), H_, NL, B, 1);
        auto head_norm = [&](ggml_tensor * t, const Norm & n) {
            if (!n.w) return t;
            const int64_t N = t->ne[1];
            t = ggml_reshape_2d(ctx, ggml_cont(ctx, t), p_hd_, p_head_ * N * B);
            t = apply(ctx, n, t, kPerceiverEps);
            return ggml_reshape_3d(ctx, t, inner, N, B);
        };
        for (const PerceiverBlock & b : blocks_) {
            ggml_tensor * c = apply(ctx, b.ctx_norm, x, kPerceiverEps);
            ggml_tensor * l = apply(ctx, b.lat_norm, lat, kPerceiverEps);
            ggml_tensor * kv_in = ggml_concat(ctx, c, l, 1);  // [H, NC + NL, B]
            ggml_tensor * q = head_norm(ggml_mul_mat(ctx, b.q, l), b.q_norm);
            ggml_tensor * k = head_norm(ggml_mul_mat(ctx, b.k, kv_in), b.k_norm);
            ggml_tensor * v = ggml_mul_mat(ctx, b.v, kv_in);
            ggml_tensor * att = attention(ctx, q, k, v, p_head_, ar);  // [inner, NL, B]
            lat = ggml_add(ctx, lat, ggml_mul_mat(ctx, b.o, att));
            ggml_tensor * f = apply(ctx, b.ffn_norm, lat, kPerceiverEps);
            f = ggml_mul_mat(ctx, b.up, f);
            f = ggml_mul_mat(ctx, b.down, of_ ? gelu(ctx, f, ar.fast_math) : ggml_relu(ctx, f));
            lat = ggml_add(ctx, lat, f);
        }
        (void) NC;
        return apply(ctx, post_norm_, lat, kPerceiverEps);
    }

  private:
    int64_t H_ = 0, F_ = 0, n_head_ = 0;
    float eps_ = 1e-5f;
    bool resampler_ = false;
    bool of_ = false;  // OpenFlamingo
    int64_t n_lat_ = 0, p_head_ = 0, p_hd_ = 0;
    VitEmbedWeights embed_;
    Norm pre_ln_;
    std::vector<PreLnBlock> layers_;
    ggml_tensor * latents_ = nullptr;
    std::vector<PerceiverBlock> blocks_;
    Norm post_norm_;
};

}  // namespace

std::unique_ptr<Family> make_idefics_family() { return std::make_unique<IdeficsFamily>(); }

}  // namespace mmv
