// BLIP-2 / InstructBLIP (projector type "qformer"): EVA ViT + ln_vision + Q-Former + language
// projection, as transformers' Blip2ForConditionalGeneration / InstructBlipForConditional-
// Generation compute it (file layout: docs/vision-gguf.md).
//
// Per image:
//   EVA ViT   x = [class; patches] + positions; pre-LN blocks (q/v biases, k bias 0, exact
//             GELU); no final norm of its own; ln_vision (v.post_ln) on all 1 + n_patches rows.
//   Q-Former  BERT, post-LN. Input: the learned queries (BLIP-2), or [queries; instruction
//             token + position embeddings] (InstructBLIP), LayerNorm'd. Each layer:
//               x = LN(x + attn(x))                       self-attention over all rows
//               q = LN(q + cross(q, image))               every cross_attention_frequency-th
//                                                         layer, queries only
//               q = LN(q + ffn_q(q)); t = LN(t + ffn_t(t)) separate FFNs for queries / text
//   output    language_projection(queries) -> [n_embd, n_query].
// The instruction is the same for every image of one call (one mmv_encode_text).
#include "../family.h"
#include "../loader.h"

#include <cmath>

namespace mmv {
namespace {

struct BertSub {  // one post-LN sub-layer: LN(x + out(core(x)))
    AttnWeights attn;
    Norm ln;
};
struct BertFfn {
    Linear up, down;
    Norm ln;
};
struct QfLayer {
    BertSub self;
    bool has_cross = false;
    BertSub cross;
    BertFfn ffn_q;
    BertFfn ffn_t;  // InstructBLIP only
};

class QformerFamily final : public Family {
  public:
    void load(WeightLoader & w, Hparams & hp) override {
        // EVA ViT
        hp.image_size = w.get_int_in("clip.vision.image_size", 1, 8192);
        hp.patch_size = w.get_int_in("clip.vision.patch_size", 1, 1024);
        if (hp.image_size % hp.patch_size != 0) format_error("image_size is not a multiple of patch_size");
        Hv_ = w.get_int_in("clip.vision.embedding_length", 1, 1 << 16);
        Fv_ = w.get_int_in("clip.vision.feed_forward_length", 1, 1 << 18);
        nv_layer_ = w.get_int_in("clip.vision.block_count", 1, 1024);
        nv_head_ = w.get_int_in("clip.vision.attention.head_count", 1, 4096);
        if (Hv_ % nv_head_ != 0) format_error("clip.vision.embedding_length is not a multiple of head_count");
        eps_v_ = static_cast<float>(w.get_float("clip.vision.attention.layer_norm_epsilon", 1e-6));
        eps_ln_vision_ = static_cast<float>(w.get_float("qformer.ln_vision.layer_norm_epsilon", eps_v_));
        const double def_mean[3] = {0.48145466, 0.4578275, 0.40821073};
        const double def_std[3] = {0.26862954, 0.26130258, 0.27577711};
        w.image_norm(hp.image_mean, hp.image_std, def_mean, def_std);
        hp.eps = eps_v_;
        hp.use_gelu = true;
        hp.n_embd_vision = static_cast<int32_t>(Hv_);
        hp.n_layer_file = hp.n_layer_run = static_cast<int32_t>(nv_layer_);

        // Q-Former
        D_ = w.get_int_in("qformer.embedding_length", 1, 1 << 16);
        Fq_ = w.get_int_in("qformer.feed_forward_length", 1, 1 << 18);
        nq_layer_ = w.get_int_in("qformer.block_count", 1, 1024);
        nq_head_ = w.get_int_in("qformer.attention.head_count", 1, 4096);
        if (D_ % nq_head_ != 0) format_error("qformer.embedding_length is not a multiple of head_count");
        eps_q_ = static_cast<float>(w.get_float("qformer.attention.layer_norm_epsilon", 1e-12));
        cross_freq_ = w.get_int_in("qformer.cross_attention_frequency", 1, 1024);
        n_query_ = w.get_int_in("qformer.query_count", 1, 4096);
        text_ = w.get_bool("qformer.text_input", false);
        for (float e : {eps_v_, eps_ln_vision_, eps_q_}) {
            if (!(e > 0.f) || !std::isfinite(e)) format_error("a layer_norm_epsilon is not positive");
        }
        hp.n_tokens = static_cast<int32_t>(n_query_);
        declare(w, hp);
    }

    size_t graph_size(const Hparams &) const override {
        return 48 * static_cast<size_t>(nv_layer_) + 96 * static_cast<size_t>(nq_layer_) + 256;
    }

    ggml_tensor * build(ggml_context * ctx, const Hparams & hp, const GraphInputs & in, const Arith & ar) const override {
        const int64_t B = in.batch, NQ = n_query_, D = D_;
        // EVA ViT + ln_vision
        ggml_tensor * img = vit_embed(ctx, embed_, in.patches, Hv_);
        for (const PreLnBlock & blk : vit_) img = pre_ln_block(ctx, blk, img, nv_head_, eps_v_, Act::Gelu, ar);
        img = apply(ctx, ln_vision_, img, eps_ln_vision_, ar);  // [Hv, 1 + NP, B]

        // Q-Former input rows
        ggml_tensor * x = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, query_, D, NQ, 1), D, NQ, B, 1);
        int64_t NT = 0;
        if (text_) {
            NT = in.n_text;
            ggml_tensor * t = ggml_get_rows(ctx, tok_embd_, in.text);  // [D, NT]
            ggml_tensor * pos = ggml_view_2d(ctx, pos_embd_, D, NT, pos_embd_->nb[1], 0);
            t = ggml_add(ctx, t, pos);
            t = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, t, D, NT, 1), D, NT, B, 1);
            x = ggml_concat(ctx, x, t, 1);  // [D, NQ + NT, B]
        }
        x = apply(ctx, embd_ln_, x, eps_q_, ar);

        for (size_t il = 0; il < layers_.size(); ++il) {
            const QfLayer & L = layers_[il];
            const bool last = il + 1 == layers_.size();
            x = apply(ctx, L.self.ln, ggml_add(ctx, x, mha(ctx, L.self.attn, x, nullptr, nq_head_, ar)), eps_q_, ar);
            ggml_tensor * q = x;
            ggml_tensor * t = nullptr;
            if (NT > 0) {
                q = ggml_cont(ctx, ggml_view_3d(ctx, x, D, NQ, B, x->nb[1], x->nb[2], 0));
                if (!last) {  // the text rows of the last layer are never read
                    t = ggml_cont(ctx, ggml_view_3d(ctx, x, D, NT, B, x->nb[1], x->nb[2], x->nb[1] * NQ));
                }
            }
            if (L.has_cross) {
                q = apply(ctx, L.cross.ln, ggml_add(ctx, q, mha(ctx, L.cross.attn, q, img, nq_head_, ar)), eps_q_, ar);
            }
            q = ffn(ctx, L.ffn_q, q, ar);
            if (t != nullptr) {
                t = ffn(ctx, L.ffn_t, t, ar);
                x = ggml_concat(ctx, q, t, 1);
            } else {
                x = q;
            }
        }
        return apply(ctx, proj_, x, ar);  // [n_embd, NQ, B]
    }

  private:
    ggml_tensor * ffn(ggml_context * ctx, const BertFfn & f, ggml_tensor * x, const Arith & ar) const {
        ggml_tensor * h = apply(ctx, f.down, gelu(ctx, apply(ctx, f.up, x, ar), ar), ar);
        return apply(ctx, f.ln, ggml_add(ctx, x, h), eps_q_, ar);
    }

    void declare(WeightLoader & w, Hparams & hp) {
        const int64_t H = Hv_, F = Fv_, P = hp.patch_size, D = D_;
        embed_.patch_w = w.declare("v.patch_embd.weight", {P, P, 3, H}, true, Store::F32);
        embed_.patch_b = w.declare("v.patch_embd.bias", {H}, false, Store::F32);
        embed_.class_embd = w.declare("v.class_embd", {H}, true, Store::F32);
        embed_.pos_embd = w.declare("v.position_embd.weight", {H, hp.n_patches() + 1}, true, Store::F32);
        vit_.resize(static_cast<size_t>(nv_layer_));
        for (int64_t il = 0; il < nv_layer_; ++il) {
            PreLnBlock & L = vit_[static_cast<size_t>(il)];
            const std::string p = "v.blk." + std::to_string(il) + ".";
            L.ln1 = w.norm(p + "ln1", H, true);
            L.ln2 = w.norm(p + "ln2", H, true);
            L.attn.q = w.linear(p + "attn_q", H, H, false);
            L.attn.k = w.linear(p + "attn_k", H, H, false);  // EVA: no k bias
            L.attn.v = w.linear(p + "attn_v", H, H, false);
            L.attn.o = w.linear(p + "attn_out", H, H, true);
            L.fc1 = w.linear(p + "ffn_up", H, F, true);
            L.fc2 = w.linear(p + "ffn_down", F, H, true);
        }
        ln_vision_ = w.norm("v.post_ln", H, true);

        std::vector<int64_t> qs = w.shape_of("qf.query_embd");
        if (qs.size() != 2 || qs[0] != D || qs[1] != n_query_) {
            format_error(w.path() + ": tensor qf.query_embd must have shape [" + std::to_string(D) + ", " +
                         std::to_string(n_query_) + "]");
        }
        query_ = w.declare("qf.query_embd", {D, n_query_}, true, Store::F32);
        embd_ln_ = w.norm("qf.embd_ln", D, true);
        if (text_) {
            std::vector<int64_t> ts = w.shape_of("qf.token_embd.weight");
            std::vector<int64_t> ps = w.shape_of("qf.position_embd.weight");
            if (ts.size() != 2 || ps.size() != 2) {
                format_error(w.path() + ": an instruction-reading Q-Former needs qf.token_embd.weight and "
                                        "qf.position_embd.weight");
            }
            tok_embd_ = w.declare("qf.token_embd.weight", {D, ts[1]}, true, Store::AsIs);
            pos_embd_ = w.declare("qf.position_embd.weight", {D, ps[1]}, true, Store::F32);
            const int64_t max_len = w.get_int("qformer.text.max_length", ps[1]);
            if (max_len < 1 || max_len > ps[1]) format_error("qformer.text.max_length exceeds the position table");
            hp.text_input = 1;
            hp.n_text_max = static_cast<int32_t>(max_len);
            hp.n_text_vocab = static_cast<int32_t>(ts[1]);
        }
        layers_.resize(static_cast<size_t>(nq_layer_));
        for (int64_t il = 0; il < nq_layer_; ++il) {
            QfLayer & L = layers_[static_cast<size_t>(il)];
            const std::string p = "qf.blk." + std::to_string(il) + ".";
            L.self.attn.q = w.linear(p + "attn_q", D, D, true);
            L.self.attn.k = w.linear(p + "attn_k", D, D, true);
            L.self.attn.v = w.linear(p + "attn_v", D, D, true);
            L.self.attn.o = w.linear(p + "attn_out", D, D, true);
            L.self.ln = w.norm(p + "attn_ln", D, true);
            L.has_cross = il % cross_freq_ == 0;
            if (L.has_cross) {
                L.cross.attn.q = w.linear(p + "cross_q", D, D, true);
                L.cross.attn.k = w.linear(p + "cross_k", H, D, true);
                L.cross.attn.v = w.linear(p + "cross_v", H, D, true);
                L.cross.attn.o = w.linear(p + "cross_out", D, D, true);
                L.cross.ln = w.norm(p + "cross_ln", D, true);
            }
            L.ffn_q.up = w.linear(p + "ffn_up", D, Fq_, true);
            L.ffn_q.down = w.linear(p + "ffn_down", Fq_, D, true);
            L.ffn_q.ln = w.norm(p + "ffn_ln", D, true);
            if (text_) {
                L.ffn_t.up = w.linear(p + "txt_ffn_up", D, Fq_, true);
                L.ffn_t.down = w.linear(p + "txt_ffn_down", Fq_, D, true);
                L.ffn_t.ln = w.norm(p + "txt_ffn_ln", D, true);
            }
        }
        std::vector<int64_t> ms = w.shape_of("mm.proj.weight");
        if (ms.size() != 2 || ms[0] != D) {
            format_error(w.path() + ": missing or malformed tensor mm.proj.weight (the language projection)");
        }
        proj_ = w.linear("mm.proj", D, ms[1], true);
        hp.n_embd_out = static_cast<int32_t>(ms[1]);
    }

    int64_t Hv_ = 0, Fv_ = 0, nv_layer_ = 0, nv_head_ = 0;
    int64_t D_ = 0, Fq_ = 0, nq_layer_ = 0, nq_head_ = 0, cross_freq_ = 2, n_query_ = 0;
    float eps_v_ = 1e-6f, eps_ln_vision_ = 1e-6f, eps_q_ = 1e-12f;
    bool text_ = false;
    VitEmbedWeights embed_;
    std::vector<PreLnBlock> vit_;
    Norm ln_vision_;
    ggml_tensor * query_ = nullptr;
    ggml_tensor * tok_embd_ = nullptr;
    ggml_tensor * pos_embd_ = nullptr;
    Norm embd_ln_;
    std::vector<QfLayer> layers_;
    Linear proj_;
};

}  // namespace

std::unique_ptr<Family> make_qformer_family() { return std::make_unique<QformerFamily>(); }

}  // namespace mmv
