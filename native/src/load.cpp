// Loading an mmproj GGUF: keys, tensor checks, legacy layout, device choice, weight upload.
//
// Two layouts of the same CLIP ViT + LLaVA projector exist in the wild.
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
#include "internal.h"
#include "model.h"

#include "gguf.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <thread>

namespace mmv {
namespace {

// An error with a status, thrown inside the loader and turned into (status, message) at the
// C boundary.
struct Error : std::runtime_error {
    mmv_status status;
    Error(mmv_status s, const std::string & m) : std::runtime_error(m), status(s) {}
};

[[noreturn]] void format_error(const std::string & m) { throw Error(MMV_ERR_FORMAT, m); }

struct GgufDeleter {
    void operator()(gguf_context * g) const { gguf_free(g); }
};
using gguf_ptr = std::unique_ptr<gguf_context, GgufDeleter>;

struct FileCloser {
    void operator()(FILE * f) const { std::fclose(f); }
};
using file_ptr = std::unique_ptr<FILE, FileCloser>;

bool is_int_type(gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

int64_t int_at(gguf_type t, const void * data, size_t i) {
    switch (t) {
        case GGUF_TYPE_UINT8: return static_cast<const uint8_t *>(data)[i];
        case GGUF_TYPE_INT8: return static_cast<const int8_t *>(data)[i];
        case GGUF_TYPE_UINT16: return static_cast<const uint16_t *>(data)[i];
        case GGUF_TYPE_INT16: return static_cast<const int16_t *>(data)[i];
        case GGUF_TYPE_UINT32: return static_cast<const uint32_t *>(data)[i];
        case GGUF_TYPE_INT32: return static_cast<const int32_t *>(data)[i];
        case GGUF_TYPE_UINT64: return static_cast<int64_t>(static_cast<const uint64_t *>(data)[i]);
        case GGUF_TYPE_INT64: return static_cast<const int64_t *>(data)[i];
        default: return 0;
    }
}

// Typed key readers that never trip gguf's type assertions.
class Keys {
  public:
    explicit Keys(const gguf_context * g) : g_(g) {}

    bool has(const char * key) const { return gguf_find_key(g_, key) >= 0; }

    int64_t get_int(const char * key) const {
        int64_t id = require(key);
        gguf_type t = gguf_get_kv_type(g_, id);
        if (!is_int_type(t)) format_error(std::string("key ") + key + " is not an integer");
        return int_at(t, gguf_get_val_data(g_, id), 0);
    }

    int64_t get_int(const char * key, int64_t fallback) const {
        return has(key) ? get_int(key) : fallback;
    }

    double get_float(const char * key, double fallback) const {
        int64_t id = gguf_find_key(g_, key);
        if (id < 0) return fallback;
        gguf_type t = gguf_get_kv_type(g_, id);
        if (t == GGUF_TYPE_FLOAT32) return gguf_get_val_f32(g_, id);
        if (t == GGUF_TYPE_FLOAT64) return gguf_get_val_f64(g_, id);
        if (is_int_type(t)) return static_cast<double>(int_at(t, gguf_get_val_data(g_, id), 0));
        format_error(std::string("key ") + key + " is not a number");
    }

    bool get_bool(const char * key, bool fallback) const {
        int64_t id = gguf_find_key(g_, key);
        if (id < 0) return fallback;
        gguf_type t = gguf_get_kv_type(g_, id);
        if (t == GGUF_TYPE_BOOL) return gguf_get_val_bool(g_, id);
        if (is_int_type(t)) return int_at(t, gguf_get_val_data(g_, id), 0) != 0;
        format_error(std::string("key ") + key + " is not a boolean");
    }

    std::string get_str(const char * key, const std::string & fallback) const {
        int64_t id = gguf_find_key(g_, key);
        if (id < 0) return fallback;
        if (gguf_get_kv_type(g_, id) != GGUF_TYPE_STRING) {
            format_error(std::string("key ") + key + " is not a string");
        }
        const char * s = gguf_get_val_str(g_, id);
        return s ? s : "";
    }

    std::vector<double> get_float_array(const char * key) const {
        int64_t id = gguf_find_key(g_, key);
        std::vector<double> out;
        if (id < 0) return out;
        if (gguf_get_kv_type(g_, id) != GGUF_TYPE_ARRAY) {
            format_error(std::string("key ") + key + " is not an array");
        }
        gguf_type t = gguf_get_arr_type(g_, id);
        size_t n = gguf_get_arr_n(g_, id);
        if (n > 0 && (t == GGUF_TYPE_STRING || t == GGUF_TYPE_ARRAY || t == GGUF_TYPE_BOOL)) {
            format_error(std::string("key ") + key + " is not a numeric array");
        }
        const void * data = n > 0 ? gguf_get_arr_data(g_, id) : nullptr;
        for (size_t i = 0; i < n; ++i) {
            if (t == GGUF_TYPE_FLOAT32) out.push_back(static_cast<const float *>(data)[i]);
            else if (t == GGUF_TYPE_FLOAT64) out.push_back(static_cast<const double *>(data)[i]);
            else out.push_back(static_cast<double>(int_at(t, data, i)));
        }
        return out;
    }

  private:
    int64_t require(const char * key) const {
        int64_t id = gguf_find_key(g_, key);
        if (id < 0) format_error(std::string("missing key ") + key);
        return id;
    }
    const gguf_context * g_;
};

std::string lower(std::string s) {
    for (auto & c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

std::string shape_str(const std::vector<int64_t> & ne) {
    std::string s = "[";
    for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

// How a tensor is kept on the device.
enum class Store { AsIs, F32 };

struct Pending {
    ggml_tensor * dst;    // tensor in the weight context
    int64_t gguf_id;      // source in the file
    Store store;
};

class Loader {
  public:
    Loader(const char * path, const mmv_model_params & params) : path_(path), params_(params) {}

    std::unique_ptr<mmv_model> run() {
        open_file();
        read_hparams();
        auto model = std::make_unique<mmv_model>();
        model_ = model.get();
        declare_tensors();
        choose_device();
        upload();
        model_->max_batch = std::max(1, params_.max_batch);
        mmv_status st = build_and_reserve(*model_);
        if (st != MMV_OK) throw Error(st, mmv_last_error());
        return model;
    }

  private:
    void open_file() {
        {
            file_ptr f(std::fopen(path_.c_str(), "rb"));
            if (!f) throw Error(MMV_ERR_IO, "cannot open " + path_ + ": " + std::strerror(errno));
            if (std::fseek(f.get(), 0, SEEK_END) != 0) {
                throw Error(MMV_ERR_IO, "cannot seek in " + path_);
            }
            long sz = std::ftell(f.get());
            if (sz < 0) throw Error(MMV_ERR_IO, "cannot size " + path_);
            file_size_ = static_cast<uint64_t>(sz);
            char magic[4] = {0, 0, 0, 0};
            std::fseek(f.get(), 0, SEEK_SET);
            if (std::fread(magic, 1, 4, f.get()) != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
                format_error(path_ + " is not a GGUF file");
            }
        }
        ggml_context * meta = nullptr;
        gguf_init_params gp{};
        gp.no_alloc = true;
        gp.ctx = &meta;
        gguf_.reset(gguf_init_from_file(path_.c_str(), gp));
        meta_.reset(meta);
        if (!gguf_) format_error(path_ + " is a damaged or truncated GGUF file (header unreadable)");
        const size_t data_off = gguf_get_data_offset(gguf_.get());
        const int64_t n = gguf_get_n_tensors(gguf_.get());
        for (int64_t i = 0; i < n; ++i) {
            uint64_t end = data_off + gguf_get_tensor_offset(gguf_.get(), i) +
                           gguf_get_tensor_size(gguf_.get(), i);
            if (end > file_size_) {
                format_error(path_ + " is truncated: tensor " + gguf_get_tensor_name(gguf_.get(), i) +
                             " ends at byte " + std::to_string(end) + " but the file has " +
                             std::to_string(file_size_));
            }
        }
    }

    void read_hparams() {
        Keys k(gguf_.get());
        std::string arch = k.get_str("general.architecture", "");
        if (arch != "clip") {
            format_error(path_ + " is not a vision projector (mmproj) file: its architecture is '" +
                         arch + "', expected 'clip'");
        }
        if (!k.get_bool("clip.has_vision_encoder", true)) {
            throw Error(MMV_ERR_UNSUPPORTED, path_ + " has no vision encoder");
        }
        const bool has_llava = k.get_bool("clip.has_llava_projector", false);
        std::string proj = k.get_str("clip.projector_type", has_llava ? "mlp" : "");
        if (proj.empty()) format_error(path_ + ": missing key clip.projector_type");
        if (proj == "mlp") {
            hp_.projector = Projector::Mlp;
        } else if (proj == "mlp_norm") {
            hp_.projector = Projector::MlpNorm;
        } else {
            throw Error(MMV_ERR_UNSUPPORTED,
                        "projector type '" + proj + "' is not a LLaVA projector (mlp, mlp_norm)");
        }
        hp_.projector_name = proj;

        auto pos_int = [&](const char * key, int64_t lo, int64_t hi) {
            int64_t v = k.get_int(key);
            if (v < lo || v > hi) {
                format_error(std::string("key ") + key + " = " + std::to_string(v) +
                             " is out of range");
            }
            return static_cast<int32_t>(v);
        };
        hp_.image_size = pos_int("clip.vision.image_size", 1, 8192);
        hp_.patch_size = pos_int("clip.vision.patch_size", 1, 1024);
        hp_.n_embd = pos_int("clip.vision.embedding_length", 1, 1 << 16);
        hp_.n_ff = pos_int("clip.vision.feed_forward_length", 1, 1 << 18);
        hp_.n_layer_file = pos_int("clip.vision.block_count", 0, 1024);
        hp_.n_head = pos_int("clip.vision.attention.head_count", 1, 4096);
        hp_.eps = static_cast<float>(k.get_float("clip.vision.attention.layer_norm_epsilon", 1e-5));
        if (!(hp_.eps > 0.f) || !std::isfinite(hp_.eps)) format_error("layer_norm_epsilon is not positive");
        if (hp_.image_size % hp_.patch_size != 0) {
            format_error("image_size " + std::to_string(hp_.image_size) +
                         " is not a multiple of patch_size " + std::to_string(hp_.patch_size));
        }
        if (hp_.n_embd % hp_.n_head != 0) {
            format_error("embedding_length " + std::to_string(hp_.n_embd) +
                         " is not a multiple of head_count " + std::to_string(hp_.n_head));
        }
        hp_.use_gelu = k.get_bool("clip.use_gelu", false);
        if (k.get_bool("clip.use_silu", false)) {
            throw Error(MMV_ERR_UNSUPPORTED, "clip.use_silu is not a CLIP/LLaVA activation");
        }
        hp_.fast_math = (params_.flags & MMV_FLAG_FAST_MATH) != 0;
        hp_.no_flash_attn = (params_.flags & MMV_FLAG_NO_FLASH_ATTN) != 0;

        auto mean = k.get_float_array("clip.vision.image_mean");
        auto stdv = k.get_float_array("clip.vision.image_std");
        if (!mean.empty() && mean.size() != 3) format_error("clip.vision.image_mean must have 3 values");
        if (!stdv.empty() && stdv.size() != 3) format_error("clip.vision.image_std must have 3 values");
        const double def_mean[3] = {0.48145466, 0.4578275, 0.40821073};
        const double def_std[3] = {0.26862954, 0.26130258, 0.27577711};
        for (int i = 0; i < 3; ++i) {
            hp_.image_mean[i] = static_cast<float>(mean.empty() ? def_mean[i] : mean[i]);
            hp_.image_std[i] = static_cast<float>(stdv.empty() ? def_std[i] : stdv[i]);
            if (!(hp_.image_std[i] > 0.f)) format_error("clip.vision.image_std must be positive");
        }

        const bool has_feature = k.has("clip.vision.feature_layer");
        if (has_feature) {
            for (double v : k.get_float_array("clip.vision.feature_layer")) {
                if (v < 0 || v > hp_.n_layer_file || v != std::floor(v)) {
                    format_error("clip.vision.feature_layer " + std::to_string(static_cast<int64_t>(v)) +
                                 " is out of range (block_count " +
                                 std::to_string(hp_.n_layer_file) + ")");
                }
                hp_.feature_layers.push_back(static_cast<int32_t>(v));
            }
            std::sort(hp_.feature_layers.begin(), hp_.feature_layers.end());
            hp_.feature_layers.erase(std::unique(hp_.feature_layers.begin(), hp_.feature_layers.end()),
                                     hp_.feature_layers.end());
        }
        if (hp_.feature_layers.empty()) {
            int32_t n = has_llava ? hp_.n_layer_file : hp_.n_layer_file - 1;
            if (n < 0) format_error("block_count is 0");
            hp_.feature_layers.push_back(n);
        }
        hp_.n_layer_run = hp_.feature_layers.back();
        hp_.legacy_layout = has_llava && !has_feature;
    }

    // Look a tensor up and check its shape; returns -1 when optional and absent.
    int64_t find(const std::string & name, const std::vector<int64_t> & ne, bool required) {
        int64_t id = gguf_find_tensor(gguf_.get(), name.c_str());
        if (id < 0) {
            if (required) format_error(path_ + ": missing tensor " + name);
            return -1;
        }
        ggml_tensor * t = ggml_get_tensor(meta_.get(), name.c_str());
        if (t == nullptr) format_error(path_ + ": tensor " + name + " is unreadable");
        std::vector<int64_t> have(t->ne, t->ne + GGML_MAX_DIMS);
        std::vector<int64_t> want = ne;
        want.resize(GGML_MAX_DIMS, 1);
        if (have != want) {
            while (have.size() > 1 && have.back() == 1) have.pop_back();
            format_error(path_ + ": tensor " + name + " has shape " + shape_str(have) + ", expected " +
                         shape_str(ne));
        }
        return id;
    }

    ggml_tensor * declare(const std::string & name, const std::vector<int64_t> & ne, bool required,
                          Store store) {
        int64_t id = find(name, ne, required);
        if (id < 0) return nullptr;
        ggml_type type = store == Store::F32 ? GGML_TYPE_F32 : gguf_get_tensor_type(gguf_.get(), id);
        const ggml_type src_type = gguf_get_tensor_type(gguf_.get(), id);
        if (store == Store::F32 && src_type != GGML_TYPE_F32 && ggml_get_type_traits(src_type)->to_float == nullptr) {
            throw Error(MMV_ERR_UNSUPPORTED, "tensor " + name + " has a type that cannot be converted");
        }
        ggml_tensor * t = nullptr;
        switch (ne.size()) {
            case 1: t = ggml_new_tensor_1d(model_->ctx_w.get(), type, ne[0]); break;
            case 2: t = ggml_new_tensor_2d(model_->ctx_w.get(), type, ne[0], ne[1]); break;
            default: t = ggml_new_tensor_4d(model_->ctx_w.get(), type, ne[0], ne[1], ne[2], ne[3]); break;
        }
        ggml_set_name(t, name.c_str());
        pending_.push_back({t, id, store});
        return t;
    }

    // A matmul weight [in, out] kept in the file's type, with an optional f32 bias [out].
    void linear(const std::string & prefix, int64_t in, int64_t out, ggml_tensor *& w, ggml_tensor *& b,
                bool bias_required) {
        w = declare(prefix + ".weight", {in, out}, true, Store::AsIs);
        b = declare(prefix + ".bias", {out}, bias_required, Store::F32);
    }

    void norm(const std::string & prefix, int64_t n, ggml_tensor *& w, ggml_tensor *& b, bool required) {
        w = declare(prefix + ".weight", {n}, required, Store::F32);
        b = declare(prefix + ".bias", {n}, required && w != nullptr, Store::F32);
        if (w == nullptr && b != nullptr) format_error(path_ + ": " + prefix + ".bias without weight");
    }

    void declare_tensors() {
        const int64_t H = hp_.n_embd, F = hp_.n_ff, P = hp_.patch_size;
        const size_t n_max = 16 + 20 * static_cast<size_t>(hp_.n_layer_run);
        ggml_init_params ip{};
        ip.mem_size = ggml_tensor_overhead() * n_max;
        ip.no_alloc = true;
        model_->ctx_w.reset(ggml_init(ip));
        if (!model_->ctx_w) throw Error(MMV_ERR_OUT_OF_MEMORY, "cannot create the weight context");

        // Patch kernel: torch [hidden, 3, p, p] = ggml ne [p, p, 3, hidden]; its memory is the
        // [3*p*p, hidden] matrix the host-side im2col multiplies with.
        model_->patch_w = declare("v.patch_embd.weight", {P, P, 3, H}, true, Store::F32);
        model_->patch_b = declare("v.patch_embd.bias", {H}, false, Store::F32);
        model_->class_embd = declare("v.class_embd", {H}, true, Store::F32);
        model_->pos_embd = declare("v.position_embd.weight", {H, hp_.n_pos()}, true, Store::F32);
        norm("v.pre_ln", H, model_->pre_ln_w, model_->pre_ln_b, false);

        if (hp_.n_layer_run > hp_.n_layer_file) {
            format_error("feature layer " + std::to_string(hp_.n_layer_run) + " needs more blocks than the " +
                         std::to_string(hp_.n_layer_file) + " the file has");
        }
        model_->layers.resize(static_cast<size_t>(hp_.n_layer_run));
        Keys k(gguf_.get());
        const bool has_feature = k.has("clip.vision.feature_layer");
        const bool has_llava = k.get_bool("clip.has_llava_projector", false);
        for (int32_t il = 0; il < hp_.n_layer_run; ++il) {
            auto & L = model_->layers[static_cast<size_t>(il)];
            const std::string p = "v.blk." + std::to_string(il) + ".";
            norm(p + "ln1", H, L.ln1_w, L.ln1_b, true);
            norm(p + "ln2", H, L.ln2_w, L.ln2_b, true);
            linear(p + "attn_q", H, H, L.q_w, L.q_b, false);
            linear(p + "attn_k", H, H, L.k_w, L.k_b, false);
            linear(p + "attn_v", H, H, L.v_w, L.v_b, false);
            linear(p + "attn_out", H, H, L.o_w, L.o_b, false);

            // FFN: which stored name is fc1 (hidden -> n_ff)?
            const std::string up = p + "ffn_up", down = p + "ffn_down";
            ggml_tensor * up_meta = ggml_get_tensor(meta_.get(), (up + ".weight").c_str());
            bool swapped = false;
            if (up_meta == nullptr) {
                format_error(path_ + ": missing tensor " + up + ".weight");
            } else if (H != F) {
                swapped = up_meta->ne[0] == F && up_meta->ne[1] == H;
            } else {
                swapped = has_llava && !has_feature;
            }
            if (il == 0) hp_.ffn_swapped = swapped;
            else if (swapped != hp_.ffn_swapped) format_error(path_ + ": inconsistent FFN layout in " + p);
            linear(swapped ? down : up, H, F, L.fc1_w, L.fc1_b, false);
            linear(swapped ? up : down, F, H, L.fc2_w, L.fc2_b, false);
        }

        // Projector. mm.0: [H * n_features, mid]; mlp: mm.2 [mid, out]; mlp_norm: mm.1 LN(mid),
        // mm.3 [mid, out], mm.4 LN(out).
        const int64_t in_w = H * static_cast<int64_t>(hp_.feature_layers.size());
        ggml_tensor * m0 = ggml_get_tensor(meta_.get(), "mm.0.weight");
        if (m0 == nullptr) format_error(path_ + ": missing tensor mm.0.weight");
        const int64_t mid = m0->ne[1];
        linear("mm.0", in_w, mid, model_->mm_a_w, model_->mm_a_b, false);
        const char * second = hp_.projector == Projector::Mlp ? "mm.2.weight" : "mm.3.weight";
        ggml_tensor * m2 = ggml_get_tensor(meta_.get(), second);
        if (m2 == nullptr) format_error(path_ + ": missing tensor " + second);
        const int64_t out = m2->ne[1];
        if (hp_.projector == Projector::Mlp) {
            linear("mm.2", mid, out, model_->mm_b_w, model_->mm_b_b, false);
        } else {
            norm("mm.1", mid, model_->mm_norm1_w, model_->mm_norm1_b, true);
            linear("mm.3", mid, out, model_->mm_b_w, model_->mm_b_b, false);
            norm("mm.4", out, model_->mm_norm2_w, model_->mm_norm2_b, true);
        }
        if (out <= 0 || out > (1 << 20)) format_error("projector output width is out of range");
        hp_.n_embd_out = static_cast<int32_t>(out);
        model_->hp = hp_;
        if (params_.expected_n_embd > 0 && params_.expected_n_embd != hp_.n_embd_out) {
            format_error("the projector outputs " + std::to_string(hp_.n_embd_out) +
                         "-wide embeddings but the language model's width is " +
                         std::to_string(params_.expected_n_embd) + " (mmproj and model do not match)");
        }
    }

    void choose_device() {
        std::string want = params_.device ? params_.device : "";
        ggml_backend_dev_t dev = nullptr;
        if (want.empty() || lower(want) == "auto") {
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
            if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
            if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        } else if (lower(want) == "cpu") {
            dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        } else {
            std::string names;
            for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
                ggml_backend_dev_t d = ggml_backend_dev_get(i);
                const char * nm = ggml_backend_dev_name(d);
                names += (i ? ", " : "") + std::string(nm);
                if (lower(nm) == lower(want)) dev = d;
            }
            if (!dev) throw Error(MMV_ERR_INVALID_ARGUMENT, "no compute device named '" + want + "' (have: " + names + ")");
        }
        if (!dev) throw Error(MMV_ERR_BACKEND, "no ggml compute device is available");
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
        int32_t nt = params_.n_threads;
        if (nt <= 0) nt = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
        model_->n_threads = nt;
        apply_n_threads(*model_);
    }

    void upload() {
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(model_->device);
        model_->buf_w.reset(ggml_backend_alloc_ctx_tensors_from_buft(model_->ctx_w.get(), buft));
        if (!model_->buf_w) {
            throw Error(MMV_ERR_OUT_OF_MEMORY, "not enough memory on " + model_->device_name + " for the weights");
        }
        ggml_backend_buffer_set_usage(model_->buf_w.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

        file_ptr f(std::fopen(path_.c_str(), "rb"));
        if (!f) throw Error(MMV_ERR_IO, "cannot open " + path_ + ": " + std::strerror(errno));
        const size_t data_off = gguf_get_data_offset(gguf_.get());
        std::vector<uint8_t> raw;
        std::vector<float> conv;
        for (const Pending & pd : pending_) {
            const size_t n_bytes = gguf_get_tensor_size(gguf_.get(), pd.gguf_id);
            const uint64_t off = data_off + gguf_get_tensor_offset(gguf_.get(), pd.gguf_id);
            raw.resize(n_bytes);
#if defined(_WIN32)
            int rc = _fseeki64(f.get(), static_cast<long long>(off), SEEK_SET);
#else
            int rc = fseeko(f.get(), static_cast<off_t>(off), SEEK_SET);
#endif
            if (rc != 0 || std::fread(raw.data(), 1, n_bytes, f.get()) != n_bytes) {
                throw Error(MMV_ERR_IO, "cannot read tensor " + std::string(ggml_get_name(pd.dst)) + " from " + path_);
            }
            const ggml_type src_type = gguf_get_tensor_type(gguf_.get(), pd.gguf_id);
            if (pd.store == Store::F32 && src_type != GGML_TYPE_F32) {
                const int64_t n = ggml_nelements(pd.dst);
                conv.resize(static_cast<size_t>(n));
                ggml_get_type_traits(src_type)->to_float(raw.data(), conv.data(), n);
                ggml_backend_tensor_set(pd.dst, conv.data(), 0, conv.size() * sizeof(float));
            } else {
                if (n_bytes != ggml_nbytes(pd.dst)) format_error("tensor size mismatch for " + std::string(ggml_get_name(pd.dst)));
                ggml_backend_tensor_set(pd.dst, raw.data(), 0, n_bytes);
            }
        }
    }

    std::string path_;
    mmv_model_params params_;
    uint64_t file_size_ = 0;
    gguf_ptr gguf_;
    context_ptr meta_;
    Hparams hp_;
    mmv_model * model_ = nullptr;
    std::vector<Pending> pending_;
};

}  // namespace

void apply_n_threads(mmv_model & model) {
    for (ggml_backend_t b : {model.backend.get(), model.backend_cpu.get()}) {
        if (b == nullptr) continue;
        ggml_backend_dev_t dev = ggml_backend_get_device(b);
        if (dev == nullptr || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) continue;
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        auto fn = reinterpret_cast<ggml_backend_set_n_threads_t>(
            ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"));
        if (fn) fn(b, model.n_threads);
    }
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
    mmv_model_params p = params ? *params : mmv_model_default_params();
    try {
        mmv::Loader loader(path, p);
        *out = loader.run().release();
        mmv::clear_error();
        return MMV_OK;
    } catch (const mmv::Error & e) {
        return mmv::fail(e.status, e.what());
    } catch (const std::bad_alloc &) {
        return mmv::fail(MMV_ERR_OUT_OF_MEMORY, "out of memory while loading " + std::string(path));
    } catch (const std::exception & e) {
        return mmv::fail(MMV_ERR_INTERNAL, e.what());
    } catch (...) {
        return mmv::fail(MMV_ERR_INTERNAL, "unknown error while loading");
    }
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
    out->n_tokens = hp.n_patches();
    out->n_embd = hp.n_embd_out;
    out->n_embd_vision = hp.n_embd;
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
