// The family-independent part of encoding: graph contexts, the attention-path decision,
// memory reservation, batching, inputs and output, and the mmv_encode* entry points.
#include "host_kernels.h"
#include "internal.h"
#include "model.h"
#include "profile.h"

#include <algorithm>
#include <cstring>
#include <new>

namespace mmv {
namespace {

struct Graph {
    context_ptr ctx;
    ggml_cgraph * gf = nullptr;
    GraphInputs in;
    ggml_tensor * out = nullptr;
};

Graph build_graph(mmv_model & m, int32_t batch, int32_t n_text) {
    const Hparams & hp = m.hp;
    ggml_init_params ip{};
    ip.mem_size = m.graph_meta.size();
    ip.mem_buffer = m.graph_meta.data();
    ip.no_alloc = true;
    Graph g;
    g.ctx.reset(ggml_init(ip));
    if (!g.ctx) throw std::bad_alloc();
    ggml_context * ctx = g.ctx.get();
    g.gf = ggml_new_graph_custom(ctx, m.graph_size, false);

    g.in.batch = batch;
    g.in.patches = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, hp.patch_k(), hp.n_patches(), batch);
    ggml_set_name(g.in.patches, "patches");
    ggml_set_input(g.in.patches);
    if (hp.text_input && n_text > 0) {
        g.in.n_text = n_text;
        g.in.text = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_text);
        ggml_set_name(g.in.text, "text");
        ggml_set_input(g.in.text);
    }
    Arith ar;
    ar.fast_math = hp.fast_math;
    ar.flash_attn = m.flash_attn;
    ar.host_kernels = host_kernels_usable(m.backend.get());
    g.out = m.family->build(ctx, hp, g.in, ar);
    ggml_set_name(g.out, "embeddings");
    ggml_set_output(g.out);
    ggml_build_forward_expand(g.gf, g.out);
    return g;
}

}  // namespace

mmv_status build_and_reserve(mmv_model & m) {
    m.graph_size = std::max<size_t>(1024, m.family->graph_size(m.hp));
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
    const int32_t n_text = m.hp.text_input ? std::max(1, m.hp.n_text_max) : 0;
    Graph g = build_graph(m, m.max_batch, n_text);
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
            g = build_graph(m, m.max_batch, n_text);
        }
    }
    if (!ggml_backend_sched_reserve(m.sched.get(), g.gf)) {
        return fail(MMV_ERR_OUT_OF_MEMORY, "not enough memory on " + m.device_name + " for a batch of " +
                                               std::to_string(m.max_batch) + " image(s)");
    }
    return MMV_OK;
}

mmv_status encode(mmv_model & m, const float * pixels, int32_t n_images, const int32_t * text, int32_t n_text,
                  float * out) {
    const Hparams & hp = m.hp;
    const size_t img_floats = 3ull * hp.image_size * hp.image_size;
    const size_t out_floats = static_cast<size_t>(hp.n_tokens) * hp.n_embd_out;
    const size_t patch_floats = static_cast<size_t>(hp.n_patches()) * hp.patch_k();
    for (int32_t done = 0; done < n_images;) {
        const int32_t b = std::min(m.max_batch, n_images - done);
        m.patches.resize(patch_floats * static_cast<size_t>(b));
        for (int32_t i = 0; i < b; ++i) {
            im2col(hp.image_size, hp.patch_size, pixels + img_floats * static_cast<size_t>(done + i),
                   m.patches.data() + patch_floats * i);
        }
        Graph g = build_graph(m, b, n_text);
        ggml_backend_sched_reset(m.sched.get());
        if (!ggml_backend_sched_alloc_graph(m.sched.get(), g.gf)) {
            return fail(MMV_ERR_OUT_OF_MEMORY, "cannot allocate the compute graph on " + m.device_name);
        }
        ggml_backend_tensor_set(g.in.patches, m.patches.data(), 0, m.patches.size() * sizeof(float));
        if (g.in.text) ggml_backend_tensor_set(g.in.text, text, 0, sizeof(int32_t) * static_cast<size_t>(n_text));
        NodeProfiler prof;
        prof.attach(m.sched.get());
        ggml_status st = ggml_backend_sched_graph_compute(m.sched.get(), g.gf);
        prof.report();
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

namespace {

mmv_status encode_checked(mmv_model * model, const float * pixels, int32_t n_images, const int32_t * text,
                          int32_t n_text, float * out, size_t out_len) {
    if (model == nullptr || pixels == nullptr || out == nullptr) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "NULL argument");
    }
    if (n_images <= 0) return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "n_images must be positive");
    const mmv::Hparams & hp = model->hp;
    if (hp.text_input) {
        if (text == nullptr || n_text <= 0) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT,
                             "this model (" + hp.projector_name + ") reads an instruction: use mmv_encode_text");
        }
        if (n_text > hp.n_text_max) {
            return mmv::fail(MMV_ERR_INVALID_ARGUMENT, std::to_string(n_text) + " text tokens, at most " +
                                                           std::to_string(hp.n_text_max) + " fit");
        }
        for (int32_t i = 0; i < n_text; ++i) {
            if (text[i] < 0 || text[i] >= hp.n_text_vocab) {
                return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "text token id " + std::to_string(text[i]) +
                                                               " is outside the vocabulary (" +
                                                               std::to_string(hp.n_text_vocab) + ")");
            }
        }
    } else if (n_text != 0) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "this model (" + hp.projector_name + ") reads no text");
    }
    const size_t need = static_cast<size_t>(n_images) * hp.n_tokens * hp.n_embd_out;
    if (out_len < need) {
        return mmv::fail(MMV_ERR_INVALID_ARGUMENT, "output buffer holds " + std::to_string(out_len) +
                                                       " floats, " + std::to_string(need) + " needed");
    }
    return mmv::guarded("encoding", [&]() {
        std::lock_guard<std::mutex> lock(model->mutex);
        return mmv::encode(*model, pixels, n_images, text, n_text, out);
    });
}

}  // namespace

extern "C" mmv_status mmv_encode(mmv_model * model, const float * pixels, int32_t n_images, float * out,
                                 size_t out_len) {
    return encode_checked(model, pixels, n_images, nullptr, 0, out, out_len);
}

extern "C" mmv_status mmv_encode_text(mmv_model * model, const float * pixels, int32_t n_images,
                                      const int32_t * tokens, int32_t n_tokens, float * out, size_t out_len) {
    return encode_checked(model, pixels, n_images, tokens, n_tokens, out, out_len);
}
