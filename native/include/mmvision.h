/* libmmvision: mmchat's vision engine on ggml — public C ABI.
 *
 * Style follows llama.h: opaque handles, plain structs, status codes; no C++ exception
 * ever crosses this boundary. Functions that can fail return an mmv_status and leave a
 * human-readable message retrievable with mmv_last_error() (thread-local).
 */
#ifndef MMVISION_H
#define MMVISION_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  ifdef MMV_BUILD
#    define MMV_API __declspec(dllexport)
#  else
#    define MMV_API __declspec(dllimport)
#  endif
#else
#  define MMV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define MMV_ABI_VERSION 4

typedef enum mmv_status {
    MMV_OK = 0,
    MMV_ERR_INVALID_ARGUMENT = 1,
    MMV_ERR_IO = 2,          /* file missing or unreadable */
    MMV_ERR_FORMAT = 3,      /* not a valid / complete GGUF, missing tensor or key */
    MMV_ERR_UNSUPPORTED = 4, /* valid file, but a projector/tensor type we do not run */
    MMV_ERR_BACKEND = 5,     /* no usable ggml backend / device, or a compute failure */
    MMV_ERR_OUT_OF_MEMORY = 6,
    MMV_ERR_INTERNAL = 7,
} mmv_status;

/* --- library ------------------------------------------------------------------ */

MMV_API int32_t      mmv_abi_version(void);
MMV_API const char * mmv_version(void);        /* mmchat native library version */
MMV_API const char * mmv_ggml_version(void);   /* version of the ggml it runs on */
MMV_API const char * mmv_ggml_commit(void);    /* commit of that ggml */
MMV_API const char * mmv_ggml_build_version(void); /* ggml version it was compiled against */
MMV_API const char * mmv_last_error(void);     /* message of the last failure on this thread */

/* --- CPU self-test --------------------------------------------------------------------
 *
 * Runs one small quantized matrix product with the weights in every extra buffer type the
 * CPU backend offers (AMX, repacked layouts), checked against a plain CPU buffer. Some
 * virtual machines advertise AMX but fault on its instructions: then this call crashes the
 * process (SIGILL), so callers run it in a child process. report: a short summary. */
MMV_API mmv_status mmv_cpu_extra_buffers_selftest(char * report, size_t report_len);

/* --- compute devices (the ggml backend registry) --------------------------------- */

typedef enum mmv_device_type {
    MMV_DEVICE_CPU = 0,
    MMV_DEVICE_GPU = 1,
    MMV_DEVICE_IGPU = 2,
    MMV_DEVICE_ACCEL = 3,
} mmv_device_type;

typedef struct mmv_device_info {
    char     name[128];
    char     description[256];
    char     backend[64];     /* backend registry name, e.g. "CPU", "CUDA", "Metal" */
    int32_t  type;            /* mmv_device_type */
    uint64_t memory_free;     /* bytes; 0 when the backend does not report it */
    uint64_t memory_total;
} mmv_device_info;

MMV_API int32_t    mmv_device_count(void);
MMV_API mmv_status mmv_device_get_info(int32_t index, mmv_device_info * out);

/* --- vision models (an mmproj GGUF: vision encoder + connector) --------------------
 *
 * mmv_model_load() reads the file with gguf, picks the family its clip.projector_type names,
 * checks every key and tensor that family's graph needs (names, shapes, types) and uploads
 * the weights to the chosen device. Families (native/src/families/, table in family.cpp):
 *   "mlp", "mlp_norm": CLIP ViT + LLaVA projector (LLaVA 1.5/1.6, BakLLaVA). Both the layout
 *       mmchat's converter writes and the legacy published layout (clip.has_llava_projector,
 *       block_count = n - 1 without clip.vision.feature_layer, ffn_up/ffn_down swapped).
 *   "qformer": EVA ViT + Q-Former + language projection (BLIP-2, InstructBLIP), see
 *       docs/vision-gguf.md. InstructBLIP files read an instruction (info.text_input = 1).
 */

typedef struct mmv_model mmv_model;

typedef struct mmv_model_params {
    const char * device;       /* NULL or "" = best device (first GPU, else CPU); "cpu"; or a
                                  device name as mmv_device_get_info reports it ("CUDA0") */
    int32_t n_threads;         /* CPU threads; <= 0 = all hardware threads */
    int32_t expected_n_embd;   /* > 0: fail with MMV_ERR_FORMAT unless the projector output
                                  width equals it (the text model's n_embd) */
    int32_t max_batch;         /* most images per compute graph (>= 1); mmv_encode splits */
    int32_t flags;             /* MMV_FLAG_* */
} mmv_model_params;

/* Arithmetic as llama.cpp's mtmd does it: ggml's f16-table/tanh activations instead of the
   exact erf-GELU and f32 quick-GELU, and attention on f16 K/V. Faster on CPU; relative error
   ~3e-4 against transformers instead of ~1e-7. */
#define MMV_FLAG_FAST_MATH 1
/* Never use the fused flash-attention op (by default it is used where the device runs it
   on f32 K/V, which is exact; the CPU does). */
#define MMV_FLAG_NO_FLASH_ATTN 2

typedef struct mmv_model_info {
    char    projector_type[32];  /* "mlp", "mlp_norm", "qformer" */
    char    device[128];         /* the device the weights live on */
    int32_t image_size;          /* square input side in pixels */
    int32_t patch_size;
    int32_t n_tokens;            /* embedding rows per image ((image_size / patch_size)^2 for
                                    LLaVA, the number of queries for a Q-Former) */
    int32_t n_embd;              /* projector output width (= the LLM's n_embd) */
    int32_t n_embd_vision;       /* ViT hidden width */
    int32_t n_layer_file;        /* clip.vision.block_count */
    int32_t n_layer_run;         /* blocks actually run (the feature layer) */
    int32_t legacy_layout;       /* 1 when the file uses the legacy published layout */
    int32_t ffn_swapped;         /* 1 when ffn_up/ffn_down were stored swapped */
    int32_t use_gelu;            /* 1: GELU(erf) in the ViT MLP, 0: quick-GELU */
    float   image_mean[3];
    float   image_std[3];
    float   eps;
    int32_t flash_attn;          /* 1 when the graph uses the fused attention op */
    int32_t text_input;          /* 1: the rows depend on token ids (use mmv_encode_text) */
    int32_t n_text_max;          /* most token ids mmv_encode_text takes */
    int32_t n_text_vocab;        /* token ids must be below this */
} mmv_model_info;

MMV_API mmv_model_params mmv_model_default_params(void);

/* On failure returns the status, sets mmv_last_error() and leaves *out NULL. */
MMV_API mmv_status mmv_model_load(const char * path, const mmv_model_params * params,
                                  mmv_model ** out);
MMV_API void       mmv_model_free(mmv_model * model);
MMV_API mmv_status mmv_model_get_info(const mmv_model * model, mmv_model_info * out);
MMV_API mmv_status mmv_model_set_n_threads(mmv_model * model, int32_t n_threads);

/* Encode n_images preprocessed images.
 * pixels: n_images x 3 x image_size x image_size floats (CHW, already normalised with the
 *         file's mean/std, exactly what the model's image processor produces);
 * out:    n_images x n_tokens x n_embd floats; out_len is its length in floats.
 * Calls on one model are serialised internally. Fails (MMV_ERR_INVALID_ARGUMENT) for a
 * model with text input. */
MMV_API mmv_status mmv_encode(mmv_model * model, const float * pixels, int32_t n_images,
                              float * out, size_t out_len);

/* As mmv_encode for models that read text (info.text_input = 1, e.g. InstructBLIP's
 * instruction): tokens: n_tokens ids (1 <= n_tokens <= info.n_text_max, each below
 * info.n_text_vocab), already tokenized with the file's own tokenizer, shared by all
 * n_images images. */
MMV_API mmv_status mmv_encode_text(mmv_model * model, const float * pixels, int32_t n_images,
                                   const int32_t * tokens, int32_t n_tokens, float * out,
                                   size_t out_len);

#ifdef __cplusplus
}
#endif

#endif /* MMVISION_H */
