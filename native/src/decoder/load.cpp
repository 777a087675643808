// Loading the cross-attention decoder (IDEFICS text GGUF, docs/idefics-gguf.md): keys, tensor
// declarations with shape checks (WeightLoader), device choice and weight upload.
#include "../gguf_io.h"
#include "../internal.h"
#include "../loader.h"
#include "decoder.h"

#include "gguf.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <thread>

namespace mmd {
namespace {

using mmv::Error;
using mmv::format_error;
using mmv::Store;

class DecoderLoader {
  public:
    DecoderLoader(const char * path, const mmd_model_params & p) : path_(path), params_(p) {}

    std::unique_ptr<mmd_model> run() {
        file_ = mmv::open_gguf(path_);
        auto model = std::make_unique<mmd_model>();
        m_ = model.get();
        const size_t n_max = 64 + static_cast<size_t>(gguf_get_n_tensors(file_.g.get()));
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * n_max;
        ip.no_alloc = true;
        m_->ctx_w.reset(ggml_init(ip));
        if (!m_->ctx_w) throw Error(MMV_ERR_OUT_OF_MEMORY, "cannot create the weight context");
        mmv::WeightLoader w(path_, file_.g.get(), file_.meta.get(), m_->ctx_w.get());
        read(w);
        m_->device = mmv::pick_device(params_.device);
        m_->device_name = ggml_backend_dev_name(m_->device);
        m_->n_threads = mmv::thread_count(params_.n_threads);
        m_->buf_w = mmv::upload_weights(file_, m_->ctx_w.get(), m_->device, w.pending());
        return model;
    }

  private:
    void read(mmv::WeightLoader & w) {
        const std::string arch = w.get_str("general.architecture", "");
        if (arch != "llama") {
            format_error(path_ + " is not an IDEFICS text model: its architecture is '" + arch + "', expected 'llama'");
        }
        Hparams & hp = m_->hp;
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

        std::vector<int64_t> emb = w.shape_of("token_embd.weight");
        if (emb.size() != 2 || emb[0] != hp.n_embd) format_error(path_ + ": missing or malformed token_embd.weight");
        hp.n_vocab = static_cast<int32_t>(emb[1]);
        const int64_t E = hp.n_embd, EKV = hp.n_embd_kv(), F = hp.n_ff, V = hp.n_vocab;
        m_->tok_embd = w.declare("token_embd.weight", {E, V}, true, Store::AsIs);
        m_->output_norm = w.declare("output_norm.weight", {E}, true, Store::F32);
        m_->output = w.declare("output.weight", {E, V}, true, Store::AsIs);
        if (!w.has_tensor("blk.0.xattn_q.weight")) {
            format_error(path_ + " has no gated cross-attention blocks (blk.N.xattn_*): it is a plain Llama "
                                 "model, run it with llama.cpp");
        }
        m_->layers.resize(static_cast<size_t>(hp.n_layer));
        for (int32_t il = 0; il < hp.n_layer; ++il) {
            Layer & L = m_->layers[static_cast<size_t>(il)];
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
            if (ks.size() != 2 || ks[1] != E) format_error(path_ + ": malformed " + p + "xattn_k.weight");
            if (hp.n_embd_image == 0) hp.n_embd_image = static_cast<int32_t>(ks[0]);
            if (ks[0] != hp.n_embd_image) format_error(path_ + ": cross-attention blocks read different image widths");
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
            if ((x.q_norm == nullptr) != (x.k_norm == nullptr)) format_error(path_ + ": only one of the qk norms in " + p);
            for (auto [name, dst] : {std::pair<const char *, ggml_tensor **>{"xattn_alpha", &x.alpha_attn},
                                     std::pair<const char *, ggml_tensor **>{"xffn_alpha", &x.alpha_ffn}}) {
                std::vector<int64_t> s = w.shape_of(p + name);
                if (s.empty() || (s[0] != 1 && s[0] != E) || s.size() > 1) {
                    format_error(path_ + ": missing or malformed " + p + name + " (1 or " + std::to_string(E) + " values)");
                }
                *dst = w.declare(p + name, {s[0]}, true, Store::F32);
            }
            x.ffn_norm = w.declare(p + "xffn_norm.weight", {E}, true, Store::F32);
            x.gate = w.declare(p + "xffn_gate.weight", {E, F}, true, Store::AsIs);
            x.up = w.declare(p + "xffn_up.weight", {E, F}, true, Store::AsIs);
            x.down = w.declare(p + "xffn_down.weight", {F, E}, true, Store::AsIs);
            L.xblock = static_cast<int32_t>(m_->xblocks.size());
            m_->xblocks.push_back(x);
        }
    }

    std::string path_;
    mmd_model_params params_;
    mmv::GgufFile file_;
    mmd_model * m_ = nullptr;
};

}  // namespace

void apply_n_threads(ggml_backend_t b, int32_t n_threads) { mmv::set_cpu_threads(b, n_threads); }

}  // namespace mmd

extern "C" {

int32_t mmd_abi_version(void) { return MMD_ABI_VERSION; }

mmd_model_params mmd_model_default_params(void) {
    mmd_model_params p{};
    p.device = nullptr;
    p.n_threads = 0;
    return p;
}

mmv_status mmd_model_load(const char * path, const mmd_model_params * params, mmd_model ** out) {
    if (out == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (path == nullptr || *path == '\0') return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "path is empty");
    const mmd_model_params p = params ? *params : mmd_model_default_params();
    return mmv::guarded("loading " + std::string(path), [&]() {
        mmd::DecoderLoader loader(path, p);
        *out = loader.run().release();
        return MMV_OK;
    });
}

void mmd_model_free(mmd_model * model) {
    try {
        delete model;
    } catch (...) {
    }
}

mmv_status mmd_model_get_info(const mmd_model * model, mmd_model_info * out) {
    if (model == nullptr || out == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "NULL argument");
    std::memset(out, 0, sizeof(*out));
    const mmd::Hparams & hp = model->hp;
    std::snprintf(out->architecture, sizeof(out->architecture), "%s", "idefics");
    std::snprintf(out->device, sizeof(out->device), "%s", model->device_name.c_str());
    out->n_vocab = hp.n_vocab;
    out->n_embd = hp.n_embd;
    out->n_layer = hp.n_layer;
    out->n_head = hp.n_head;
    out->n_head_kv = hp.n_head_kv;
    out->n_ff = hp.n_ff;
    out->n_ctx_train = hp.n_ctx_train;
    out->n_cross = static_cast<int32_t>(model->xblocks.size());
    out->n_embd_image = hp.n_embd_image;
    return MMV_OK;
}

}  // extern "C"
