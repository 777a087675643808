// The cross-attention decoder's core, shared by every architecture: self-attention KV cache
// (cell = position, one block of n_ctx cells per sequence), per-image cross-attention K/V
// (computed once, in slots), the media mask, batches of one sequence (prompts) or of several
// (parallel generation: one graph for every sequence's next token), the logits of the tokens a
// batch asks for and the C ABI of mmdecoder.h. The layers themselves are per architecture (decoder.h).
//
// Media rule (both architectures): a token at position p sees the image with the largest
// position <= p (IDEFICS's image_attention_mask, open_flamingo's only_attend_immediate_media
// cumsum), none before the first image; with params.eos_token >= 0 (IDEFICS) an end-of-
// sequence token strictly between the image and p ends the image's reach.
#include "../internal.h"
#include "../loader.h"
#include "decoder.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <numeric>
#include <set>
#include <thread>
#include <utility>

namespace mmd {
namespace {

struct Batch {
    int32_t n = 0;
    const int32_t * tokens = nullptr;
    const float * embd = nullptr;
    const int32_t * pos = nullptr;
    std::vector<int32_t> seq;         // per token; a sequence's tokens are contiguous
    std::vector<int32_t> out;         // tokens whose logits are computed, ascending
    std::vector<int32_t> orig;        // per token: its index in the caller's batch (empty: the same)
    // derived on the host (plan / media)
    std::vector<int32_t> seqs;        // the sequences in token order
    std::vector<int32_t> tok0, n_tok; // per seqs entry: its tokens
    std::vector<int32_t> kv_len;      // per seqs entry: its cells attended (top position + 1)
    std::vector<int32_t> img_of;      // per token: index into refs, or -1
    std::vector<std::pair<int32_t, int32_t>> refs;  // distinct (sequence, index into its images) seen
    int32_t n_xrows = 0;              // rows of all refs together
};

struct Graph {
    mmv::context_ptr ctx;
    ggml_cgraph * gf = nullptr;
    ggml_tensor *inp = nullptr, *pos = nullptr, *kv_idx = nullptr;
    std::vector<ggml_tensor *> masks;  // per seqs entry
    ggml_tensor *x_rows = nullptr, *x_mask = nullptr, *x_gate = nullptr;
    ggml_tensor *out_idx = nullptr, *out = nullptr;
};

// q [DH, NH, NT], k/v [DH, NKV_H, NK] (views) -> [DH*NH, NT]
ggml_tensor * attend(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, ggml_tensor * mask,
                     float scale, float max_bias = 0.0f) {
    const int64_t DH = q->ne[0], NH = q->ne[1], NT = q->ne[2];
    q = ggml_permute(ctx, q, 0, 2, 1, 3);                       // [DH, NT, NH]
    k = ggml_permute(ctx, k, 0, 2, 1, 3);                       // [DH, NK, NKV_H]
    ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, v, 1, 2, 0, 3));  // [NK, DH, NKV_H]
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q);                 // [NK, NT, NH]
    kq = ggml_soft_max_ext(ctx, kq, mask, scale, max_bias);  // max_bias > 0: ALiBi (mask holds -distance)
    ggml_tensor * kqv = ggml_mul_mat(ctx, vt, kq);              // [DH, NT, NH]
    kqv = ggml_permute(ctx, kqv, 0, 2, 1, 3);                   // [DH, NH, NT]
    return ggml_cont_2d(ctx, kqv, DH * NH, NT);
}

}  // namespace

ggml_tensor * norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    if (b == nullptr) return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
    return ggml_add(ctx, ggml_mul(ctx, ggml_norm(ctx, x, eps), w), b);
}

ggml_tensor * lin(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    ggml_tensor * y = ggml_mul_mat(ctx, w, x);
    return b ? ggml_add(ctx, y, b) : y;
}

ggml_tensor * self_attention(ggml_context * ctx, mmd_context & c, int32_t il, ggml_tensor * q, ggml_tensor * k,
                             ggml_tensor * v, const StepInputs & in) {
    const Hparams & hp = c.model->hp;
    const int64_t DH = hp.head_dim, NHKV = hp.n_head_kv, EKV = hp.n_embd_kv(), NT = in.n_tokens;
    ggml_tensor * kc = c.k_cache[static_cast<size_t>(il)];
    ggml_tensor * vc = c.v_cache[static_cast<size_t>(il)];
    kc = ggml_set_rows(ctx, kc, ggml_reshape_2d(ctx, k, EKV, NT), in.kv_idx);
    vc = ggml_set_rows(ctx, vc, v, in.kv_idx);
    const float scale = hp.attn_scale > 0.f ? hp.attn_scale : 1.0f / std::sqrt(static_cast<float>(DH));
    // each sequence's tokens over its own cells (several sequences: one attention per
    // sequence, the rows joined again; the projections around it run once for the batch)
    ggml_tensor * out = nullptr;
    for (const SeqSpan & sp : in.spans) {
        ggml_tensor * kview = ggml_view_3d(ctx, kc, DH, NHKV, sp.n_kv, ggml_row_size(kc->type, DH), kc->nb[1],
                                           static_cast<size_t>(sp.cell0) * kc->nb[1]);
        ggml_tensor * vview = ggml_view_3d(ctx, vc, DH, NHKV, sp.n_kv, ggml_row_size(vc->type, DH), vc->nb[1],
                                           static_cast<size_t>(sp.cell0) * vc->nb[1]);
        ggml_tensor * qs = in.spans.size() == 1
                               ? q
                               : ggml_view_3d(ctx, q, q->ne[0], q->ne[1], sp.n_tok, q->nb[1], q->nb[2],
                                              static_cast<size_t>(sp.tok0) * q->nb[2]);
        ggml_tensor * a = attend(ctx, qs, kview, vview, sp.mask, scale, hp.alibi_max_bias);
        out = out ? ggml_concat(ctx, out, a, 1) : a;
    }
    GGML_ASSERT(out != nullptr && out->ne[1] == NT);
    return out;
}

ggml_tensor * cross_attention(ggml_context * ctx, mmd_context & c, int32_t xb, ggml_tensor * q, const StepInputs & in) {
    const Hparams & hp = c.model->hp;
    const int64_t DH = hp.x_head_dim, NH = hp.x_n_head, NT = in.n_tokens;
    q = ggml_reshape_3d(ctx, q, DH, NH, NT);
    ggml_tensor * k = ggml_get_rows(ctx, c.xk_cache[static_cast<size_t>(xb)], in.x_rows);
    ggml_tensor * v = ggml_get_rows(ctx, c.xv_cache[static_cast<size_t>(xb)], in.x_rows);
    k = ggml_reshape_3d(ctx, k, DH, NH, in.n_xrows);
    v = ggml_reshape_3d(ctx, v, DH, NH, in.n_xrows);
    ggml_tensor * a = attend(ctx, q, k, v, in.x_mask, 1.0f / std::sqrt(static_cast<float>(DH)));
    return ggml_mul(ctx, a, in.x_gate);
}

namespace {

Graph build(mmd_context & c, const Batch & b) {
    const mmd_model & m = *c.model;
    const Hparams & hp = m.hp;
    ggml_init_params ip{};
    ip.mem_size = c.graph_meta.size();
    ip.mem_buffer = c.graph_meta.data();
    ip.no_alloc = true;
    Graph g;
    g.ctx.reset(ggml_init(ip));
    if (!g.ctx) throw std::bad_alloc();
    ggml_context * ctx = g.ctx.get();
    g.gf = ggml_new_graph_custom(ctx, c.graph_size, false);
    const int64_t NT = b.n, E = hp.n_embd;
    const int64_t cells = static_cast<int64_t>(c.params.n_ctx);
    auto input = [&](ggml_tensor * t, const char * name) {
        ggml_set_name(t, name);
        ggml_set_input(t);
        return t;
    };
    ggml_tensor * x;
    if (b.tokens) {
        g.inp = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, NT), "tokens");
        x = ggml_get_rows(ctx, m.tok_embd, g.inp);
    } else {
        g.inp = input(ggml_new_tensor_2d(ctx, GGML_TYPE_F32, E, NT), "embd");
        x = g.inp;
    }
    g.pos = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, NT), "pos");
    g.kv_idx = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I64, NT), "kv_idx");
    for (size_t k = 0; k < b.seqs.size(); ++k) {
        g.masks.push_back(input(ggml_new_tensor_2d(ctx, GGML_TYPE_F32, b.kv_len[k], b.n_tok[k]), "kq_mask"));
    }
    if (b.n_xrows > 0) {
        g.x_rows = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, b.n_xrows), "x_rows");
        g.x_mask = input(ggml_new_tensor_2d(ctx, GGML_TYPE_F32, b.n_xrows, NT), "x_mask");
        g.x_gate = input(ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, NT), "x_gate");
    }
    StepInputs in;
    in.pos = g.pos;
    in.kv_idx = g.kv_idx;
    for (size_t k = 0; k < b.seqs.size(); ++k) {
        SeqSpan sp;
        sp.tok0 = b.tok0[k];
        sp.n_tok = b.n_tok[k];
        sp.cell0 = static_cast<int64_t>(b.seqs[k]) * cells;
        sp.n_kv = b.kv_len[k];
        sp.mask = g.masks[k];
        in.spans.push_back(sp);
    }
    in.x_rows = g.x_rows;
    in.x_mask = g.x_mask;
    in.x_gate = g.x_gate;
    in.n_tokens = NT;
    in.n_xrows = b.n_xrows;
    x = hp.arch == Arch::Idefics ? idefics_layers(ctx, c, x, in) : openflamingo_layers(ctx, c, x, in);
    if (!b.out.empty()) {
        g.out_idx = input(ggml_new_tensor_1d(ctx, GGML_TYPE_I32, static_cast<int64_t>(b.out.size())), "out_idx");
        ggml_tensor * last = ggml_get_rows(ctx, x, g.out_idx);  // [E, n_out]
        ggml_tensor * h = hp.arch == Arch::OpenFlamingo  // LayerNorm (bias optional: MPT has none)
                              ? ggml_mul(ctx, ggml_norm(ctx, last, hp.rms_eps), m.output_norm)
                              : norm(ctx, last, m.output_norm, nullptr, hp.rms_eps);
        if (hp.arch == Arch::OpenFlamingo && m.output_norm_b) h = ggml_add(ctx, h, m.output_norm_b);
        g.out = ggml_mul_mat(ctx, m.output, h);
        if (hp.logit_scale != 1.f) g.out = ggml_scale(ctx, g.out, hp.logit_scale);
    } else {
        g.out = x;
    }
    ggml_set_name(g.out, "out");
    ggml_set_output(g.out);
    ggml_build_forward_expand(g.gf, g.out);
    return g;
}

// The sequences of the batch (their tokens are contiguous) and the cells each attends: its
// cells 0..top (its highest position in the cache or the batch).
void plan(const mmd_context & c, Batch & b) {
    b.seqs.clear();
    b.tok0.clear();
    b.n_tok.clear();
    for (int32_t i = 0; i < b.n; ++i) {
        const int32_t sq = b.seq[static_cast<size_t>(i)];
        if (b.seqs.empty() || b.seqs.back() != sq) {
            b.seqs.push_back(sq);
            b.tok0.push_back(i);
            b.n_tok.push_back(0);
        }
        ++b.n_tok.back();
    }
    b.kv_len.clear();
    for (size_t k = 0; k < b.seqs.size(); ++k) {
        const auto & used = c.seqs[static_cast<size_t>(b.seqs[k])].used;
        int32_t top = -1;
        for (int32_t p = c.params.n_ctx - 1; p >= 0; --p)
            if (used[static_cast<size_t>(p)]) {
                top = p;
                break;
            }
        for (int32_t i = b.tok0[k]; i < b.tok0[k] + b.n_tok[k]; ++i) top = std::max(top, b.pos[i]);
        b.kv_len.push_back(top + 1);
    }
}

// The image each token of the batch sees: its own sequence's (see mmdecoder.h).
void media(const mmd_context & c, Batch & b) {
    b.img_of.assign(static_cast<size_t>(b.n), -1);
    b.refs.clear();
    for (int32_t i = 0; i < b.n; ++i) {
        const int32_t sq = b.seq[static_cast<size_t>(i)];
        const auto & s = c.seqs[static_cast<size_t>(sq)];
        const int32_t p = b.pos[i];
        int32_t best = -1;
        for (size_t j = 0; j < s.images.size(); ++j)
            if (s.images[j].pos <= p && (best < 0 || s.images[j].pos > s.images[static_cast<size_t>(best)].pos))
                best = static_cast<int32_t>(j);
        if (best < 0) continue;
        const int32_t ip = s.images[static_cast<size_t>(best)].pos;
        auto ends_reach = [&](int32_t e) { return e > ip && e < p; };
        if (std::any_of(s.eos.begin(), s.eos.end(), ends_reach)) continue;
        if (b.tokens && c.params.eos_token >= 0) {  // end-of-sequence tokens of this batch, same sequence
            bool ended = false;
            for (int32_t j = 0; j < b.n && !ended; ++j)
                ended = b.seq[static_cast<size_t>(j)] == sq && b.tokens[j] == c.params.eos_token && ends_reach(b.pos[j]);
            if (ended) continue;
        }
        const std::pair<int32_t, int32_t> ref{sq, best};
        auto it = std::find(b.refs.begin(), b.refs.end(), ref);
        if (it == b.refs.end()) {
            b.refs.push_back(ref);
            it = b.refs.end() - 1;
        }
        b.img_of[static_cast<size_t>(i)] = static_cast<int32_t>(it - b.refs.begin());
    }
    b.n_xrows = 0;
    for (const auto & r : b.refs)
        b.n_xrows += c.seqs[static_cast<size_t>(r.first)].images[static_cast<size_t>(r.second)].n_rows;
}

mmv_status run_graph(mmd_context & c, Graph & g) {
    ggml_backend_sched_reset(c.sched.get());
    if (!ggml_backend_sched_alloc_graph(c.sched.get(), g.gf)) {
        return mmv::fail(MMV_ERR_OUT_OF_MEMORY, "cannot allocate the decoder graph on " + c.model->device_name);
    }
    return MMV_OK;
}

mmv_status compute(mmd_context & c, Graph & g) {
    const ggml_status st = ggml_backend_sched_graph_compute(c.sched.get(), g.gf);
    if (st != GGML_STATUS_SUCCESS) {
        ggml_backend_sched_reset(c.sched.get());
        return mmv::fail(st == GGML_STATUS_ALLOC_FAILED ? MMV_ERR_OUT_OF_MEMORY : MMV_ERR_BACKEND,
                         "decoder compute failed on " + c.model->device_name + " (ggml status " + std::to_string(st) + ")");
    }
    return MMV_OK;
}

mmv_status decode(mmd_context & c, Batch & b) {
    const mmd_model & m = *c.model;
    const int32_t n_ctx = c.params.n_ctx;
    plan(c, b);
    media(c, b);
    Graph g = build(c, b);
    mmv_status st = run_graph(c, g);
    if (st != MMV_OK) return st;

    const size_t NT = static_cast<size_t>(b.n);
    if (b.tokens) ggml_backend_tensor_set(g.inp, b.tokens, 0, NT * sizeof(int32_t));
    else ggml_backend_tensor_set(g.inp, b.embd, 0, NT * static_cast<size_t>(m.hp.n_embd) * sizeof(float));
    if (g.pos->buffer) ggml_backend_tensor_set(g.pos, b.pos, 0, NT * sizeof(int32_t));  // unused without rope (MPT)
    std::vector<int64_t> idx(NT);
    for (size_t i = 0; i < NT; ++i) idx[i] = static_cast<int64_t>(b.seq[i]) * n_ctx + b.pos[i];
    ggml_backend_tensor_set(g.kv_idx, idx.data(), 0, NT * sizeof(int64_t));
    // causal mask per sequence over its cells: a token sees a cell that holds a position <= its
    // own and is either already in the cache or written by this batch
    const float ninf = -std::numeric_limits<float>::infinity();
    for (size_t k = 0; k < b.seqs.size(); ++k) {
        const auto & used = c.seqs[static_cast<size_t>(b.seqs[k])].used;
        const size_t n_kv = static_cast<size_t>(b.kv_len[k]);
        const int32_t i0 = b.tok0[k], i1 = b.tok0[k] + b.n_tok[k];
        std::vector<uint8_t> visible(used.begin(), used.begin() + b.kv_len[k]);
        for (int32_t i = i0; i < i1; ++i) visible[static_cast<size_t>(b.pos[i])] = 1;
        std::vector<float> mask(n_kv * static_cast<size_t>(b.n_tok[k]), ninf);
        for (int32_t i = i0; i < i1; ++i)
            for (int32_t p = 0; p <= b.pos[i]; ++p)
                if (visible[static_cast<size_t>(p)]) {
                    // ALiBi (MPT): the mask carries -(distance), ggml scales it by each head's slope
                    const float d = m.hp.alibi_max_bias > 0.f ? -static_cast<float>(b.pos[i] - p) : 0.f;
                    mask[static_cast<size_t>(i - i0) * n_kv + static_cast<size_t>(p)] = d;
                }
        ggml_backend_tensor_set(g.masks[k], mask.data(), 0, mask.size() * sizeof(float));
    }
    if (b.n_xrows > 0) {
        const size_t R = static_cast<size_t>(b.n_xrows);
        std::vector<int32_t> rows;
        std::vector<int32_t> owner;  // ref index per row
        for (size_t r = 0; r < b.refs.size(); ++r) {
            const auto & im = c.seqs[static_cast<size_t>(b.refs[r].first)].images[static_cast<size_t>(b.refs[r].second)];
            for (int32_t j = 0; j < im.n_rows; ++j) {
                rows.push_back(im.slot * c.params.n_image_rows + j);
                owner.push_back(static_cast<int32_t>(r));
            }
        }
        // a token without an image attends uniformly (finite row) and its output is zeroed
        std::vector<float> xm(R * NT, 0.f), gate(NT, 0.f);
        for (size_t i = 0; i < NT; ++i) {
            const int32_t ref = b.img_of[i];
            if (ref < 0) continue;
            gate[i] = 1.f;
            for (size_t j = 0; j < R; ++j) xm[i * R + j] = owner[j] == ref ? 0.f : ninf;
        }
        ggml_backend_tensor_set(g.x_rows, rows.data(), 0, R * sizeof(int32_t));
        ggml_backend_tensor_set(g.x_mask, xm.data(), 0, xm.size() * sizeof(float));
        ggml_backend_tensor_set(g.x_gate, gate.data(), 0, NT * sizeof(float));
    }
    if (g.out_idx) ggml_backend_tensor_set(g.out_idx, b.out.data(), 0, b.out.size() * sizeof(int32_t));
    st = compute(c, g);
    if (st != MMV_OK) return st;
    for (size_t i = 0; i < NT; ++i) c.seqs[static_cast<size_t>(b.seq[i])].used[static_cast<size_t>(b.pos[i])] = 1;
    if (b.tokens && c.params.eos_token >= 0) {
        for (size_t i = 0; i < NT; ++i)
            if (b.tokens[i] == c.params.eos_token) c.seqs[static_cast<size_t>(b.seq[i])].eos.push_back(b.pos[i]);
        for (int32_t sq : b.seqs) {
            auto & eos = c.seqs[static_cast<size_t>(sq)].eos;
            std::sort(eos.begin(), eos.end());
            eos.erase(std::unique(eos.begin(), eos.end()), eos.end());
        }
    }
    const size_t V = static_cast<size_t>(m.hp.n_vocab);
    c.logits.resize(V * b.out.size());
    c.logits_row.assign(NT, -1);
    for (size_t j = 0; j < b.out.size(); ++j) {
        const int32_t i = b.orig.empty() ? b.out[j] : b.orig[static_cast<size_t>(b.out[j])];
        c.logits_row[static_cast<size_t>(i)] = static_cast<int32_t>(j);
    }
    if (!b.out.empty()) ggml_backend_tensor_get(g.out, c.logits.data(), 0, c.logits.size() * sizeof(float));
    ggml_backend_sched_reset(c.sched.get());
    return MMV_OK;
}

// Cross-attention keys/values of one image for every gated block, into its slot.
mmv_status add_image(mmd_context & c, int32_t seq, int32_t pos, const float * rows, int32_t n_rows) {
    const mmd_model & m = *c.model;
    const Hparams & hp = m.hp;
    auto & s = c.seqs[static_cast<size_t>(seq)];
    for (const auto & im : s.images)
        if (im.pos == pos) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "an image is already registered at position " + std::to_string(pos));
    auto free_slot = std::find(c.slot_used.begin(), c.slot_used.end(), 0);
    if (free_slot == c.slot_used.end()) {
        return mmv::fail(MMV_ERR_OUT_OF_MEMORY, "all " + std::to_string(c.params.n_image_slots) +
                                                    " image slots of the context are in use");
    }
    const int32_t slot = static_cast<int32_t>(free_slot - c.slot_used.begin());
    ggml_init_params ip{};
    ip.mem_size = c.graph_meta.size();
    ip.mem_buffer = c.graph_meta.data();
    ip.no_alloc = true;
    mmv::context_ptr gctx(ggml_init(ip));
    if (!gctx) throw std::bad_alloc();
    ggml_context * ctx = gctx.get();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, c.graph_size, false);
    ggml_tensor * in = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp.n_embd_image, n_rows);
    ggml_set_input(in);
    const int64_t EX = hp.n_embd_x();
    for (size_t xb = 0; xb < m.xblocks.size(); ++xb) {
        ggml_tensor *k = nullptr, *v = nullptr;
        if (hp.arch == Arch::Idefics) idefics_image_kv(ctx, m, xb, in, &k, &v);
        else openflamingo_image_kv(ctx, m, xb, in, &k, &v);
        const size_t off = static_cast<size_t>(slot) * static_cast<size_t>(c.params.n_image_rows);
        ggml_tensor * kd = ggml_view_2d(ctx, c.xk_cache[xb], EX, n_rows, c.xk_cache[xb]->nb[1], off * c.xk_cache[xb]->nb[1]);
        ggml_tensor * vd = ggml_view_2d(ctx, c.xv_cache[xb], EX, n_rows, c.xv_cache[xb]->nb[1], off * c.xv_cache[xb]->nb[1]);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, k, kd));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, v, vd));
    }
    ggml_backend_sched_reset(c.sched.get());
    if (!ggml_backend_sched_alloc_graph(c.sched.get(), gf)) {
        return mmv::fail(MMV_ERR_OUT_OF_MEMORY, "cannot allocate the image graph on " + m.device_name);
    }
    ggml_backend_tensor_set(in, rows, 0, static_cast<size_t>(n_rows) * hp.n_embd_image * sizeof(float));
    const ggml_status st = ggml_backend_sched_graph_compute(c.sched.get(), gf);
    ggml_backend_sched_reset(c.sched.get());
    if (st != GGML_STATUS_SUCCESS) return mmv::fail(MMV_ERR_BACKEND, "image key/value compute failed");
    c.slot_used[static_cast<size_t>(slot)] = 1;
    mmd_context::Image im;
    im.pos = pos;
    im.slot = slot;
    im.n_rows = n_rows;
    s.images.push_back(im);
    std::sort(s.images.begin(), s.images.end(), [](const auto & a, const auto & b2) { return a.pos < b2.pos; });
    return MMV_OK;
}

void truncate(mmd_context & c, int32_t seq, int32_t n_keep) {
    auto & s = c.seqs[static_cast<size_t>(seq)];
    for (size_t p = static_cast<size_t>(std::max(0, n_keep)); p < s.used.size(); ++p) s.used[p] = 0;
    std::vector<mmd_context::Image> keep;
    for (const auto & im : s.images) {
        if (im.pos < n_keep) keep.push_back(im);
        else c.slot_used[static_cast<size_t>(im.slot)] = 0;
    }
    s.images = keep;
    s.eos.erase(std::remove_if(s.eos.begin(), s.eos.end(), [&](int32_t e) { return e >= n_keep; }), s.eos.end());
}

void create(mmd_context & c) {
    const mmd_model & m = *c.model;
    const Hparams & hp = m.hp;
    const mmd_context_params & p = c.params;
    c.backend.reset(ggml_backend_dev_init(m.device, nullptr));
    if (!c.backend) throw mmv::Error(MMV_ERR_BACKEND, "cannot initialise device " + m.device_name);
    apply_n_threads(c.backend.get(), m.n_threads);
    if (ggml_backend_dev_type(m.device) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!cpu) throw mmv::Error(MMV_ERR_BACKEND, "no CPU backend is available");
        c.backend_cpu.reset(ggml_backend_dev_init(cpu, nullptr));
        if (!c.backend_cpu) throw mmv::Error(MMV_ERR_BACKEND, "cannot initialise the CPU backend");
        apply_n_threads(c.backend_cpu.get(), m.n_threads);
    }
    const size_t n_layer = static_cast<size_t>(hp.n_layer), n_x = m.xblocks.size();
    ggml_init_params ip{};
    ip.mem_size = ggml_tensor_overhead() * (2 * n_layer + 2 * n_x + 8);
    ip.no_alloc = true;
    c.ctx_kv.reset(ggml_init(ip));
    if (!c.ctx_kv) throw std::bad_alloc();
    const ggml_type kvt = p.kv_f16 ? GGML_TYPE_F16 : GGML_TYPE_F32;
    const int64_t cells = static_cast<int64_t>(p.n_ctx) * p.n_seq;
    for (size_t il = 0; il < n_layer; ++il) {
        c.k_cache.push_back(ggml_new_tensor_2d(c.ctx_kv.get(), kvt, hp.n_embd_kv(), cells));
        c.v_cache.push_back(ggml_new_tensor_2d(c.ctx_kv.get(), kvt, hp.n_embd_kv(), cells));
    }
    const int64_t xrows = static_cast<int64_t>(p.n_image_slots) * p.n_image_rows;
    for (size_t i = 0; i < n_x; ++i) {
        c.xk_cache.push_back(ggml_new_tensor_2d(c.ctx_kv.get(), kvt, hp.n_embd_x(), xrows));
        c.xv_cache.push_back(ggml_new_tensor_2d(c.ctx_kv.get(), kvt, hp.n_embd_x(), xrows));
    }
    c.buf_kv.reset(ggml_backend_alloc_ctx_tensors_from_buft(c.ctx_kv.get(), ggml_backend_dev_buffer_type(m.device)));
    if (!c.buf_kv) throw mmv::Error(MMV_ERR_OUT_OF_MEMORY, "not enough memory on " + m.device_name + " for the KV cache");
    ggml_backend_buffer_clear(c.buf_kv.get(), 0);
    c.slot_used.assign(static_cast<size_t>(p.n_image_slots), 0);
    c.seqs.resize(static_cast<size_t>(p.n_seq));
    for (auto & s : c.seqs) s.used.assign(static_cast<size_t>(p.n_ctx), 0);

    // several sequences in a batch: one attention per sequence and layer (about a dozen nodes)
    c.graph_size = (64 + 16 * static_cast<size_t>(p.n_seq)) * n_layer + 48 * n_x + 256;
    c.graph_meta.resize(ggml_tensor_overhead() * c.graph_size + ggml_graph_overhead_custom(c.graph_size, false));
    std::vector<ggml_backend_t> backends{c.backend.get()};
    if (c.backend_cpu) backends.push_back(c.backend_cpu.get());
    c.sched.reset(ggml_backend_sched_new(backends.data(), nullptr, static_cast<int>(backends.size()), c.graph_size,
                                         false, true));
    if (!c.sched) throw mmv::Error(MMV_ERR_BACKEND, "cannot create the ggml scheduler");
    // reserve for the largest batch: n_batch tokens over the whole context, every image row
    std::vector<int32_t> pos(static_cast<size_t>(p.n_batch), 0);
    Batch b;
    b.n = p.n_batch;
    b.pos = pos.data();
    b.seq.assign(static_cast<size_t>(p.n_batch), 0);
    b.seqs = {0};
    b.tok0 = {0};
    b.n_tok = {p.n_batch};
    b.kv_len = {p.n_ctx};
    b.out = {p.n_batch - 1};
    b.n_xrows = std::min<int32_t>(p.n_batch, p.n_image_slots) * p.n_image_rows;
    std::vector<int32_t> toks(static_cast<size_t>(p.n_batch), 0);
    b.tokens = toks.data();
    Graph g = build(c, b);
    if (!ggml_backend_sched_reserve(c.sched.get(), g.gf)) {
        throw mmv::Error(MMV_ERR_OUT_OF_MEMORY, "not enough memory on " + m.device_name + " for a batch of " +
                                                    std::to_string(p.n_batch) + " tokens");
    }
}


bool bad_seq(const mmd_context * c, int32_t seq) { return c == nullptr || seq < 0 || seq >= c->params.n_seq; }

// Positions inside the context, each (sequence, position) once, token ids in the vocabulary.
mmv_status bad_entries(const mmd_context & c, int32_t n, const int32_t * tokens, const int32_t * pos,
                       const int32_t * seq) {
    std::set<int64_t> seen;
    for (int32_t i = 0; i < n; ++i) {
        if (pos[i] < 0 || pos[i] >= c.params.n_ctx) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "position " + std::to_string(pos[i]) + " is outside the context (" +
                                                           std::to_string(c.params.n_ctx) + ")");
        }
        if (!seen.insert(static_cast<int64_t>(seq[i]) * c.params.n_ctx + pos[i]).second) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "a position of a sequence appears twice in the batch");
        }
        if (tokens && (tokens[i] < 0 || tokens[i] >= c.model->hp.n_vocab)) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "token id " + std::to_string(tokens[i]) + " is outside the vocabulary");
        }
    }
    return MMV_OK;
}

}  // namespace
}  // namespace mmd

extern "C" {

mmd_context_params mmd_context_default_params(void) {
    mmd_context_params p{};
    p.n_ctx = 2048;
    p.n_seq = 1;
    p.n_batch = 512;
    p.n_image_slots = 16;
    p.n_image_rows = 64;
    p.eos_token = -1;
    p.kv_f16 = 0;
    return p;
}

mmv_status mmd_context_new(mmd_model * model, const mmd_context_params * params, mmd_context ** out) {
    if (model == nullptr || out == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "NULL argument");
    *out = nullptr;
    const mmd_context_params p = params ? *params : mmd_context_default_params();
    if (p.n_ctx < 1 || p.n_seq < 1 || p.n_batch < 1 || p.n_image_slots < 1 || p.n_image_rows < 1) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "context sizes must be positive");
    }
    return mmv::guarded("decoding", [&]() {
        auto c = std::make_unique<mmd_context>();
        c->model = model;
        c->params = p;
        c->params.n_batch = std::min(p.n_batch, p.n_ctx);
        mmd::create(*c);
        *out = c.release();
        return MMV_OK;
    });
}

void mmd_context_free(mmd_context * ctx) {
    try {
        delete ctx;
    } catch (...) {
    }
}

mmv_status mmd_set_n_threads(mmd_context * ctx, int32_t n_threads) {
    if (ctx == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "ctx is NULL");
    ctx->model->n_threads = n_threads > 0 ? n_threads : static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
    mmd::apply_n_threads(ctx->backend.get(), ctx->model->n_threads);
    mmd::apply_n_threads(ctx->backend_cpu.get(), ctx->model->n_threads);
    return MMV_OK;
}

mmv_status mmd_add_image(mmd_context * ctx, int32_t seq, int32_t pos, const float * rows, int32_t n_rows) {
    if (mmd::bad_seq(ctx, seq) || rows == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "bad context, sequence or rows");
    if (pos < 0 || pos >= ctx->params.n_ctx) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "image position out of range");
    if (n_rows < 1 || n_rows > ctx->params.n_image_rows) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, std::to_string(n_rows) + " image rows; the context holds 1.." +
                                                       std::to_string(ctx->params.n_image_rows) + " per image");
    }
    return mmv::guarded("decoding", [&]() { return mmd::add_image(*ctx, seq, pos, rows, n_rows); });
}

mmv_status mmd_decode(mmd_context * ctx, int32_t seq, int32_t n, const int32_t * tokens, const float * embd,
                      const int32_t * pos, int32_t logits_last) {
    if (mmd::bad_seq(ctx, seq) || pos == nullptr) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "bad context, sequence or positions");
    if ((tokens == nullptr) == (embd == nullptr)) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "give tokens or embd");
    if (n < 1 || n > ctx->params.n_batch) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, std::to_string(n) + " tokens; 1.." + std::to_string(ctx->params.n_batch) + " per call");
    }
    const std::vector<int32_t> seqs(static_cast<size_t>(n), seq);
    if (mmd::bad_entries(*ctx, n, tokens, pos, seqs.data()) != MMV_OK) return MMV_ERR_INVALID_ARGUMENT;
    return mmv::guarded("decoding", [&]() {
        mmd::Batch b;
        b.seq = seqs;
        b.n = n;
        b.tokens = tokens;
        b.embd = embd;
        b.pos = pos;
        if (logits_last) b.out = {n - 1};
        return mmd::decode(*ctx, b);
    });
}

mmv_status mmd_decode_batch(mmd_context * ctx, int32_t n, const int32_t * tokens, const int32_t * pos,
                            const int32_t * seq_ids, const int8_t * logits) {
    if (ctx == nullptr || tokens == nullptr || pos == nullptr || seq_ids == nullptr) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "NULL context, tokens, positions or sequences");
    }
    if (n < 1 || n > ctx->params.n_batch) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, std::to_string(n) + " tokens; 1.." + std::to_string(ctx->params.n_batch) + " per call");
    }
    for (int32_t i = 0; i < n; ++i)
        if (mmd::bad_seq(ctx, seq_ids[i])) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "sequence " + std::to_string(seq_ids[i]) + " is outside 0.." +
                                                           std::to_string(ctx->params.n_seq - 1));
        }
    if (mmd::bad_entries(*ctx, n, tokens, pos, seq_ids) != MMV_OK) return MMV_ERR_INVALID_ARGUMENT;
    return mmv::guarded("decoding", [&]() {
        // grouped by sequence (stable: each sequence's tokens keep their order)
        mmd::Batch b;
        b.n = n;
        b.orig.resize(static_cast<size_t>(n));
        std::iota(b.orig.begin(), b.orig.end(), 0);
        std::stable_sort(b.orig.begin(), b.orig.end(), [&](int32_t x, int32_t y) { return seq_ids[x] < seq_ids[y]; });
        std::vector<int32_t> toks(static_cast<size_t>(n)), ps(static_cast<size_t>(n));
        for (int32_t j = 0; j < n; ++j) {
            const int32_t i = b.orig[static_cast<size_t>(j)];
            toks[static_cast<size_t>(j)] = tokens[i];
            ps[static_cast<size_t>(j)] = pos[i];
            b.seq.push_back(seq_ids[i]);
            if (logits ? logits[i] != 0 : i == n - 1) b.out.push_back(j);
        }
        b.tokens = toks.data();
        b.pos = ps.data();
        return mmd::decode(*ctx, b);
    });
}

const float * mmd_get_logits(const mmd_context * ctx) {
    if (ctx == nullptr) return nullptr;
    for (int32_t i = static_cast<int32_t>(ctx->logits_row.size()) - 1; i >= 0; --i)
        if (ctx->logits_row[static_cast<size_t>(i)] >= 0) return mmd_get_logits_ith(ctx, i);
    return nullptr;
}

const float * mmd_get_logits_ith(const mmd_context * ctx, int32_t i) {
    if (ctx == nullptr || i < 0 || static_cast<size_t>(i) >= ctx->logits_row.size()) return nullptr;
    const int32_t row = ctx->logits_row[static_cast<size_t>(i)];
    if (row < 0) return nullptr;
    return ctx->logits.data() + static_cast<size_t>(row) * static_cast<size_t>(ctx->model->hp.n_vocab);
}

int32_t mmd_pos_max(const mmd_context * ctx, int32_t seq) {
    if (mmd::bad_seq(ctx, seq)) return -1;
    const auto & used = ctx->seqs[static_cast<size_t>(seq)].used;
    for (int32_t p = static_cast<int32_t>(used.size()) - 1; p >= 0; --p)
        if (used[static_cast<size_t>(p)]) return p;
    return -1;
}

mmv_status mmd_truncate(mmd_context * ctx, int32_t seq, int32_t n_keep) {
    if (mmd::bad_seq(ctx, seq)) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "bad context or sequence");
    mmd::truncate(*ctx, seq, n_keep);
    return MMV_OK;
}

void mmd_clear(mmd_context * ctx) {
    if (ctx == nullptr) return;
    for (int32_t s = 0; s < ctx->params.n_seq; ++s) mmd::truncate(*ctx, s, 0);
    ctx->logits.clear();
    ctx->logits_row.clear();
}

int32_t mmd_n_images(const mmd_context * ctx, int32_t seq) {
    if (mmd::bad_seq(ctx, seq)) return 0;
    return static_cast<int32_t>(ctx->seqs[static_cast<size_t>(seq)].images.size());
}

}  // extern "C"
