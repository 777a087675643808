// The family table: clip.projector_type -> the family that runs it. Adding a family is one
// file in families/ and one row here.
#include "family.h"

namespace mmv {
namespace {

const FamilyEntry kFamilies[] = {
    {"mlp", make_clip_family},       // LLaVA 1.5 / 1.6, BakLLaVA
    {"mlp_norm", make_clip_family},  // LLaVA with normed projector
    {"linear", make_clip_family},          // NeVA: one linear layer
    {"mlp_deep", make_clip_family},        // NeVA mlpNx_gelu, N > 2
    {"mlp_downsample", make_clip_family},  // NeVA / VILA: 2x2 patch merge + LN + MLP
    {"qformer", make_qformer_family},  // BLIP-2, InstructBLIP (EVA ViT + Q-Former)
    {"eva_concat", make_eva_concat_family},  // MiniGPT-v2 (EVA ViT, 4 rows concatenated)
    {"idefics", make_idefics_family},  // IDEFICS v1 (CLIP ViT + Perceiver resampler)
    {"openflamingo", make_idefics_family},  // OpenFlamingo (OpenCLIP ViT + Perceiver, no CLS)
    {"internvit", make_internvit_family},  // NVLM-D (InternViT + pixel shuffle + mlp1)
};

}  // namespace

std::unique_ptr<Family> make_family(const std::string & projector_type, std::string * known) {
    for (const FamilyEntry & e : kFamilies) {
        if (projector_type == e.projector_type) return e.create();
    }
    if (known) {
        known->clear();
        for (const FamilyEntry & e : kFamilies) *known += (known->empty() ? "" : ", ") + std::string(e.projector_type);
    }
    return nullptr;
}

}  // namespace mmv
