// WeightLoader: typed GGUF keys and checked tensor declarations for the families.
#include "loader.h"

#include <cmath>

namespace mmv {

[[noreturn]] void format_error(const std::string & m) { throw Error(MMV_ERR_FORMAT, m); }
[[noreturn]] void unsupported(const std::string & m) { throw Error(MMV_ERR_UNSUPPORTED, m); }

namespace {

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

std::string shape_str(const std::vector<int64_t> & ne) {
    std::string s = "[";
    for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
}

}  // namespace

int64_t WeightLoader::require_key(const char * key) const {
    int64_t id = gguf_find_key(g_, key);
    if (id < 0) format_error(std::string("missing key ") + key);
    return id;
}

bool WeightLoader::has(const char * key) const { return gguf_find_key(g_, key) >= 0; }

int64_t WeightLoader::get_int(const char * key) const {
    int64_t id = require_key(key);
    gguf_type t = gguf_get_kv_type(g_, id);
    if (!is_int_type(t)) format_error(std::string("key ") + key + " is not an integer");
    return int_at(t, gguf_get_val_data(g_, id), 0);
}

int64_t WeightLoader::get_int(const char * key, int64_t fallback) const { return has(key) ? get_int(key) : fallback; }

int32_t WeightLoader::get_int_in(const char * key, int64_t lo, int64_t hi) const {
    int64_t v = get_int(key);
    if (v < lo || v > hi) format_error(std::string("key ") + key + " = " + std::to_string(v) + " is out of range");
    return static_cast<int32_t>(v);
}

double WeightLoader::get_float(const char * key, double fallback) const {
    int64_t id = gguf_find_key(g_, key);
    if (id < 0) return fallback;
    gguf_type t = gguf_get_kv_type(g_, id);
    if (t == GGUF_TYPE_FLOAT32) return gguf_get_val_f32(g_, id);
    if (t == GGUF_TYPE_FLOAT64) return gguf_get_val_f64(g_, id);
    if (is_int_type(t)) return static_cast<double>(int_at(t, gguf_get_val_data(g_, id), 0));
    format_error(std::string("key ") + key + " is not a number");
}

bool WeightLoader::get_bool(const char * key, bool fallback) const {
    int64_t id = gguf_find_key(g_, key);
    if (id < 0) return fallback;
    gguf_type t = gguf_get_kv_type(g_, id);
    if (t == GGUF_TYPE_BOOL) return gguf_get_val_bool(g_, id);
    if (is_int_type(t)) return int_at(t, gguf_get_val_data(g_, id), 0) != 0;
    format_error(std::string("key ") + key + " is not a boolean");
}

std::string WeightLoader::get_str(const char * key, const std::string & fallback) const {
    int64_t id = gguf_find_key(g_, key);
    if (id < 0) return fallback;
    if (gguf_get_kv_type(g_, id) != GGUF_TYPE_STRING) format_error(std::string("key ") + key + " is not a string");
    const char * s = gguf_get_val_str(g_, id);
    return s ? s : "";
}

std::vector<double> WeightLoader::get_float_array(const char * key) const {
    int64_t id = gguf_find_key(g_, key);
    std::vector<double> out;
    if (id < 0) return out;
    if (gguf_get_kv_type(g_, id) != GGUF_TYPE_ARRAY) format_error(std::string("key ") + key + " is not an array");
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

void WeightLoader::image_norm(float mean[3], float stdv[3], const double def_mean[3], const double def_std[3]) const {
    auto m = get_float_array("clip.vision.image_mean");
    auto s = get_float_array("clip.vision.image_std");
    if (!m.empty() && m.size() != 3) format_error("clip.vision.image_mean must have 3 values");
    if (!s.empty() && s.size() != 3) format_error("clip.vision.image_std must have 3 values");
    for (int i = 0; i < 3; ++i) {
        mean[i] = static_cast<float>(m.empty() ? def_mean[i] : m[static_cast<size_t>(i)]);
        stdv[i] = static_cast<float>(s.empty() ? def_std[i] : s[static_cast<size_t>(i)]);
        if (!(stdv[i] > 0.f)) format_error("clip.vision.image_std must be positive");
    }
}

bool WeightLoader::has_tensor(const std::string & name) const { return gguf_find_tensor(g_, name.c_str()) >= 0; }

std::vector<int64_t> WeightLoader::shape_of(const std::string & name) const {
    ggml_tensor * t = gguf_find_tensor(g_, name.c_str()) >= 0 ? ggml_get_tensor(meta_, name.c_str()) : nullptr;
    if (t == nullptr) return {};
    std::vector<int64_t> ne(t->ne, t->ne + GGML_MAX_DIMS);
    while (ne.size() > 1 && ne.back() == 1) ne.pop_back();
    return ne;
}

ggml_type WeightLoader::type_of(const std::string & name) const {
    int64_t id = gguf_find_tensor(g_, name.c_str());
    if (id < 0) format_error(path_ + ": missing tensor " + name);
    return gguf_get_tensor_type(g_, id);
}

int64_t WeightLoader::find(const std::string & name, const std::vector<int64_t> & ne, bool required) const {
    int64_t id = gguf_find_tensor(g_, name.c_str());
    if (id < 0) {
        if (required) format_error(path_ + ": missing tensor " + name);
        return -1;
    }
    ggml_tensor * t = ggml_get_tensor(meta_, name.c_str());
    if (t == nullptr) format_error(path_ + ": tensor " + name + " is unreadable");
    std::vector<int64_t> have(t->ne, t->ne + GGML_MAX_DIMS);
    std::vector<int64_t> want = ne;
    want.resize(GGML_MAX_DIMS, 1);
    if (have != want) {
        while (have.size() > 1 && have.back() == 1) have.pop_back();
        format_error(path_ + ": tensor " + name + " has shape " + shape_str(have) + ", expected " + shape_str(ne));
    }
    return id;
}

ggml_tensor * WeightLoader::declare(const std::string & name, const std::vector<int64_t> & ne, bool required,
                                    Store store) {
    int64_t id = find(name, ne, required);
    if (id < 0) return nullptr;
    const ggml_type src_type = gguf_get_tensor_type(g_, id);
    ggml_type type = store == Store::F32 ? GGML_TYPE_F32 : src_type;
    if (store == Store::F32 && src_type != GGML_TYPE_F32 && ggml_get_type_traits(src_type)->to_float == nullptr) {
        unsupported("tensor " + name + " has a type that cannot be converted");
    }
    ggml_tensor * t = nullptr;
    switch (ne.size()) {
        case 1: t = ggml_new_tensor_1d(w_, type, ne[0]); break;
        case 2: t = ggml_new_tensor_2d(w_, type, ne[0], ne[1]); break;
        case 3: t = ggml_new_tensor_3d(w_, type, ne[0], ne[1], ne[2]); break;
        default: t = ggml_new_tensor_4d(w_, type, ne[0], ne[1], ne[2], ne[3]); break;
    }
    if (t == nullptr) throw Error(MMV_ERR_OUT_OF_MEMORY, "the weight context is full (" + name + ")");
    ggml_set_name(t, name.c_str());
    pending_.push_back({t, id, store});
    return t;
}

Linear WeightLoader::linear(const std::string & prefix, int64_t in, int64_t out, bool bias_required) {
    Linear l;
    l.w = declare(prefix + ".weight", {in, out}, true, Store::AsIs);
    l.b = declare(prefix + ".bias", {out}, bias_required, Store::F32);
    return l;
}

Norm WeightLoader::norm(const std::string & prefix, int64_t n, bool required) {
    Norm nm;
    nm.w = declare(prefix + ".weight", {n}, required, Store::F32);
    nm.b = declare(prefix + ".bias", {n}, required && nm.w != nullptr, Store::F32);
    if (nm.w == nullptr && nm.b != nullptr) format_error(path_ + ": " + prefix + ".bias without weight");
    return nm;
}

}  // namespace mmv
