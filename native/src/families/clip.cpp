// CLIP ViT (as transformers' CLIPVisionModel) + LLaVA projector: projector types "mlp"
// (LLaVA 1.5/1.6, BakLLaVA: mm.0, GELU, mm.2) and "mlp_norm" (mm.0, LN mm.1, GELU, mm.3, LN mm.4);
// NeVA's "linear" (mm.0 alone), "mlp_deep" (mm.0, GELU, mm.2, GELU, mm.4, ...) and
// "mlp_downsample" (each 2x2 block of patches concatenated, zero-padded to an even grid, rows
// in NeMo's column-major block order; LN mm.1, mm.2, GELU, mm.4).
//
// Per image: x = [class; patches] + positions, pre-LN, blocks up to the deepest feature layer,
// hidden_states[f] of each feature layer concatenated, class row dropped, projector.
//
// Two layouts of the same model exist in the wild.
//
// mmchat's converter (like llama.cpp's current convert_hf_to_gguf.py) names the ViT MLP
// `ffn_up` = CLIP mlp.fc1 (hidden -> n_ff) and `ffn_down` = mlp.fc2 (n_ff -> hidden), and
// writes `clip.vision.feature_layer` = [index into hidden_states], non-negative, where
// hidden_states[0] is the pre-LN'd embedding and hidden_states[i] the output of block i-1.
// LLaVA's "layer -2" of a 24-block tower is thus feature_layer 23: run 23 blocks.
//
// The legacy published layout (llama.cpp's tools/mtmd/legacy-models/
// convert_image_encoder_to_gguf.py, used for mys/ggml_llava-v1.5-*, mys/ggml_bakllava-1,
// abetlen/BakLLaVA-1-GGUF mmproj files) differs in three ways:
//   * its tensor renaming maps "mlp.fc1" -> "ffn_down" and "mlp.fc2" -> "ffn_up", so the two
//     names are swapped with respect to their roles (llama.cpp's clip.cpp detects this by
//     `ffn_down.weight->ne[0] == n_embd` and swaps the pointers back);
//   * it writes `clip.has_llava_projector = true` (plus has_text_encoder = false,
//     has_vision_encoder = true) and `clip.projector_type` (default "mlp");
//   * without a feature-layer key in the source config it pops the last encoder layer, writes
//     `block_count` = num_hidden_layers - 1 and stores only those blocks; with one it writes
//     block_count = max(feature_layers), keeps that many blocks, and the feature_layer array.
//     Either way the right LLaVA feature is the output of every block the file stores.
//     clip.cpp instead runs block_count - 1 blocks when feature_layer is absent (one short).
// It also drops v.post_ln for LLaVA and stores 2-D weights (and the 4-D patch kernel) as f16,
// 1-D tensors as f32.
//
// Our rule, which is right for both: with clip.vision.feature_layer run max(feature_layer)
// blocks; without it run block_count blocks when clip.has_llava_projector is true (legacy, the
// tower was already cut), else block_count - 1 (a full tower, LLaVA's layer -2). The FFN
// roles come from the shapes; only when hidden == n_ff (ambiguous) does the legacy signature
// (has_llava_projector without feature_layer) decide. v.post_ln is never applied: LLaVA
// takes hidden_states before the final layer norm.
#include "../family.h"
#include "../loader.h"

#include <algorithm>
#include <cmath>

namespace mmv {
namespace {

class ClipFamily final : public Family {
  public:
    void load(WeightLoader & w, Hparams & hp) override {
        norm_proj_ = hp.projector_name == "mlp_norm";
        linear_proj_ = hp.projector_name == "linear";
        deep_proj_ = hp.projector_name == "mlp_deep";
        down_proj_ = hp.projector_name == "mlp_downsample";
        hp.image_size = w.get_int_in("clip.vision.image_size", 1, 8192);
        hp.patch_size = w.get_int_in("clip.vision.patch_size", 1, 1024);
        H_ = w.get_int_in("clip.vision.embedding_length", 1, 1 << 16);
        F_ = w.get_int_in("clip.vision.feed_forward_length", 1, 1 << 18);
        hp.n_layer_file = w.get_int_in("clip.vision.block_count", 0, 1024);
        n_head_ = w.get_int_in("clip.vision.attention.head_count", 1, 4096);
        eps_ = static_cast<float>(w.get_float("clip.vision.attention.layer_norm_epsilon", 1e-5));
        if (!(eps_ > 0.f) || !std::isfinite(eps_)) format_error("layer_norm_epsilon is not positive");
        hp.eps = eps_;
        if (hp.image_size % hp.patch_size != 0) {
            format_error("image_size " + std::to_string(hp.image_size) + " is not a multiple of patch_size " +
                         std::to_string(hp.patch_size));
        }
        if (H_ % n_head_ != 0) {
            format_error("embedding_length " + std::to_string(H_) + " is not a multiple of head_count " +
                         std::to_string(n_head_));
        }
        hp.n_embd_vision = static_cast<int32_t>(H_);
        hp.use_gelu = w.get_bool("clip.use_gelu", false);
        if (w.get_bool("clip.use_silu", false)) unsupported("clip.use_silu is not a CLIP/LLaVA activation");
        const double def_mean[3] = {0.48145466, 0.4578275, 0.40821073};
        const double def_std[3] = {0.26862954, 0.26130258, 0.27577711};
        w.image_norm(hp.image_mean, hp.image_std, def_mean, def_std);

        const bool has_llava = w.get_bool("clip.has_llava_projector", false);
        const bool has_feature = w.has("clip.vision.feature_layer");
        if (has_feature) {
            for (double v : w.get_float_array("clip.vision.feature_layer")) {
                if (v < 0 || v > hp.n_layer_file || v != std::floor(v)) {
                    format_error("clip.vision.feature_layer " + std::to_string(static_cast<int64_t>(v)) +
                                 " is out of range (block_count " + std::to_string(hp.n_layer_file) + ")");
                }
                features_.push_back(static_cast<int32_t>(v));
            }
            std::sort(features_.begin(), features_.end());
            features_.erase(std::unique(features_.begin(), features_.end()), features_.end());
        }
        if (features_.empty()) {
            int32_t n = has_llava ? hp.n_layer_file : hp.n_layer_file - 1;
            if (n < 0) format_error("block_count is 0");
            features_.push_back(n);
        }
        hp.n_layer_run = features_.back();
        hp.legacy_layout = has_llava && !has_feature;
        hp.n_tokens = down_proj_ ? ((hp.grid() + 1) / 2) * ((hp.grid() + 1) / 2) : hp.n_patches();

        declare(w, hp, has_llava, has_feature);
    }

    size_t graph_size(const Hparams & hp) const override { return 64 * static_cast<size_t>(hp.n_layer_run) + 256; }

    ggml_tensor * build(ggml_context * ctx, const Hparams & hp, const GraphInputs & in, const Arith & ar) const override {
        const int64_t NP = hp.n_patches(), B = in.batch;
        ggml_tensor * x = vit_embed(ctx, embed_, in.patches, H_);  // [H, 1 + NP, B]
        if (pre_ln_.w) x = apply(ctx, pre_ln_, x, eps_);

        const Act act = hp.use_gelu ? Act::Gelu : Act::QuickGelu;
        auto is_feature = [&](int32_t i) { return std::find(features_.begin(), features_.end(), i) != features_.end(); };
        std::vector<ggml_tensor *> feats;
        for (int32_t il = 0; il < hp.n_layer_run; ++il) {
            if (is_feature(il)) feats.push_back(x);
            x = pre_ln_block(ctx, layers_[static_cast<size_t>(il)], x, n_head_, eps_, act, ar);
        }
        if (is_feature(hp.n_layer_run)) feats.push_back(x);

        ggml_tensor * emb = feats[0];
        for (size_t i = 1; i < feats.size(); ++i) emb = ggml_concat(ctx, emb, feats[i], 0);
        // drop the class token (row 0)
        emb = ggml_view_3d(ctx, emb, emb->ne[0], NP, B, emb->nb[1], emb->nb[2], emb->nb[1]);
        emb = ggml_cont(ctx, emb);

        // the projector's GELU is exact whatever fast_math says (as the projector is trained)
        Arith pr = ar;
        pr.fast_math = false;
        if (down_proj_) return downsample_projector(ctx, hp, emb, pr);
        emb = apply(ctx, mm_a_, emb, pr);
        if (linear_proj_) return emb;
        if (deep_proj_) {
            for (const Linear & l : mm_deep_) emb = apply(ctx, l, gelu(ctx, emb, pr), pr);
            return emb;
        }
        if (norm_proj_) emb = apply(ctx, mm_norm1_, emb, eps_);
        emb = gelu(ctx, emb, pr);
        emb = apply(ctx, mm_b_, emb, pr);
        if (norm_proj_) emb = apply(ctx, mm_norm2_, emb, eps_);
        return emb;
    }

  private:
    // NeMo's DownSampleBlock: [W, g*g, B] -> [4W, (g/2)^2, B]; row k = (j, m) with j (the
    // column pair) slowest holds patches (2m, 2j), (2m, 2j+1), (2m+1, 2j), (2m+1, 2j+1).
    ggml_tensor * downsample_projector(ggml_context * ctx, const Hparams & hp, ggml_tensor * emb,
                                       const Arith & pr) const {
        const int64_t W = emb->ne[0], g = hp.grid(), B = emb->ne[2], h = (g + 1) / 2;
        ggml_tensor * x = ggml_reshape_4d(ctx, emb, W, g, g, B);  // [W, col, row, B]
        if (g % 2) x = ggml_pad(ctx, x, 0, 1, 1, 0);
        x = ggml_reshape_4d(ctx, x, 2 * W, h, 2, h * B);       // [2W, j, row%2, m + h*b]
        x = ggml_cont(ctx, ggml_permute(ctx, x, 0, 2, 1, 3));  // [2W, row%2, j, m + h*b]
        x = ggml_reshape_4d(ctx, x, 4 * W, h, h, B);           // [4W, j, m, B]
        x = ggml_cont(ctx, ggml_permute(ctx, x, 0, 2, 1, 3));  // [4W, m, j, B]
        x = ggml_reshape_3d(ctx, x, 4 * W, h * h, B);
        x = apply(ctx, mm_norm1_, x, 1e-5f);  // torch.nn.LayerNorm's default eps
        x = apply(ctx, mm_a_, x, pr);
        x = gelu(ctx, x, pr);
        return apply(ctx, mm_b_, x, pr);
    }

    void declare(WeightLoader & w, Hparams & hp, bool has_llava, bool has_feature) {
        const int64_t H = H_, F = F_, P = hp.patch_size;
        // Patch kernel: torch [hidden, 3, p, p] = ggml ne [p, p, 3, hidden]; its memory is the
        // [3*p*p, hidden] matrix the host-side im2col multiplies with.
        embed_.patch_w = w.declare("v.patch_embd.weight", {P, P, 3, H}, true, Store::F32);
        embed_.patch_b = w.declare("v.patch_embd.bias", {H}, false, Store::F32);
        embed_.class_embd = w.declare("v.class_embd", {H}, true, Store::F32);
        embed_.pos_embd = w.declare("v.position_embd.weight", {H, hp.n_patches() + 1}, true, Store::F32);
        pre_ln_ = w.norm("v.pre_ln", H, false);

        if (hp.n_layer_run > hp.n_layer_file) {
            format_error("feature layer " + std::to_string(hp.n_layer_run) + " needs more blocks than the " +
                         std::to_string(hp.n_layer_file) + " the file has");
        }
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

            // FFN: which stored name is fc1 (hidden -> n_ff)?
            const std::string up = p + "ffn_up", down = p + "ffn_down";
            std::vector<int64_t> up_shape = w.shape_of(up + ".weight");
            if (up_shape.empty()) format_error(w.path() + ": missing tensor " + up + ".weight");
            up_shape.resize(2, 1);
            bool swapped = false;
            if (H != F) {
                swapped = up_shape[0] == F && up_shape[1] == H;
            } else {
                swapped = has_llava && !has_feature;
            }
            if (il == 0) hp.ffn_swapped = swapped;
            else if (swapped != hp.ffn_swapped) format_error(w.path() + ": inconsistent FFN layout in " + p);
            L.fc1 = w.linear(swapped ? down : up, H, F, false);
            L.fc2 = w.linear(swapped ? up : down, F, H, false);
        }

        // Projector. mm.0: [H * n_features, mid]; mlp: mm.2 [mid, out]; mlp_norm: mm.1 LN(mid),
        // mm.3 [mid, out], mm.4 LN(out).
        const int64_t in_w = H * static_cast<int64_t>(features_.size());
        if (down_proj_) {
            std::vector<int64_t> m2 = w.shape_of("mm.2.weight"), m4 = w.shape_of("mm.4.weight");
            if (m2.size() != 2 || m4.size() != 2) format_error(w.path() + ": missing mm.2/mm.4 of mlp_downsample");
            mm_norm1_ = w.norm("mm.1", 4 * in_w, true);
            mm_a_ = w.linear("mm.2", 4 * in_w, m2[1], false);
            mm_b_ = w.linear("mm.4", m2[1], m4[1], false);
            hp.n_embd_out = static_cast<int32_t>(m4[1]);
            return;
        }
        std::vector<int64_t> m0 = w.shape_of("mm.0.weight");
        if (m0.size() != 2) format_error(w.path() + ": missing or malformed tensor mm.0.weight");
        const int64_t mid = m0[1];
        mm_a_ = w.linear("mm.0", in_w, mid, false);
        if (linear_proj_ || deep_proj_) {
            int64_t out = mid;
            for (int i = 2; deep_proj_ && w.has_tensor("mm." + std::to_string(i) + ".weight"); i += 2) {
                mm_deep_.push_back(w.linear("mm." + std::to_string(i), out, out, false));
            }
            if (deep_proj_ && mm_deep_.empty()) format_error(w.path() + ": mlp_deep without mm.2");
            hp.n_embd_out = static_cast<int32_t>(out);
            return;
        }
        const char * second = norm_proj_ ? "mm.3.weight" : "mm.2.weight";
        std::vector<int64_t> m2 = w.shape_of(second);
        if (m2.size() != 2) format_error(w.path() + ": missing or malformed tensor " + std::string(second));
        const int64_t out = m2[1];
        if (!norm_proj_) {
            mm_b_ = w.linear("mm.2", mid, out, false);
        } else {
            mm_norm1_ = w.norm("mm.1", mid, true);
            mm_b_ = w.linear("mm.3", mid, out, false);
            mm_norm2_ = w.norm("mm.4", out, true);
        }
        if (out <= 0 || out > (1 << 20)) format_error("projector output width is out of range");
        hp.n_embd_out = static_cast<int32_t>(out);
    }

    bool norm_proj_ = false, linear_proj_ = false, deep_proj_ = false, down_proj_ = false;
    std::vector<Linear> mm_deep_;  // mlp_deep: mm.2, mm.4, ...
    int64_t H_ = 0, F_ = 0, n_head_ = 0;
    float eps_ = 1e-5f;
    std::vector<int32_t> features_;  // hidden_states indices, ascending
    VitEmbedWeights embed_;
    Norm pre_ln_;
    std::vector<PreLnBlock> layers_;
    Linear mm_a_, mm_b_;
    Norm mm_norm1_, mm_norm2_;
};

}  // namespace

std::unique_ptr<Family> make_clip_family() { return std::make_unique<ClipFamily>(); }

}  // namespace mmv
