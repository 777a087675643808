// Hand-written CPU kernels (see host_kernels.h).
//
// linear: C[n][m] = sum_k X[n][k] * W[m][k] (+ b[m]); W f16 [M][K], X f32 [N][K], C f32
// [N][M] (ggml_mul_mat's layout). Blocked as BLIS does: for each block of KC columns of K,
// each thread takes its own 32-row panels of W, widens one panel block to f32 and transposes
// it into a [KC][32] buffer that stays in L1, then sweeps all N rows of X (whose KC-block
// stays in L2) with a 12 x 32 register tile: per k, two 16-wide loads of the panel, twelve
// broadcasts of X and 24 FMAs. Threads split the M panels, so they never share an output
// and need no barrier. Accumulation is f32 in the order k = 0, 1, ... within a KC block.
#include "host_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MMV_HOST_KERNELS 1
#include <immintrin.h>
// GCC 12 reports its own _mm512_undefined_ps() inside the intrinsics as (maybe) uninitialised.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace mmv {

#if MMV_HOST_KERNELS
namespace {

#define MMV_AVX512 __attribute__((target("avx512f,fma,f16c")))

constexpr int MR = 32;   // W rows per panel (two 16-float vectors)
constexpr int NR = 12;   // X rows per register tile
constexpr int KC = 256;  // K block: the packed panel is KC * MR * 4 = 32 KiB

// Transpose 16 x 16 floats held in r[0..15] (r[i] = row i) in place.
MMV_AVX512 inline void transpose16(__m512 r[16]) {
    __m512 t[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    // t[2j] holds (r2j[0], r2j+1[0], r2j[1], r2j+1[1]) per 128-bit lane, t[2j+1] elements 2, 3.
    __m512 u[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; i += 4) {
        u[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // u[4q + e] lane l = column 4l + e of rows 4q..4q+3.
    __m512 v[16];
#pragma GCC unroll 4
    for (int e = 0; e < 4; ++e) {
        v[e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);        // lanes 0,2 of u[e], then of u[4+e]
        v[4 + e] = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xdd);    // lanes 1,3
        v[8 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
        v[12 + e] = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xdd);
    }
#pragma GCC unroll 4
    for (int e = 0; e < 4; ++e) {
        r[e] = _mm512_shuffle_f32x4(v[e], v[8 + e], 0x88);
        r[8 + e] = _mm512_shuffle_f32x4(v[e], v[8 + e], 0xdd);
        r[4 + e] = _mm512_shuffle_f32x4(v[4 + e], v[12 + e], 0x88);
        r[12 + e] = _mm512_shuffle_f32x4(v[4 + e], v[12 + e], 0xdd);
    }
}

// dst[k][0..32) = float(w[r][k0 + k]) for the 32 rows r of a panel (row stride ldw halves),
// k < kc; kc tail (kc % 16) done element by element.
MMV_AVX512 void pack_panel(const ggml_fp16_t * w, size_t ldw, int kc, float * dst) {
    const int kv = kc & ~15;
    for (int half = 0; half < 2; ++half) {
        const ggml_fp16_t * wr = w + static_cast<size_t>(16 * half) * ldw;
        for (int k = 0; k < kv; k += 16) {
            __m512 r[16];
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) {
                r[i] = _mm512_cvtph_ps(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i *>(wr + static_cast<size_t>(i) * ldw + k)));
            }
            transpose16(r);
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + static_cast<size_t>(k + i) * MR + 16 * half, r[i]);
        }
        for (int k = kv; k < kc; ++k) {
            for (int i = 0; i < 16; ++i) {
                dst[static_cast<size_t>(k) * MR + 16 * half + i] = _cvtsh_ss(wr[static_cast<size_t>(i) * ldw + k]);
            }
        }
    }
}

// C[n][0..32) (+)= sum_k X[n][k] * P[k][0..32) for n < R; init from C (acc), from the bias
// or zero.
template <int R>
MMV_AVX512 void tile(int kc, const float * p, const float * x, size_t ldx, float * c, size_t ldc, bool acc,
                     const float * bias) {
    __m512 a0[R], a1[R];  // the loops over n are unrolled so that these live in registers
#pragma GCC unroll 16
    for (int n = 0; n < R; ++n) {
        if (acc) {
            a0[n] = _mm512_loadu_ps(c + n * ldc);
            a1[n] = _mm512_loadu_ps(c + n * ldc + 16);
        } else if (bias) {
            a0[n] = _mm512_loadu_ps(bias);
            a1[n] = _mm512_loadu_ps(bias + 16);
        } else {
            a0[n] = _mm512_setzero_ps();
            a1[n] = _mm512_setzero_ps();
        }
    }
    for (int k = 0; k < kc; ++k) {
        const __m512 w0 = _mm512_loadu_ps(p + static_cast<size_t>(k) * MR);
        const __m512 w1 = _mm512_loadu_ps(p + static_cast<size_t>(k) * MR + 16);
#pragma GCC unroll 16
        for (int n = 0; n < R; ++n) {
            const __m512 b = _mm512_set1_ps(x[n * ldx + k]);
            a0[n] = _mm512_fmadd_ps(w0, b, a0[n]);
            a1[n] = _mm512_fmadd_ps(w1, b, a1[n]);
        }
    }
#pragma GCC unroll 16
    for (int n = 0; n < R; ++n) {
        _mm512_storeu_ps(c + n * ldc, a0[n]);
        _mm512_storeu_ps(c + n * ldc + 16, a1[n]);
    }
}

using TileFn = void (*)(int, const float *, const float *, size_t, float *, size_t, bool, const float *);
constexpr TileFn kTiles[NR + 1] = {nullptr,  tile<1>, tile<2>, tile<3>,  tile<4>,  tile<5>, tile<6>,
                                   tile<7>,  tile<8>, tile<9>, tile<10>, tile<11>, tile<12>};

void linear_op(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * w = dst->src[0];
    const ggml_tensor * x = dst->src[1];
    const ggml_tensor * b = dst->src[2];
    const int64_t K = w->ne[0], M = w->ne[1];
    const int64_t N = ggml_nrows(x);
    const int64_t panels = M / MR;
    const int64_t p0 = panels * ith / nth, p1 = panels * (ith + 1) / nth;
    if (p0 == p1) return;
    alignas(64) static thread_local float packed[KC * MR];
    const auto * wd = static_cast<const ggml_fp16_t *>(w->data);
    const float * xd = static_cast<const float *>(x->data);
    const float * bd = b ? static_cast<const float *>(b->data) : nullptr;
    auto * cd = static_cast<float *>(dst->data);
    // When X's row stride is a multiple of 2 KiB (K = 3072, 6144), the twelve rows a tile
    // reads map to a few L1 sets and evict each other: read them from this thread's copy with
    // a padded stride instead.
    size_t ldx = static_cast<size_t>(K);
    if ((K * sizeof(float)) % 2048 == 0) {
        static thread_local std::vector<float> xcopy;
        ldx = static_cast<size_t>(K) + 16;
        xcopy.resize(static_cast<size_t>(N) * ldx);
        for (int64_t n = 0; n < N; ++n) {
            std::memcpy(xcopy.data() + n * ldx, xd + n * K, sizeof(float) * static_cast<size_t>(K));
        }
        xd = xcopy.data();
    }
    // Groups of GP panels: their N x (GP * 32) outputs stay in L2 across the K blocks.
    constexpr int64_t GP = 8;
    for (int64_t g0 = p0; g0 < p1; g0 += GP) {
        const int64_t g1 = std::min(p1, g0 + GP);
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int kc = static_cast<int>(std::min<int64_t>(KC, K - k0));
            for (int64_t p = g0; p < g1; ++p) {
                const int64_t m0 = p * MR;
                pack_panel(wd + static_cast<size_t>(m0 * K + k0), static_cast<size_t>(K), kc, packed);
                for (int64_t n0 = 0; n0 < N; n0 += NR) {
                    const int r = static_cast<int>(std::min<int64_t>(NR, N - n0));
                    kTiles[r](kc, packed, xd + n0 * ldx + k0, ldx, cd + static_cast<size_t>(n0 * M + m0),
                              static_cast<size_t>(M), k0 > 0, bd ? bd + m0 : nullptr);
                }
            }
        }
    }
}

// Exact GELU, x * Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2 and erfc(z), z >= 0, from
// t = 1 / (1 + z / 2): erfc(z) = t exp(-z^2 + P(t)), the Chebyshev fit of Numerical Recipes
// (erfcc, fractional error < 1.2e-7 everywhere). Writing it through erfc keeps the negative
// tail accurate (no 1 + erf cancellation).
MMV_AVX512 inline __m512 exp512(__m512 x) {
    // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2, degree-7 Taylor for exp(r).
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

MMV_AVX512 inline __m512 gelu512(__m512 x) {
    const __m512 z = _mm512_min_ps(_mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f)),
                                   _mm512_set1_ps(12.0f));
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(z, _mm512_set1_ps(0.5f), _mm512_set1_ps(1.0f)));
    static const float c[10] = {-1.26551223f, 1.00002368f, 0.37409196f,  0.09678418f, -0.18628806f,
                                0.27886807f,  -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
    __m512 p = _mm512_set1_ps(c[9]);
    for (int i = 8; i >= 0; --i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(c[i]));
    const __m512 e = _mm512_mul_ps(t, exp512(_mm512_fnmadd_ps(z, z, p)));  // erfc(z)
    const __m512 half_e = _mm512_mul_ps(e, _mm512_set1_ps(0.5f));
    const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 phi = _mm512_mask_blend_ps(neg, _mm512_sub_ps(_mm512_set1_ps(1.0f), half_e), half_e);
    return _mm512_mul_ps(x, phi);
}

MMV_AVX512 void gelu_rows(float * y, const float * x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, gelu512(_mm512_loadu_ps(x + i)));
    if (i < n) {
        const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, m, gelu512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

void gelu_op(ggml_tensor * dst, const ggml_tensor * a, int ith, int nth, void *) {
    const int64_t n = ggml_nelements(a);
    const int64_t per = ((n + nth - 1) / nth + 15) & ~int64_t(15);
    const int64_t i0 = std::min<int64_t>(n, per * ith), i1 = std::min<int64_t>(n, i0 + per);
    if (i0 < i1) gelu_rows(static_cast<float *>(dst->data) + i0, static_cast<const float *>(a->data) + i0, i1 - i0);
}

// Softmax of one row of scores (times `scale`), in place.
MMV_AVX512 void softmax_row(float * s, int64_t n, float scale) {
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_loadu_ps(s + i), sc));
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    if (i < n) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + i), sc));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(s + i), sc, m));
        _mm512_storeu_ps(s + i, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (i < n) {
        const __m512 e = exp512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, s + i), sc, m));
        _mm512_mask_storeu_ps(s + i, tail, e);
        sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
    if (i < n) _mm512_mask_storeu_ps(s + i, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + i), inv));
}

// Unmasked multi-head attention softmax(q k^T / sqrt(dh)) v per (batch, head), with the GEMM
// tile above: S = Q K^T from K^T panels of 32 keys, then O = S V from V panels of 32 head
// columns. A last panel that would run past the keys (or the head) is placed to end at the
// last one instead, overlapping the previous panel: those overlapped outputs are computed
// twice, identically, and nothing is padded. Threads split the (batch, head) pairs.
void attention_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * q = dst->src[0];
    const ggml_tensor * k = dst->src[1];
    const ggml_tensor * v = dst->src[2];
    const int64_t n_head = reinterpret_cast<intptr_t>(userdata);
    const int64_t H = q->ne[0], NQ = q->ne[1], NK = k->ne[1], B = q->ne[2];
    const int64_t DH = H / n_head;
    const float scale = 1.0f / std::sqrt(static_cast<float>(DH));
    static thread_local std::vector<float> panel;  // K^T panel [DH][32] or V panel [NK][32]
    static thread_local std::vector<float> scores;
    panel.resize(static_cast<size_t>(std::max(DH, NK) * MR));
    scores.resize(static_cast<size_t>(NQ * NK));
    for (int64_t u = ith; u < B * n_head; u += nth) {
        const int64_t b = u / n_head, h = u % n_head;
        const float * qh = static_cast<const float *>(q->data) + b * H * NQ + h * DH;
        const float * kh = static_cast<const float *>(k->data) + b * H * NK + h * DH;
        const float * vh = static_cast<const float *>(v->data) + b * H * NK + h * DH;
        float * oh = static_cast<float *>(dst->data) + b * H * NQ + h * DH;
        for (int64_t j0 = 0; j0 < NK; j0 += MR) {
            const int64_t j = std::min(j0, NK - MR);
            for (int64_t d = 0; d < DH; ++d) {
                for (int i = 0; i < MR; ++i) panel[static_cast<size_t>(d * MR + i)] = kh[(j + i) * H + d];
            }
            for (int64_t n0 = 0; n0 < NQ; n0 += NR) {
                const int r = static_cast<int>(std::min<int64_t>(NR, NQ - n0));
                kTiles[r](static_cast<int>(DH), panel.data(), qh + n0 * H, static_cast<size_t>(H),
                          scores.data() + n0 * NK + j, static_cast<size_t>(NK), false, nullptr);
            }
        }
        for (int64_t n = 0; n < NQ; ++n) softmax_row(scores.data() + n * NK, NK, scale);
        for (int64_t d0 = 0; d0 < DH; d0 += MR) {
            const int64_t d = std::min(d0, DH - MR);
            for (int64_t key = 0; key < NK; ++key) {
                std::memcpy(panel.data() + key * MR, vh + key * H + d, sizeof(float) * MR);
            }
            for (int64_t n0 = 0; n0 < NQ; n0 += NR) {
                const int r = static_cast<int>(std::min<int64_t>(NR, NQ - n0));
                kTiles[r](static_cast<int>(NK), panel.data(), scores.data() + n0 * NK, static_cast<size_t>(NK),
                          oh + n0 * H + d, static_cast<size_t>(H), false, nullptr);
            }
        }
    }
}

// LayerNorm of each row: (x - mean) / sqrt(var + eps) * w + b (w, b optional), two passes
// over the row as ggml_norm does (mean, then the variance about it). Threads split the rows.
MMV_AVX512 void layer_norm_row(float * y, const float * x, int64_t n, float eps, const float * w, const float * b) {
    __m512 s = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) s = _mm512_add_ps(s, _mm512_loadu_ps(x + i));
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    if (i < n) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail, x + i));
    const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(s) / static_cast<float>(n));
    __m512 v = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), mean);
        v = _mm512_fmadd_ps(d, d, v);
    }
    if (i < n) {
        const __m512 d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, x + i), mean);
        v = _mm512_fmadd_ps(d, d, v);
    }
    const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(v) / static_cast<float>(n) + eps));
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xffff) : tail;
        __m512 t = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), mean), rstd);
        t = _mm512_fmadd_ps(t, w ? _mm512_maskz_loadu_ps(m, w + i) : one, b ? _mm512_maskz_loadu_ps(m, b + i) : zero);
        _mm512_mask_storeu_ps(y + i, m, t);
    }
}

void layer_norm_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * x = dst->src[0];
    const ggml_tensor * w = dst->src[1];
    const ggml_tensor * b = dst->src[2];
    float eps;
    const auto bits = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(userdata));
    std::memcpy(&eps, &bits, sizeof eps);
    const int64_t n = x->ne[0], rows = ggml_nrows(x);
    const float * wd = w ? static_cast<const float *>(w->data) : nullptr;
    const float * bd = b ? static_cast<const float *>(b->data) : nullptr;
    for (int64_t r = ith; r < rows; r += nth) {
        layer_norm_row(static_cast<float *>(dst->data) + r * n, static_cast<const float *>(x->data) + r * n, n, eps,
                       wd, bd);
    }
}

bool host_f32(const ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 && ggml_is_contiguous(t) && t->extra == nullptr &&
           (t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer));
}

}  // namespace

bool host_kernels_usable(ggml_backend_t backend) {
    if (backend == nullptr) return false;
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    if (dev == nullptr || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

ggml_tensor * host_linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    if (w->type != GGML_TYPE_F16 || !ggml_is_contiguous(w) || w->extra != nullptr || w->ne[2] != 1 || w->ne[3] != 1 ||
        w->ne[1] % MR != 0 || (w->buffer && !ggml_backend_buffer_is_host(w->buffer)))
        return nullptr;
    if (!host_f32(x) || x->ne[0] != w->ne[0]) return nullptr;
    if (b && (!host_f32(b) || ggml_nelements(b) != w->ne[1])) return nullptr;
    ggml_tensor * args[3] = {w, x, b};
    ggml_tensor * y = ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], x->ne[2], x->ne[3], args, b ? 3 : 2,
                                     linear_op, GGML_N_TASKS_MAX, nullptr);
    return ggml_set_name(y, "host_linear");
}

ggml_tensor * host_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, int64_t n_head) {
    if (!host_f32(q) || !host_f32(k) || !host_f32(v) || n_head < 1 || q->ne[0] % n_head != 0) return nullptr;
    const int64_t H = q->ne[0], NK = k->ne[1];
    if (k->ne[0] != H || !ggml_are_same_shape(k, v) || k->ne[2] != q->ne[2] || q->ne[3] != 1 || k->ne[3] != 1) {
        return nullptr;
    }
    if (NK < MR || H / n_head < MR) return nullptr;  // a panel spans 32 keys / 32 head columns
    ggml_tensor * args[3] = {q, k, v};
    ggml_tensor * y = ggml_custom_4d(ctx, GGML_TYPE_F32, H, q->ne[1], q->ne[2], 1, args, 3, attention_op,
                                     GGML_N_TASKS_MAX, reinterpret_cast<void *>(static_cast<intptr_t>(n_head)));
    return ggml_set_name(y, "host_attention");
}

ggml_tensor * host_layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    if (!host_f32(x) || (!w && b)) return nullptr;  // src[1] is the weight when there is one
    for (ggml_tensor * p : {w, b}) {
        if (p && (!host_f32(p) || ggml_nelements(p) != x->ne[0])) return nullptr;
    }
    ggml_tensor * args[3] = {x, nullptr, nullptr};
    int n_args = 1;
    if (w) args[n_args++] = w;
    if (b) args[n_args++] = b;
    uint32_t bits;
    std::memcpy(&bits, &eps, sizeof bits);
    ggml_tensor * y = ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], x->ne[1], x->ne[2], x->ne[3], args, n_args,
                                     layer_norm_op, GGML_N_TASKS_MAX,
                                     reinterpret_cast<void *>(static_cast<uintptr_t>(bits)));
    return ggml_set_name(y, "host_layer_norm");
}

ggml_tensor * host_gelu_erf(ggml_context * ctx, ggml_tensor * x) {
    if (!host_f32(x)) return nullptr;
    return ggml_set_name(ggml_map_custom1(ctx, x, gelu_op, GGML_N_TASKS_MAX, nullptr), "host_gelu_erf");
}

#else  // no x86 GCC/Clang: the ggml ops everywhere

bool host_kernels_usable(ggml_backend_t) { return false; }
ggml_tensor * host_linear(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *) { return nullptr; }
ggml_tensor * host_gelu_erf(ggml_context *, ggml_tensor *) { return nullptr; }
ggml_tensor * host_attention(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, int64_t) { return nullptr; }
ggml_tensor * host_layer_norm(ggml_context *, ggml_tensor *, ggml_tensor *, ggml_tensor *, float) { return nullptr; }

#endif

}  // namespace mmv
