// The compute graph: CLIP ViT (as transformers' CLIPVisionModel) + LLaVA projector, and
// mmv_encode.
//
// Layout per image (ggml ne order, innermost first):
//   patches  [3*p*p, n_patches]     host-side im2col of the normalised CHW pixels
//   x        [hidden, 1 + n_patches] class token FIRST, then patches row-major, + positions
//   blocks   pre-LN residual blocks: x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))
//   features hidden_states[f] for each feature layer f (concatenated along hidden)
//   output   [n_embd_out, n_patches] projector applied to the patch rows (class row dropped)
// A batch of B images adds a trailing dimension B to every activation.
#include "internal.h"
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

namespace mmv {
namespace {

ggml_tensor * layer_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b, float eps) {
    x = ggml_norm(ctx, x, eps);
    if (w) x = ggml_mul(ctx, x, w);
    if (b) x = ggml_add(ctx, x, b);
    return x;
}

ggml_tensor * linear(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, ggml_tensor * b) {
    x = ggml_mul_mat(ctx, w, x);
    if (b) x = ggml_add(ctx, x, b);
    return x;
}

// quick-GELU, x * sigmoid(1.702 x), written as silu(1.702 x) / 1.702: ggml's silu is computed
// in f32 (vectorised), whereas its gelu_quick goes through an f16 lookup table on the CPU.
ggml_tensor * quick_gelu(ggml_context * ctx, ggml_tensor * x, bool fast) {
    if (fast) return ggml_gelu_quick(ctx, x);
    const float a = 1.702f;
    return ggml_scale(ctx, ggml_silu(ctx, ggml_scale(ctx, x, a)), 1.0f / a);
}

// Exact GELU (erf), as torch.nn.GELU() / transformers' "gelu".
ggml_tensor * gelu(ggml_context * ctx, ggml_tensor * x, bool fast) {
    return fast ? ggml_gelu(ctx, x) : ggml_gelu_erf(ctx, x);
}

struct Graph {
    context_ptr ctx;
    ggml_cgraph * gf = nullptr;
    ggml_tensor * inp = nullptr;
    ggml_tensor * out = nullptr;
};

Graph build_graph(mmv_model & m, int32_t batch) {
    const Hparams & hp = m.hp;
    const int64_t H = hp.n_embd, NP = hp.n_patches(), NPOS = hp.n_pos(), B = batch;
    const int64_t NH = hp.n_head, DH = H / NH;

    ggml_init_params ip{};
    ip.mem_size = m.graph_meta.size();
    ip.mem_buffer = m.graph_meta.data();
    ip.no_alloc = true;
    Graph g;
    g.ctx.reset(ggml_init(ip));
    if (!g.ctx) throw std::bad_alloc();
    ggml_context * ctx = g.ctx.get();
    g.gf = ggml_new_graph_custom(ctx, m.graph_size, false);

    g.inp = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, hp.patch_k(), NP, B);
    ggml_set_name(g.inp, "patches");
    ggml_set_input(g.inp);

    // patch embedding (a stride-p convolution = one matmul over the im2col'd patches)
    ggml_tensor * kernel = ggml_reshape_2d(ctx, m.patch_w, hp.patch_k(), H);
    ggml_tensor * x = linear(ctx, g.inp, kernel, m.patch_b);  // [H, NP, B]

    // class token first, then the patches; positions 0..NP in that order
    ggml_tensor * cls = ggml_repeat_4d(ctx, ggml_reshape_3d(ctx, m.class_embd, H, 1, 1), H, 1, B, 1);
    x = ggml_concat(ctx, cls, x, 1);  // [H, NPOS, B]
    x = ggml_add(ctx, x, m.pos_embd);

    if (m.pre_ln_w) x = layer_norm(ctx, x, m.pre_ln_w, m.pre_ln_b, hp.eps);

    const float kq_scale = 1.0f / std::sqrt(static_cast<float>(DH));
    std::vector<ggml_tensor *> features;
    auto is_feature = [&](int32_t i) {
        return std::find(hp.feature_layers.begin(), hp.feature_layers.end(), i) != hp.feature_layers.end();
    };
    for (int32_t il = 0; il < hp.n_layer_run; ++il) {
        if (is_feature(il)) features.push_back(x);
        const ClipLayer & L = m.layers[static_cast<size_t>(il)];
        ggml_tensor * cur = layer_norm(ctx, x, L.ln1_w, L.ln1_b, hp.eps);

        ggml_tensor * q = linear(ctx, cur, L.q_w, L.q_b);
        ggml_tensor * k = linear(ctx, cur, L.k_w, L.k_b);
        ggml_tensor * v = linear(ctx, cur, L.v_w, L.v_b);
        q = ggml_permute(ctx, ggml_reshape_4d(ctx, q, DH, NH, NPOS, B), 0, 2, 1, 3);  // [DH, NPOS, NH, B]
        k = ggml_permute(ctx, ggml_reshape_4d(ctx, k, DH, NH, NPOS, B), 0, 2, 1, 3);

        if (m.flash_attn) {
            // fused attention on f32 K/V (exact; the CPU kernel avoids materialising KQ)
            ggml_tensor * vf = ggml_permute(ctx, ggml_reshape_4d(ctx, v, DH, NH, NPOS, B), 0, 2, 1, 3);
            if (hp.fast_math) {  // f16 K/V, as mtmd
                k = ggml_cast(ctx, k, GGML_TYPE_F16);
                vf = ggml_cast(ctx, vf, GGML_TYPE_F16);
            }
            ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, vf, nullptr, kq_scale, 0.0f, 0.0f);
            ggml_prec_set_acc(fa, GGML_PREC_F32);
            cur = ggml_reshape_3d(ctx, fa, H, NPOS, B);  // fa: [DH, NH, NPOS, B]
        } else {
            ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_4d(ctx, v, DH, NH, NPOS, B), 1, 2, 0, 3));
            ggml_tensor * kq = ggml_mul_mat(ctx, k, q);  // [NPOS_k, NPOS_q, NH, B]
            kq = ggml_soft_max_ext(ctx, kq, nullptr, kq_scale, 0.0f);
            ggml_tensor * kqv = ggml_mul_mat(ctx, vt, kq);  // [DH, NPOS_q, NH, B]
            kqv = ggml_permute(ctx, kqv, 0, 2, 1, 3);       // [DH, NH, NPOS, B]
            cur = ggml_cont_3d(ctx, kqv, H, NPOS, B);
        }
        cur = linear(ctx, cur, L.o_w, L.o_b);
        x = ggml_add(ctx, x, cur);

        cur = layer_norm(ctx, x, L.ln2_w, L.ln2_b, hp.eps);
        cur = linear(ctx, cur, L.fc1_w, L.fc1_b);
        cur = hp.use_gelu ? gelu(ctx, cur, hp.fast_math) : quick_gelu(ctx, cur, hp.fast_math);
        cur = linear(ctx, cur, L.fc2_w, L.fc2_b);
        x = ggml_add(ctx, x, cur);
    }
    if (is_feature(hp.n_layer_run)) features.push_back(x);

    ggml_tensor * emb = features[0];
    for (size_t i = 1; i < features.size(); ++i) emb = ggml_concat(ctx, emb, features[i], 0);

    // drop the class token (row 0)
    emb = ggml_view_3d(ctx, emb, emb->ne[0], NP, B, emb->nb[1], emb->nb[2], emb->nb[1]);
    emb = ggml_cont(ctx, emb);

    // projector
    emb = linear(ctx, emb, m.mm_a_w, m.mm_a_b);
    if (hp.projector == Projector::MlpNorm) emb = layer_norm(ctx, emb, m.mm_norm1_w, m.mm_norm1_b, hp.eps);
    emb = gelu(ctx, emb, false);
    emb = linear(ctx, emb, m.mm_b_w, m.mm_b_b);
    if (hp.projector == Projector::MlpNorm) emb = layer_norm(ctx, emb, m.mm_norm2_w, m.mm_norm2_b, hp.eps);

    g.out = emb;
    ggml_set_name(g.out, "embeddings");
    ggml_set_output(g.out);
    ggml_build_forward_expand(g.gf, g.out);
    return g;
}

// im2col on the host: CHW pixels of one image -> [n_patches][3*p*p] (k = kx + p*(ky + p*c)),
// the memory layout of the [3*p*p, n_patches] input tensor.
void im2col(const Hparams & hp, const float * chw, float * dst) {
    const int S = hp.image_size, P = hp.patch_size, G = hp.grid();
    const size_t K = static_cast<size_t>(hp.patch_k());
    for (int py = 0; py < G; ++py) {
        for (int px = 0; px < G; ++px) {
            float * row = dst + static_cast<size_t>(py * G + px) * K;
            for (int c = 0; c < 3; ++c) {
                for (int ky = 0; ky < P; ++ky) {
                    const float * src = chw + (static_cast<size_t>(c) * S + static_cast<size_t>(py * P + ky)) * S +
                                        static_cast<size_t>(px * P);
                    std::memcpy(row + static_cast<size_t>(P) * (ky + static_cast<size_t>(P) * c), src,
                                sizeof(float) * static_cast<size_t>(P));
                }
            }
        }
    }
}

}  // namespace

mmv_status build_and_reserve(mmv_model & m) {
    m.graph_size = std::max<size_t>(1024, 64 * static_cast<size_t>(m.hp.n_layer_run) + 256);
    m.graph_meta.resize(ggml_tensor_overhead() * m.graph_size + ggml_graph_overhead_custom(m.graph_size, false));

    std::vector<ggml_backend_t> backends;
    backends.push_back(m.backend.get());
    if (m.backend_cpu) backends.push_back(m.backend_cpu.get());
    m.sched.reset(ggml_backend_sched_new(backends.data(), nullptr, static_cast<int>(backends.size()),
                                         m.graph_size, false, true));
    if (!m.sched) return fail(MMV_ERR_BACKEND, "cannot create the ggml scheduler");
    // Fused attention when the device runs it on f32 K/V (the CPU does); else the explicit
    // KQ / softmax / KQV path, which every backend supports.
    m.flash_attn = !m.hp.no_flash_attn;
    Graph g = build_graph(m, m.max_batch);
    if (m.flash_attn) {
        for (int i = 0; i < ggml_graph_n_nodes(g.gf); ++i) {
            ggml_tensor * node = ggml_graph_node(g.gf, i);
            if (node->op == GGML_OP_FLASH_ATTN_EXT && !ggml_backend_supports_op(m.backend.get(), node)) {
                m.flash_attn = false;
                break;
            }
        }
        if (!m.flash_attn) {
            g = Graph();  // release the first graph before reusing its metadata buffer
            g = build_graph(m, m.max_batch);
        }
    }
    if (!ggml_backend_sched_reserve(m.sched.get(), g.gf)) {
        return fail(MMV_ERR_OUT_OF_MEMORY, "not enough memory on " + m.device_name + " for a batch of " +
                                               std::to_string(m.max_batch) + " image(s)");
    }
    return MMV_OK;
}

mmv_status encode(mmv_model & m, const float * pixels, int32_t n_images, float * out) {
    const Hparams & hp = m.hp;
    const size_t img_floats = 3ull * hp.image_size * hp.image_size;
    const size_t out_floats = static_cast<size_t>(hp.n_patches()) * hp.n_embd_out;
    const size_t patch_floats = static_cast<size_t>(hp.n_patches()) * hp.patch_k();
    for (int32_t done = 0; done < n_images;) {
        const int32_t b = std::min(m.max_batch, n_images - done);
        m.patches.resize(patch_floats * static_cast<size_t>(b));
        for (int32_t i = 0; i < b; ++i) {
            im2col(hp, pixels + img_floats * static_cast<size_t>(done + i), m.patches.data() + patch_floats * i);
        }
        Graph g = build_graph(m, b);
        ggml_backend_sched_reset(m.sched.get());
        if (!ggml_backend_sched_alloc_graph(m.sched.get(), g.gf)) {
            return fail(MMV_ERR_OUT_OF_MEMORY, "cannot allocate the compute graph on " + m.device_name);
        }
        ggml_backend_tensor_set(g.inp, m.patches.data(), 0, m.patches.size() * sizeof(float));
        ggml_status st = ggml_backend_sched_graph_compute(m.sched.get(), g.gf);
        if (st != GGML_STATUS_SUCCESS) {
            ggml_backend_sched_reset(m.sched.get());
            return fail(st == GGML_STATUS_ALLOC_FAILED ? MMV_ERR_OUT_OF_MEMORY : MMV_ERR_BACKEND,
                        "compute failed on " + m.device_name + " (ggml status " + std::to_string(st) + ")");
        }
        ggml_backend_tensor_get(g.out, out + out_floats * static_cast<size_t>(done), 0,
                                out_floats * static_cast<size_t>(b) * sizeof(float));
        ggml_backend_sched_reset(m.sched.get());
        done += b;
    }
    return MMV_OK;
}

}  // namespace mmv

extern "C" mmv_status mmv_encode(mmv_model * model, const float * pixels, int32_t n_images, float * out,
                                 size_t out_len) {
    if (model == nullptr || pixels == nullptr || out == nullptr) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "NULL argument");
    }
    if (n_images <= 0) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "n_images must be positive");
    const size_t need = static_cast<size_t>(n_images) * model->hp.n_patches() * model->hp.n_embd_out;
    if (out_len < need) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "output buffer holds " + std::to_string(out_len) +
                                                       " floats, " + std::to_string(need) + " needed");
    }
    try {
        std::lock_guard<std::mutex> lock(model->mutex);
        mmv_status st = mmv::encode(*model, pixels, n_images, out);
        if (st == MMV_OK) mmv::clear_error();
        return st;
    } catch (const std::bad_alloc &) {
        return mmv::fail(MMV_ERR_OUT_OF_MEMORY, "out of memory while encoding");
    } catch (const std::exception & e) {
        return mmv::fail(MMV_ERR_INTERNAL, e.what());
    } catch (...) {
        return mmv::fail(MMV_ERR_INTERNAL, "unknown error while encoding");
    }
}
