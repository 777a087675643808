// InternViT + pixel shuffle + mlp1 (projector type "internvit": NVLM-D; file layout in
// docs/nvlm.md), as the published InternVL / NVLM-D modeling code computes one 448-px tile:
//
//   x = [class; patches] + positions
//   per block:  x += ls1 * proj(attn(norm1(x)))        norm: RMSNorm (or LayerNorm)
//               x += ls2 * fc2(gelu(fc1(norm2(x))))     exact GELU
//     attention: q, k, v = split(qkv(h)); q = q_norm(q), k = k_norm(k) (RMS over the whole
//     width, before the head split); softmax(q k^T / sqrt(dh)) v
//   the class row dropped after the last block
//   pixel shuffle 0.5, ps_version v2: the G x G grid -> (G/2) x (G/2) rows, row (i, j)
//     = [x(2i, 2j), x(2i, 2j+1), x(2i+1, 2j), x(2i+1, 2j+1)] (4 x width)
//   mlp1: LayerNorm -> Linear -> GELU -> Linear (biases optional; NVLM-D has none)
//
// Every tile is one image of the batch; the caller passes all tiles of all images at once.
#include "../family.h"
#include "../loader.h"

#include <cmath>

namespace mmv {
namespace {

struct IvBlock {
    Norm ln1, ln2;
    Linear q, k, v, o, fc1, fc2;
    ggml_tensor * q_norm = nullptr;
    ggml_tensor * k_norm = nullptr;
    ggml_tensor * ls1 = nullptr;
    ggml_tensor * ls2 = nullptr;
};

class InternVitFamily final : public Family {
  public:
    void load(WeightLoader & w, Hparams & hp) override {
        hp.image_size = w.get_int_in("clip.vision.image_size", 1, 8192);
        hp.patch_size = w.get_int_in("clip.vision.patch_size", 1, 1024);
        if (hp.image_size % hp.patch_size != 0) format_error("image_size is not a multiple of patch_size");
        H_ = w.get_int_in("clip.vision.embedding_length", 1, 1 << 16);
        F_ = w.get_int_in("clip.vision.feed_forward_length", 1, 1 << 18);
        n_layer_ = w.get_int_in("clip.vision.block_count", 1, 1024);
        n_head_ = w.get_int_in("clip.vision.attention.head_count", 1, 4096);
        if (H_ % n_head_ != 0) format_error("clip.vision.embedding_length is not a multiple of head_count");
        eps_ = static_cast<float>(w.get_float("clip.vision.attention.layer_norm_epsilon", 1e-6));
        eps_mm_ = static_cast<float>(w.get_float("internvit.projector.layer_norm_epsilon", 1e-5));
        if (!(eps_ > 0.f) || !(eps_mm_ > 0.f) || !std::isfinite(eps_) || !std::isfinite(eps_mm_)) {
            format_error("a layer_norm_epsilon is not positive");
        }
        const std::string norm = w.get_str("internvit.norm_type", "rms_norm");
        if (norm != "rms_norm" && norm != "layer_norm") unsupported("internvit.norm_type '" + norm + "'");
        rms_ = norm == "rms_norm";
        qk_norm_ = w.get_bool("internvit.qk_norm", false);
        n_run_ = w.get_int("internvit.layers_run", n_layer_);
        if (n_run_ < 1 || n_run_ > n_layer_) format_error("internvit.layers_run is out of range");
        const double scale = w.get_float("internvit.pixel_shuffle.scale", 0.5);
        const std::string ps = w.get_str("internvit.pixel_shuffle.version", "v2");
        if (scale != 0.5 || ps != "v2") unsupported("pixel shuffle other than v2 at 0.5");
        if ((hp.image_size / hp.patch_size) % 2 != 0) format_error("the patch grid is odd: no 2x2 pixel shuffle");
        const double def_mean[3] = {0.485, 0.456, 0.406};
        const double def_std[3] = {0.229, 0.224, 0.225};
        w.image_norm(hp.image_mean, hp.image_std, def_mean, def_std);
        hp.eps = eps_;
        hp.use_gelu = true;
        hp.n_embd_vision = static_cast<int32_t>(H_);
        hp.n_layer_file = static_cast<int32_t>(n_layer_);
        hp.n_layer_run = static_cast<int32_t>(n_run_);
        const int32_t g2 = hp.grid() / 2;
        hp.n_tokens = g2 * g2;
        declare(w, hp);
    }

    size_t graph_size(const Hparams &) const override { return 64 * static_cast<size_t>(n_run_) + 256; }

    ggml_tensor * build(ggml_context * ctx, const Hparams & hp, const GraphInputs & in, const Arith & ar) const override {
        const int64_t B = in.batch, H = H_, G = hp.grid(), NP = G * G;
        ggml_tensor * x = vit_embed(ctx, embed_, in.patches, H);  // [H, 1 + NP, B]
        for (int64_t il = 0; il < n_run_; ++il) {
            const IvBlock & L = blocks_[static_cast<size_t>(il)];
            ggml_tensor * h = norm(ctx, L.ln1, x);
            ggml_tensor * q = apply(ctx, L.q, h);
            ggml_tensor * k = apply(ctx, L.k, h);
            ggml_tensor * v = apply(ctx, L.v, h);
            if (qk_norm_) {  // over the whole q / k, before the head split
                q = ggml_mul(ctx, ggml_rms_norm(ctx, q, eps_), L.q_norm);
                k = ggml_mul(ctx, ggml_rms_norm(ctx, k, eps_), L.k_norm);
            }
            h = apply(ctx, L.o, attention(ctx, q, k, v, n_head_, ar));
            x = ggml_add(ctx, x, ggml_mul(ctx, h, L.ls1));
            h = apply(ctx, L.fc2, gelu(ctx, apply(ctx, L.fc1, norm(ctx, L.ln2, x)), ar.fast_math));
            x = ggml_add(ctx, x, ggml_mul(ctx, h, L.ls2));
        }
        // drop the class row: [H, NP, B]
        x = ggml_view_3d(ctx, x, H, NP, B, x->nb[1], x->nb[2], x->nb[1]);
        x = ggml_cont(ctx, x);
        // pixel shuffle v2: (y, x) = (2i + a, 2j + b) -> row i*(G/2) + j, channel (2a + b)*H + c
        const int64_t G2 = G / 2;
        x = ggml_reshape_4d(ctx, x, 2 * H, G2, 2, G2 * B);      // [(b, c), j, a, (i, B)]
        x = ggml_cont(ctx, ggml_permute(ctx, x, 0, 2, 1, 3));  // [(b, c), a, j, (i, B)]
        x = ggml_reshape_3d(ctx, x, 4 * H, G2 * G2, B);       // [(a, b, c), (i, j), B]
        // mlp1
        x = layer_norm(ctx, x, mm_ln_.w, mm_ln_.b, eps_mm_);
        x = gelu(ctx, apply(ctx, mm_up_, x), ar.fast_math);
        return apply(ctx, mm_down_, x);  // [n_embd, (G/2)^2, B]
    }

  private:
    ggml_tensor * norm(ggml_context * ctx, const Norm & n, ggml_tensor * x) const {
        if (!rms_) return apply(ctx, n, x, eps_);
        return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps_), n.w);
    }

    void declare(WeightLoader & w, Hparams & hp) {
        const int64_t H = H_, F = F_, P = hp.patch_size;
        embed_.patch_w = w.declare("v.patch_embd.weight", {P, P, 3, H}, true, Store::F32);
        embed_.patch_b = w.declare("v.patch_embd.bias", {H}, false, Store::F32);
        embed_.class_embd = w.declare("v.class_embd", {H}, true, Store::F32);
        embed_.pos_embd = w.declare("v.position_embd.weight", {H, hp.n_patches() + 1}, true, Store::F32);
        blocks_.resize(static_cast<size_t>(n_run_));
        for (int64_t il = 0; il < n_run_; ++il) {
            IvBlock & L = blocks_[static_cast<size_t>(il)];
            const std::string p = "v.blk." + std::to_string(il) + ".";
            if (rms_) {  // RMSNorm: a weight only
                L.ln1.w = w.declare(p + "ln1.weight", {H}, true, Store::F32);
                L.ln2.w = w.declare(p + "ln2.weight", {H}, true, Store::F32);
            } else {
                L.ln1 = w.norm(p + "ln1", H, true);
                L.ln2 = w.norm(p + "ln2", H, true);
            }
            L.q = w.linear(p + "attn_q", H, H, false);
            L.k = w.linear(p + "attn_k", H, H, false);
            L.v = w.linear(p + "attn_v", H, H, false);
            L.o = w.linear(p + "attn_out", H, H, false);
            if (qk_norm_) {
                L.q_norm = w.declare(p + "attn_q_norm.weight", {H}, true, Store::F32);
                L.k_norm = w.declare(p + "attn_k_norm.weight", {H}, true, Store::F32);
            }
            L.ls1 = w.declare(p + "ls1", {H}, true, Store::F32);
            L.ls2 = w.declare(p + "ls2", {H}, true, Store::F32);
            L.fc1 = w.linear(p + "ffn_up", H, F, true);
            L.fc2 = w.linear(p + "ffn_down", F, H, true);
        }
        mm_ln_ = w.norm("mm.model.mlp.0", 4 * H, true);
        const std::vector<int64_t> us = w.shape_of("mm.model.mlp.1.weight");
        const std::vector<int64_t> ds = w.shape_of("mm.model.mlp.3.weight");
        if (us.size() != 2 || us[0] != 4 * H || ds.size() != 2 || ds[0] != us[1]) {
            format_error(w.path() + ": missing or malformed mm.model.mlp.1.weight / mm.model.mlp.3.weight (mlp1)");
        }
        mm_up_ = w.linear("mm.model.mlp.1", 4 * H, us[1], false);
        mm_down_ = w.linear("mm.model.mlp.3", us[1], ds[1], false);
        hp.n_embd_out = static_cast<int32_t>(ds[1]);
    }

    int64_t H_ = 0, F_ = 0, n_layer_ = 0, n_run_ = 0, n_head_ = 0;
    float eps_ = 1e-6f, eps_mm_ = 1e-5f;
    bool rms_ = true, qk_norm_ = false;
    VitEmbedWeights embed_;
    std::vector<IvBlock> blocks_;
    Norm mm_ln_;
    Linear mm_up_, mm_down_;
};

}  // namespace

std::unique_ptr<Family> make_internvit_family() { return std::make_unique<InternVitFamily>(); }

}  // namespace mmv
