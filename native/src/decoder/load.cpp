// Loading the cross-attention decoder: the architecture picks the weight declarations
// (load_idefics / load_openflamingo, with shape checks through WeightLoader), then device
// choice and weight upload.
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
        if (arch == "llama") {
            load_idefics(w, *m_, path_);
        } else if (arch == "gptneox" || arch == "mpt") {
            load_openflamingo(w, *m_, path_);
        } else {
            format_error(path_ + " is not a cross-attention text model mmchat converted: its architecture is '" +
                         arch + "' (IDEFICS: 'llama', OpenFlamingo: 'gptneox' or 'mpt')");
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
    const char * arch = hp.arch == mmd::Arch::Idefics ? "idefics" : "openflamingo";
    std::snprintf(out->architecture, sizeof(out->architecture), "%s", arch);
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
