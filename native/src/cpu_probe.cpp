// CPU self-test: do llama.cpp's extra CPU buffer types (AMX, repacked weights) compute?
//
// Some virtual machines advertise AMX in CPUID, yet the tile instructions of ggml's AMX
// matrix kernels fault (SIGILL in llama_decode on any quantized model). mmchat runs this
// self-test in a child process (mmchat/native/cpu.py): one small quantized matrix product
// with the weights in each extra buffer type the CPU backend offers, checked against the
// same product in a plain CPU buffer. A crash or a wrong answer tells mmchat to load
// models without extra buffer types.
#include "mmvision.h"
#include "internal.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int64_t kK = 512;  // row length: a multiple of every block size involved
constexpr int64_t kN = 64;   // weight rows
constexpr int64_t kM = 32;   // activation columns

// W (kN x kK, quantized to `type`) times X (kK x kM) with W in `buft`. Empty on failure.
std::vector<float> matmul(ggml_backend_t backend, ggml_backend_buffer_type_t buft,
                          ggml_type type, const std::vector<float> & w,
                          const std::vector<float> & x) {
    ggml_init_params ip = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true};
    ggml_context * ctx_w = ggml_init(ip);
    ggml_context * ctx = ggml_init(ip);
    std::vector<float> result;
    ggml_backend_buffer_t buf_w = nullptr, buf = nullptr;
    do {
        ggml_tensor * tw = ggml_new_tensor_2d(ctx_w, type, kK, kN);
        ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, kK, kM);
        ggml_tensor * ty = ggml_mul_mat(ctx, tw, tx);
        buf_w = ggml_backend_alloc_ctx_tensors_from_buft(ctx_w, buft);
        buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        if (buf_w == nullptr || buf == nullptr) break;
        ggml_backend_buffer_set_usage(buf_w, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        std::vector<uint8_t> q(ggml_row_size(type, kK) * kN);
        ggml_quantize_chunk(type, w.data(), q.data(), 0, kN, kK, nullptr);
        ggml_backend_tensor_set(tw, q.data(), 0, q.size());
        ggml_backend_tensor_set(tx, x.data(), 0, x.size() * sizeof(float));
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, ty);
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) break;
        result.resize(static_cast<size_t>(kN * kM));
        ggml_backend_tensor_get(ty, result.data(), 0, result.size() * sizeof(float));
    } while (false);
    if (buf) ggml_backend_buffer_free(buf);
    if (buf_w) ggml_backend_buffer_free(buf_w);
    ggml_free(ctx);
    ggml_free(ctx_w);
    return result;
}

}  // namespace

extern "C" mmv_status mmv_cpu_extra_buffers_selftest(char * report, size_t report_len) {
    std::string summary;
    auto finish = [&](mmv_status st) {
        if (report && report_len) {
            std::strncpy(report, summary.c_str(), report_len - 1);
            report[report_len - 1] = '\0';
        }
        return st;
    };
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == nullptr) return finish(mmv::fail(MMV_ERR_BACKEND, "no CPU device"));
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(cpu);
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts"));
    if (get_extra == nullptr) return finish(MMV_OK);  // nothing extra to test
    ggml_backend_t backend = ggml_backend_cpu_init();
    if (backend == nullptr) return finish(mmv::fail(MMV_ERR_BACKEND, "cannot start the CPU backend"));
    ggml_backend_cpu_set_n_threads(backend, 2);

    std::mt19937 rng(42);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    std::vector<float> w(static_cast<size_t>(kN * kK)), x(static_cast<size_t>(kK * kM));
    for (float & v : w) v = dist(rng);
    for (float & v : x) v = dist(rng);

    mmv_status status = MMV_OK;
    const ggml_type types[] = {GGML_TYPE_Q4_0, GGML_TYPE_Q8_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};
    for (ggml_backend_buffer_type_t * b = get_extra(cpu); b && *b; ++b) {
        for (ggml_type type : types) {
            std::vector<float> ref = matmul(backend, ggml_backend_cpu_buffer_type(), type, w, x);
            std::vector<float> got = matmul(backend, *b, type, w, x);
            summary += std::string(ggml_backend_buft_name(*b)) + "/" + ggml_type_name(type);
            if (ref.empty() || got.empty()) {  // the buffer type does not take this type
                summary += ":n/a ";
                continue;
            }
            double num = 0, den = 0;
            for (size_t i = 0; i < ref.size(); ++i) {
                num += (ref[i] - got[i]) * double(ref[i] - got[i]);
                den += double(ref[i]) * ref[i];
            }
            const double rel = std::sqrt(num / (den > 0 ? den : 1));
            summary += rel < 0.05 ? ":ok " : ":WRONG ";
            if (!(rel < 0.05)) status = mmv::fail(MMV_ERR_BACKEND, "extra buffer type computes wrong results");
        }
    }
    ggml_backend_free(backend);
    return finish(status);
}
