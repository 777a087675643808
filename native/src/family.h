// The contract between the generic engine (loading, devices, scheduling, mmv_encode) and one
// model family (its keys, tensors and graph). A family lives in native/src/families/<name>.cpp
// and registers itself in the table of family.cpp by the clip.projector_type values it runs.
//
// What the engine does for every family: open and check the GGUF, choose the device, upload
// the tensors the family declared, decide whether fused attention runs on the device, reserve
// compute memory, im2col the pixels on the host, split batches, copy the output back.
// What a family does: read its keys (filling the common Hparams), declare its tensors through
// the WeightLoader, and build the graph from the patches input (+ text ids if it reads text).
#pragma once

#include "blocks.h"
#include "mmvision.h"

#include "ggml.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mmv {

class WeightLoader;

// What every family reports and the engine needs (filled by Family::load).
struct Hparams {
    std::string projector_name;
    int32_t image_size = 0;
    int32_t patch_size = 0;
    int32_t n_tokens = 0;       // embedding rows per image
    int32_t n_embd_out = 0;     // width of each row (= the LLM's n_embd)
    float image_mean[3] = {0.f, 0.f, 0.f};
    float image_std[3] = {1.f, 1.f, 1.f};
    float eps = 1e-5f;          // the vision tower's LayerNorm eps
    int32_t text_input = 0;     // 1: the family reads token ids (mmv_encode_text)
    int32_t n_text_max = 0;     // most token ids per call
    int32_t n_text_vocab = 0;   // token ids must be < this
    // informational (mmv_model_info)
    int32_t n_embd_vision = 0;
    int32_t n_layer_file = 0;
    int32_t n_layer_run = 0;
    bool use_gelu = false;
    bool legacy_layout = false;
    bool ffn_swapped = false;
    // load flags
    bool fast_math = false;
    bool no_flash_attn = false;

    int32_t grid() const { return image_size / patch_size; }
    int32_t n_patches() const { return grid() * grid(); }
    int32_t patch_k() const { return 3 * patch_size * patch_size; }
};

// Inputs of one graph, created by the engine.
struct GraphInputs {
    ggml_tensor * patches = nullptr;  // f32 [3*p*p, n_patches, B]
    ggml_tensor * text = nullptr;     // i32 [n_text] (same text for every image), or null
    int32_t batch = 1;
    int32_t n_text = 0;
};

class Family {
  public:
    virtual ~Family() = default;
    // Read keys into hp (common part) and declare every tensor. Throws via the loader's
    // error helpers (format_error / unsupported) on anything missing or inconsistent.
    virtual void load(WeightLoader & w, Hparams & hp) = 0;
    // Graph nodes needed for one graph (an upper bound).
    virtual size_t graph_size(const Hparams & hp) const = 0;
    // [n_embd_out, n_tokens, B] output from the inputs.
    virtual ggml_tensor * build(ggml_context * ctx, const Hparams & hp, const GraphInputs & in,
                                const Arith & ar) const = 0;
};

struct FamilyEntry {
    const char * projector_type;
    std::unique_ptr<Family> (*create)();
};

// The family that runs `projector_type`, or null. `known` receives the list of names.
std::unique_ptr<Family> make_family(const std::string & projector_type, std::string * known);

// families/*.cpp
std::unique_ptr<Family> make_clip_family();
std::unique_ptr<Family> make_qformer_family();
std::unique_ptr<Family> make_eva_concat_family();
std::unique_ptr<Family> make_idefics_family();
std::unique_ptr<Family> make_internvit_family();

}  // namespace mmv
