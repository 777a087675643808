/* libmmvision's text decoder for cross-attention (Flamingo-style) language models — C ABI.
 *
 * IDEFICS v1: a Llama decoder with a gated cross-attention block before every
 * cross_layer_interval-th layer, reading per-image feature rows (the Perceiver output of the
 * "idefics" vision family). File layout: docs/idefics-gguf.md.
 * OpenFlamingo: a GPT-NeoX decoder with open_flamingo's gated blocks (the Perceiver output of
 * the "openflamingo" vision family). File layout: docs/openflamingo-gguf.md.
 * The text GGUF's general.architecture picks the decoder ("llama": IDEFICS, "gptneox":
 * OpenFlamingo); mmd_model_info.architecture names it ("idefics" / "openflamingo").
 *
 * Style as mmvision.h: opaque handles, status codes (mmv_status), the message of the last
 * failure on this thread in mmv_last_error(). This part of the library has its own version
 * (mmd_abi_version), so adding it left MMV_ABI_VERSION unchanged.
 *
 * Sequences, positions, images:
 *  - a context holds n_seq sequences of up to n_ctx positions each; the KV cell of a token is
 *    its position, so tokens may be decoded at any position < n_ctx (normally pos_max + 1);
 *  - mmd_add_image(seq, pos, rows) registers an image whose <image> token sits at `pos`
 *    (call it before decoding that token); its cross-attention keys/values are computed once,
 *    then (IDEFICS's processor, open_flamingo's only_attend_immediate_media) a token at
 *    position p attends only to the image with the largest position <= p, and to none when
 *    there is none or when an end-of-sequence token (params.eos_token; -1 for OpenFlamingo,
 *    whose <|endofchunk|> does not end an image's reach) lies strictly between that image
 *    and p. A token attending to
 *    no image gets no cross-attention output; the gated dense part still applies to it;
 *  - mmd_truncate drops positions >= n_keep (tokens, images and end-of-sequence marks);
 *  - mmd_decode_batch decodes tokens of several sequences in one graph (parallel generation):
 *    each token attends to its own sequence's cells and its own sequence's image only, so the
 *    logits equal those of decoding each sequence alone.
 *
 * ABI version 2 added mmd_decode_batch and mmd_get_logits_ith.
 */
#ifndef MMDECODER_H
#define MMDECODER_H

#include "mmvision.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MMD_ABI_VERSION 2

typedef struct mmd_model mmd_model;
typedef struct mmd_context mmd_context;

typedef struct mmd_model_params {
    const char * device;  /* NULL/"" = best device (first GPU, else CPU); "cpu"; or a name */
    int32_t n_threads;    /* CPU threads; <= 0 = all hardware threads */
} mmd_model_params;

typedef struct mmd_model_info {
    char    architecture[32];  /* "idefics" or "openflamingo" */
    char    device[128];
    int32_t n_vocab;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;
    int32_t n_ff;
    int32_t n_ctx_train;
    int32_t n_cross;           /* gated cross-attention blocks */
    int32_t n_embd_image;      /* width of the image rows the cross-attention reads */
} mmd_model_info;

typedef struct mmd_context_params {
    int32_t n_ctx;            /* positions per sequence */
    int32_t n_seq;            /* sequences */
    int32_t n_batch;          /* most tokens per mmd_decode call */
    int32_t n_image_slots;    /* images held at once (all sequences together) */
    int32_t n_image_rows;     /* most rows per image (the vision model's n_tokens) */
    int32_t eos_token;        /* end-of-sequence id that ends an image's reach; -1: none */
    int32_t kv_f16;           /* 1: f16 K/V (self-attention cache and image keys/values; default f32: exact) */
} mmd_context_params;

MMV_API int32_t mmd_abi_version(void);

MMV_API mmd_model_params   mmd_model_default_params(void);
MMV_API mmd_context_params mmd_context_default_params(void);

/* Reads a text GGUF written by mmchat's converter for a cross-attention model. */
MMV_API mmv_status mmd_model_load(const char * path, const mmd_model_params * params, mmd_model ** out);
MMV_API void       mmd_model_free(mmd_model * model);
MMV_API mmv_status mmd_model_get_info(const mmd_model * model, mmd_model_info * out);

MMV_API mmv_status mmd_context_new(mmd_model * model, const mmd_context_params * params, mmd_context ** out);
MMV_API void       mmd_context_free(mmd_context * ctx);
MMV_API mmv_status mmd_set_n_threads(mmd_context * ctx, int32_t n_threads);

/* rows: n_rows x n_embd_image floats (row-major). */
MMV_API mmv_status mmd_add_image(mmd_context * ctx, int32_t seq, int32_t pos, const float * rows, int32_t n_rows);

/* Decode n tokens (tokens != NULL) or n embedding rows (embd: n x n_embd floats) of sequence
 * `seq` at positions pos[0..n). With logits_last, the logits of the last one are computed
 * (mmd_get_logits). n <= n_batch. */
MMV_API mmv_status mmd_decode(mmd_context * ctx, int32_t seq, int32_t n, const int32_t * tokens, const float * embd,
                              const int32_t * pos, int32_t logits_last);

/* Decode n tokens of any sequences in one batch: token i at position pos[i] of sequence
 * seq_ids[i] (each (sequence, position) once).
 * logits: n flags, the logits of the tokens flagged non-zero are computed (mmd_get_logits_ith);
 * NULL: the last token's only. n <= n_batch. */
MMV_API mmv_status mmd_decode_batch(mmd_context * ctx, int32_t n, const int32_t * tokens, const int32_t * pos,
                                    const int32_t * seq_ids, const int8_t * logits);

/* n_vocab floats: the logits of the last mmd_decode with logits_last (after mmd_decode_batch:
 * of its highest-index token with logits); NULL if there are none. Valid until the next decode. */
MMV_API const float * mmd_get_logits(const mmd_context * ctx);

/* n_vocab floats: the logits of token i of the last mmd_decode / mmd_decode_batch; NULL if
 * none were computed for it. Valid until the next decode. */
MMV_API const float * mmd_get_logits_ith(const mmd_context * ctx, int32_t i);

MMV_API int32_t    mmd_pos_max(const mmd_context * ctx, int32_t seq); /* -1 when empty */
MMV_API mmv_status mmd_truncate(mmd_context * ctx, int32_t seq, int32_t n_keep);
MMV_API void       mmd_clear(mmd_context * ctx);
/* images currently registered for `seq` */
MMV_API int32_t    mmd_n_images(const mmd_context * ctx, int32_t seq);

#ifdef __cplusplus
}
#endif

#endif /* MMDECODER_H */
