// MiniGPT-v2 (projector type "eva_concat"): EVA ViT -> ln_vision -> class row dropped ->
// every mmchat.vision.concat_rows consecutive patch rows concatenated into one (4 in
// MiniGPT-v2: 1024 patches of 1408 -> 256 rows of 5632) -> one linear layer (llama_proj).
// File layout: docs/vision-gguf.md.
#include "../family.h"
#include "../loader.h"

#include <cmath>

namespace mmv {
namespace {

class EvaConcatFamily final : public Family {
  public:
    void load(WeightLoader & w, Hparams & hp) override {
        hp.image_size = w.get_int_in("clip.vision.image_size", 1, 8192);
        hp.patch_size = w.get_int_in("clip.vision.patch_size", 1, 1024);
        if (hp.image_size % hp.patch_size != 0) format_error("image_size is not a multiple of patch_size");
        H_ = w.get_int_in("clip.vision.embedding_length", 1, 1 << 16);
        const int64_t F = w.get_int_in("clip.vision.feed_forward_length", 1, 1 << 18);
        const int64_t n_layer = w.get_int_in("clip.vision.block_count", 1, 1024);
        n_head_ = w.get_int_in("clip.vision.attention.head_count", 1, 4096);
        if (H_ % n_head_ != 0) format_error("clip.vision.embedding_length is not a multiple of head_count");
        eps_ = static_cast<float>(w.get_float("clip.vision.attention.layer_norm_epsilon", 1e-6));
        eps_post_ = static_cast<float>(w.get_float("clip.vision.post_ln.layer_norm_epsilon", 1e-5));
        for (float e : {eps_, eps_post_}) {
            if (!(e > 0.f) || !std::isfinite(e)) format_error("a layer_norm_epsilon is not positive");
        }
        group_ = w.get_int_in("mmchat.vision.concat_rows", 1, 64);
        if (hp.n_patches() % group_ != 0) {
            format_error("mmchat.vision.concat_rows does not divide the " + std::to_string(hp.n_patches()) +
                         " patches");
        }
        const double def_mean[3] = {0.48145466, 0.4578275, 0.40821073};
        const double def_std[3] = {0.26862954, 0.26130258, 0.27577711};
        w.image_norm(hp.image_mean, hp.image_std, def_mean, def_std);
        hp.eps = eps_;
        hp.use_gelu = true;
        hp.n_embd_vision = static_cast<int32_t>(H_);
        hp.n_layer_file = hp.n_layer_run = static_cast<int32_t>(n_layer);
        hp.n_tokens = static_cast<int32_t>(hp.n_patches() / group_);

        const int64_t P = hp.patch_size;
        embed_.patch_w = w.declare("v.patch_embd.weight", {P, P, 3, H_}, true, Store::F32);
        embed_.patch_b = w.declare("v.patch_embd.bias", {H_}, false, Store::F32);
        embed_.class_embd = w.declare("v.class_embd", {H_}, true, Store::F32);
        embed_.pos_embd = w.declare("v.position_embd.weight", {H_, hp.n_patches() + 1}, true, Store::F32);
        blocks_.resize(static_cast<size_t>(n_layer));
        for (int64_t il = 0; il < n_layer; ++il) {
            PreLnBlock & L = blocks_[static_cast<size_t>(il)];
            const std::string p = "v.blk." + std::to_string(il) + ".";
            L.ln1 = w.norm(p + "ln1", H_, true);
            L.ln2 = w.norm(p + "ln2", H_, true);
            L.attn.q = w.linear(p + "attn_q", H_, H_, false);
            L.attn.k = w.linear(p + "attn_k", H_, H_, false);
            L.attn.v = w.linear(p + "attn_v", H_, H_, false);
            L.attn.o = w.linear(p + "attn_out", H_, H_, true);
            L.fc1 = w.linear(p + "ffn_up", H_, F, true);
            L.fc2 = w.linear(p + "ffn_down", F, H_, true);
        }
        post_ln_ = w.norm("v.post_ln", H_, true);
        std::vector<int64_t> ms = w.shape_of("mm.proj.weight");
        if (ms.size() != 2 || ms[0] != H_ * group_) {
            format_error(w.path() + ": mm.proj.weight must read " + std::to_string(H_ * group_) +
                         "-wide rows (concat_rows x embedding_length)");
        }
        proj_ = w.linear("mm.proj", H_ * group_, ms[1], false);
        hp.n_embd_out = static_cast<int32_t>(ms[1]);
    }

    size_t graph_size(const Hparams & hp) const override { return 48 * static_cast<size_t>(hp.n_layer_run) + 64; }

    ggml_tensor * build(ggml_context * ctx, const Hparams & hp, const GraphInputs & in, const Arith & ar) const override {
        const int64_t NP = hp.n_patches(), B = in.batch;
        ggml_tensor * x = vit_embed(ctx, embed_, in.patches, H_);
        for (const PreLnBlock & blk : blocks_) x = pre_ln_block(ctx, blk, x, n_head_, eps_, Act::Gelu, ar);
        x = apply(ctx, post_ln_, x, eps_post_);
        x = ggml_cont(ctx, ggml_view_3d(ctx, x, H_, NP, B, x->nb[1], x->nb[2], x->nb[1]));  // drop class
        x = ggml_reshape_3d(ctx, x, H_ * group_, NP / group_, B);  // consecutive rows side by side
        return apply(ctx, proj_, x);
    }

  private:
    int64_t H_ = 0, n_head_ = 0, group_ = 4;
    float eps_ = 1e-6f, eps_post_ = 1e-5f;
    VitEmbedWeights embed_;
    std::vector<PreLnBlock> blocks_;
    Norm post_ln_;
    Linear proj_;
};

}  // namespace

std::unique_ptr<Family> make_eva_concat_family() { return std::make_unique<EvaConcatFamily>(); }

}  // namespace mmv
