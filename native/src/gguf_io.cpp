#include "gguf_io.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

namespace mmv {
namespace {

struct FileCloser {
    void operator()(FILE * f) const { std::fclose(f); }
};
using file_ptr = std::unique_ptr<FILE, FileCloser>;

std::string lower(std::string s) {
    for (auto & c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

}  // namespace

GgufFile open_gguf(const std::string & path) {
    GgufFile out;
    out.path = path;
    {
        file_ptr f(std::fopen(path.c_str(), "rb"));
        if (!f) throw Error(MMV_ERR_IO, "cannot open " + path + ": " + std::strerror(errno));
        char magic[4] = {0, 0, 0, 0};
        if (std::fread(magic, 1, 4, f.get()) != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
            format_error(path + " is not a GGUF file");
        }
        if (std::fseek(f.get(), 0, SEEK_END) != 0) throw Error(MMV_ERR_IO, "cannot seek in " + path);
        const long sz = std::ftell(f.get());
        if (sz < 0) throw Error(MMV_ERR_IO, "cannot size " + path);
        out.size = static_cast<uint64_t>(sz);
    }
    ggml_context * meta = nullptr;
    gguf_init_params gp{};
    gp.no_alloc = true;
    gp.ctx = &meta;
    out.g.reset(gguf_init_from_file(path.c_str(), gp));
    out.meta.reset(meta);
    if (!out.g) format_error(path + " is a damaged or truncated GGUF file (header unreadable)");
    const size_t data_off = gguf_get_data_offset(out.g.get());
    const int64_t n = gguf_get_n_tensors(out.g.get());
    for (int64_t i = 0; i < n; ++i) {
        const uint64_t end = data_off + gguf_get_tensor_offset(out.g.get(), i) + gguf_get_tensor_size(out.g.get(), i);
        if (end > out.size) {
            format_error(path + " is truncated: tensor " + gguf_get_tensor_name(out.g.get(), i) + " ends at byte " +
                         std::to_string(end) + " but the file has " + std::to_string(out.size));
        }
    }
    return out;
}

ggml_backend_dev_t pick_device(const char * device) {
    const std::string want = device ? device : "";
    if (want.empty() || lower(want) == "auto") {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU);
        if (!dev) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!dev) throw Error(MMV_ERR_BACKEND, "no ggml compute device is available");
        return dev;
    }
    if (lower(want) == "cpu") {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!dev) throw Error(MMV_ERR_BACKEND, "no CPU backend is available");
        return dev;
    }
    std::string names;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        const char * nm = ggml_backend_dev_name(d);
        names += (i ? ", " : "") + std::string(nm);
        if (lower(nm) == lower(want)) return d;
    }
    throw Error(MMV_ERR_INVALID_ARGUMENT, "no compute device named '" + want + "' (have: " + names + ")");
}

buffer_ptr upload_weights(const GgufFile & file, ggml_context * ctx_w, ggml_backend_dev_t dev,
                          const std::vector<WeightLoader::Pending> & pending) {
    buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, ggml_backend_dev_buffer_type(dev)));
    if (!buf) {
        throw Error(MMV_ERR_OUT_OF_MEMORY,
                    "not enough memory on " + std::string(ggml_backend_dev_name(dev)) + " for the weights");
    }
    ggml_backend_buffer_set_usage(buf.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    file_ptr f(std::fopen(file.path.c_str(), "rb"));
    if (!f) throw Error(MMV_ERR_IO, "cannot open " + file.path + ": " + std::strerror(errno));
    const size_t data_off = gguf_get_data_offset(file.g.get());
    std::vector<uint8_t> raw;
    std::vector<float> conv;
    for (const WeightLoader::Pending & pd : pending) {
        const size_t n_bytes = gguf_get_tensor_size(file.g.get(), pd.gguf_id);
        const uint64_t off = data_off + gguf_get_tensor_offset(file.g.get(), pd.gguf_id);
        raw.resize(n_bytes);
#if defined(_WIN32)
        const int rc = _fseeki64(f.get(), static_cast<long long>(off), SEEK_SET);
#else
        const int rc = fseeko(f.get(), static_cast<off_t>(off), SEEK_SET);
#endif
        if (rc != 0 || std::fread(raw.data(), 1, n_bytes, f.get()) != n_bytes) {
            throw Error(MMV_ERR_IO, "cannot read tensor " + std::string(ggml_get_name(pd.dst)) + " from " + file.path);
        }
        const ggml_type src_type = gguf_get_tensor_type(file.g.get(), pd.gguf_id);
        if (pd.store == Store::F32 && src_type != GGML_TYPE_F32) {
            const int64_t n = ggml_nelements(pd.dst);
            conv.resize(static_cast<size_t>(n));
            ggml_get_type_traits(src_type)->to_float(raw.data(), conv.data(), n);
            ggml_backend_tensor_set(pd.dst, conv.data(), 0, conv.size() * sizeof(float));
        } else {
            if (n_bytes != ggml_nbytes(pd.dst)) {
                format_error("tensor size mismatch for " + std::string(ggml_get_name(pd.dst)));
            }
            ggml_backend_tensor_set(pd.dst, raw.data(), 0, n_bytes);
        }
    }
    return buf;
}

void set_cpu_threads(ggml_backend_t backend, int32_t n_threads) {
    if (backend == nullptr) return;
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    if (dev == nullptr || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) return;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto fn = reinterpret_cast<ggml_backend_set_n_threads_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads"));
    if (fn) fn(backend, n_threads);
}

int32_t thread_count(int32_t requested) {
    return requested > 0 ? requested : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace mmv
