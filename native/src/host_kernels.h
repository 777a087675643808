// Hand-written CPU kernels for the two places where ggml's CPU backend (as pinned) leaves
// time on the table in ViT encoders (see benchmarks/RESULTS.md, `## qformer`):
//
//   linear    an f16-weight matmul that keeps the activations in f32 and widens the weights
//             to f32 panel by panel (cache-blocked, AVX-512). ggml instead rounds the
//             activations to f16 and runs a dot-product kernel whose inner loop converts both
//             operands; this one is faster and closer to an f32 reference.
//   attention unmasked multi-head attention on the same register tile, f32 throughout (ggml's
//             CPU flash attention runs well below matmul speed at head size 88).
//   gelu_erf  exact GELU x * Phi(x), vectorised (ggml's is a scalar erff loop).
//   layer_norm  norm, scale and shift in one pass over each row (ggml: three ops).
//
// All are ggml custom ops, so they only run on the CPU backend: callers use them only when
// host_kernels_usable() says so for the backend the graph runs on, and fall back to the
// ordinary ggml ops otherwise (GPU backends, CPUs without AVX-512, unsupported layouts).
#pragma once

#include "ggml-backend.h"
#include "ggml.h"

namespace mmv {

// True when `backend` is ggml's CPU backend and this CPU has AVX-512F.
bool host_kernels_usable(ggml_backend_t backend);

// x @ w^T + b as ggml_mul_mat(w, x) (+ b) computes it, for f16 `w` [K, M] with M a multiple
// of 32, f32 contiguous `x` [K, ...] and an f32 (or null) bias [M]; nullptr when the operands
// do not fit (then use ggml_mul_mat).
ggml_tensor * host_linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b);

// softmax(q k^T / sqrt(head_dim)) v, unmasked, over contiguous f32 q [H, NQ, B] and k, v
// [H, NK, B] with n_head heads, as mmv::attention computes it; nullptr when they do not fit
// (fewer than 32 keys or head columns).
ggml_tensor * host_attention(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, int64_t n_head);

// LayerNorm over dim 0 of a contiguous f32 `x`, times f32 `w` plus f32 `b` (each [ne0] or
// null; no bias without a weight), as ggml_norm + ggml_mul + ggml_add in one pass; nullptr
// when the operands do not fit.
ggml_tensor * host_layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps);

// Exact GELU of a contiguous f32 tensor; nullptr when `x` does not fit.
ggml_tensor * host_gelu_erf(ggml_context * ctx, ggml_tensor * x);

}  // namespace mmv
