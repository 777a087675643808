// Loading a vision GGUF: file checks, the family its clip.projector_type names (family.cpp),
// device choice, weight upload. The family reads its keys and declares its tensors; this file
// knows nothing about any model's layout.
#include "gguf_io.h"
#include "internal.h"
#include "loader.h"
#include "model.h"

#include "gguf.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <thread>

namespace mmv {
namespace {

class Loader {
  public:
    Loader(const char * path, const mmv_model_params & params) : path_(path), params_(params) {}

    std::unique_ptr<mmv_model> run() {
        file_ = open_gguf(path_);
        auto model = std::make_unique<mmv_model>();
        model_ = model.get();
        read_family();
        const size_t n_max = 64 + static_cast<size_t>(gguf_get_n_tensors(file_.g.get()));
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * n_max;
        ip.no_alloc = true;
        model_->ctx_w.reset(ggml_init(ip));
        if (!model_->ctx_w) throw Error(MMV_ERR_OUT_OF_MEMORY, "cannot create the weight context");
        WeightLoader w(path_, file_.g.get(), file_.meta.get(), model_->ctx_w.get());
        Hparams & hp = model_->hp;
        model_->family->load(w, hp);
        check_common(hp);
        choose_device();
        model_->buf_w = upload_weights(file_, model_->ctx_w.get(), model_->device, w.pending());
        model_->max_batch = std::max(1, params_.max_batch);
        mmv_status st = build_and_reserve(*model_);
        if (st != MMV_OK) throw Error(st, mmv_last_error());
        return model;
    }

  private:
    void read_family() {
        WeightLoader k(path_, file_.g.get(), file_.meta.get(), nullptr);
        std::string arch = k.get_str("general.architecture", "");
        if (arch != "clip") {
            format_error(path_ + " is not a vision projector (mmproj) file: its architecture is '" + arch +
                         "', expected 'clip'");
        }
        if (!k.get_bool("clip.has_vision_encoder", true)) unsupported(path_ + " has no vision encoder");
        const bool has_llava = k.get_bool("clip.has_llava_projector", false);
        std::string proj = k.get_str("clip.projector_type", has_llava ? "mlp" : "");
        if (proj.empty()) format_error(path_ + ": missing key clip.projector_type");
        std::string known;
        model_->family = make_family(proj, &known);
        if (!model_->family) {
            unsupported("projector type '" + proj + "' is not one libmmvision runs (" + known + ")");
        }
        model_->hp.projector_name = proj;
        model_->hp.fast_math = (params_.flags & MMV_FLAG_FAST_MATH) != 0;
        model_->hp.no_flash_attn = (params_.flags & MMV_FLAG_NO_FLASH_ATTN) != 0;
    }

    void check_common(const Hparams & hp) {
        if (hp.image_size <= 0 || hp.patch_size <= 0 || hp.image_size % hp.patch_size != 0) {
            format_error(path_ + ": image_size must be a positive multiple of patch_size");
        }
        if (hp.n_tokens <= 0 || hp.n_embd_out <= 0) format_error(path_ + ": the model produces no embeddings");
        if (params_.expected_n_embd > 0 && params_.expected_n_embd != hp.n_embd_out) {
            format_error("the projector outputs " + std::to_string(hp.n_embd_out) +
                         "-wide embeddings but the language model's width is " +
                         std::to_string(params_.expected_n_embd) + " (mmproj and model do not match)");
        }
    }

    void choose_device() {
        ggml_backend_dev_t dev = pick_device(params_.device);
        model_->device = dev;
        model_->device_name = ggml_backend_dev_name(dev);
        model_->backend.reset(ggml_backend_dev_init(dev, nullptr));
        if (!model_->backend) throw Error(MMV_ERR_BACKEND, "cannot initialise device " + model_->device_name);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
            ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
            if (!cpu) throw Error(MMV_ERR_BACKEND, "no CPU backend is available");
            model_->backend_cpu.reset(ggml_backend_dev_init(cpu, nullptr));
            if (!model_->backend_cpu) throw Error(MMV_ERR_BACKEND, "cannot initialise the CPU backend");
        }
        model_->n_threads = thread_count(params_.n_threads);
        apply_n_threads(*model_);
    }

    std::string path_;
    mmv_model_params params_;
    GgufFile file_;
    mmv_model * model_ = nullptr;
};

}  // namespace

void apply_n_threads(mmv_model & model) {
    set_cpu_threads(model.backend.get(), model.n_threads);
    set_cpu_threads(model.backend_cpu.get(), model.n_threads);
}

}  // namespace mmv

extern "C" {

mmv_model_params mmv_model_default_params(void) {
    mmv_model_params p{};
    p.device = nullptr;
    p.n_threads = 0;
    p.expected_n_embd = 0;
    p.max_batch = 1;
    p.flags = 0;
    return p;
}

mmv_status mmv_model_load(const char * path, const mmv_model_params * params, mmv_model ** out) {
    if (out == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (path == nullptr || *path == '\0') return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "path is empty");
    const mmv_model_params p = params ? *params : mmv_model_default_params();
    return mmv::guarded("loading " + std::string(path), [&]() {
        mmv::Loader loader(path, p);
        *out = loader.run().release();
        return MMV_OK;
    });
}

void mmv_model_free(mmv_model * model) {
    try {
        delete model;
    } catch (...) {
    }
}

mmv_status mmv_model_get_info(const mmv_model * model, mmv_model_info * out) {
    if (model == nullptr || out == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "NULL argument");
    std::memset(out, 0, sizeof(*out));
    const mmv::Hparams & hp = model->hp;
    std::snprintf(out->projector_type, sizeof(out->projector_type), "%s", hp.projector_name.c_str());
    std::snprintf(out->device, sizeof(out->device), "%s", model->device_name.c_str());
    out->image_size = hp.image_size;
    out->patch_size = hp.patch_size;
    out->n_tokens = hp.n_tokens;
    out->n_embd = hp.n_embd_out;
    out->n_embd_vision = hp.n_embd_vision;
    out->n_layer_file = hp.n_layer_file;
    out->n_layer_run = hp.n_layer_run;
    out->legacy_layout = hp.legacy_layout ? 1 : 0;
    out->ffn_swapped = hp.ffn_swapped ? 1 : 0;
    out->use_gelu = hp.use_gelu ? 1 : 0;
    for (int i = 0; i < 3; ++i) {
        out->image_mean[i] = hp.image_mean[i];
        out->image_std[i] = hp.image_std[i];
    }
    out->eps = hp.eps;
    out->flash_attn = model->flash_attn ? 1 : 0;
    out->text_input = hp.text_input;
    out->n_text_max = hp.n_text_max;
    out->n_text_vocab = hp.n_text_vocab;
    return MMV_OK;
}

mmv_status mmv_model_set_n_threads(mmv_model * model, int32_t n_threads) {
    if (model == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "model is NULL");
    try {
        std::lock_guard<std::mutex> lock(model->mutex);
        model->n_threads = n_threads > 0 ? n_threads
                                         : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
        mmv::apply_n_threads(*model);
        return MMV_OK;
    } catch (...) {
        return mmv::fail(MMV_ERR_INTERNAL, "cannot set the thread count");
    }
}

}  // extern "C"
