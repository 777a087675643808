"""``load_model``: open a text GGUF (and its projector) and build a ``LoadedModel``.

Files are validated in Python first, so a corrupt or mismatched file is a one-line
``UserError`` rather than a llama.cpp abort.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mmchat.errors import UserError
from mmchat.gguf_meta import GGUFInfo, read_gguf
from mmchat.runtime import _llama
from mmchat.runtime.encdec import EncoderDecoderBackend, force_single, is_encoder_decoder
from mmchat.runtime.model import LoadedModel
from mmchat.runtime.options import DEFAULT_N_CTX, LoadOptions
from mmchat.runtime.template import select_template


def _projector_width(info: GGUFInfo) -> int | None:
    """The output width of a LLaVA-style projector (``mm.2``), if the file has one."""
    bias = info.tensor("mm.2.bias")
    if bias is not None and bias.shape:
        return int(bias.shape[0])
    weight = info.tensor("mm.2.weight")
    if weight is not None and len(weight.shape) >= 2:
        return int(weight.shape[1])
    return None


META_LEGACY_SPACES = "mmchat.tokenizer.legacy_spaces"
META_SPACE_AFTER_IMAGE = "mmchat.tokenizer.space_after_image"


def _legacy_spaces(info: GGUFInfo, text: _llama.TextModel, image_token: str) -> bool:
    """Whether text after a special token or an image gets SentencePiece's "▁" (see
    ``LoadedModel.legacy_spaces``), when the caller does not say:

    1. the GGUF key ``mmchat.tokenizer.legacy_spaces`` (bool), when a converter wrote it
       (transformers' ``legacy`` flag of the checkpoint's tokenizer);
    2. a vocabulary holding the image token (``<image>``) as one token was packaged for
       transformers' processor, which tokenizes the whole prompt at once with ``<image>`` as
       an added special token; the llava-hf tokenizers are ``legacy=False``: no "▁" → False;
    3. otherwise (original LLaVA / BakLLaVA and the GGUFs published from them): LLaVA's
       ``tokenizer_image_token`` tokenized each chunk around the image on its own, so the
       text after the image starts with "▁" — what the model was trained with, and what
       llama.cpp's mtmd does → True.
    """
    value = info.get(META_LEGACY_SPACES)
    if isinstance(value, bool):
        return value
    if image_token:
        ids = text.tokenize(image_token, add_special=False, parse_special=True)
        if len(ids) == 1 and text.token_text(ids[0]) == image_token:
            return False
    return True


def _free(text: _llama.TextModel, ctx: _llama.Context, vision: Any) -> None:
    try:
        if vision is not None:
            vision.close()
    finally:
        ctx.close()
        text.close()


def load_model(
    model: str | Path,
    mmproj: str | Path | None = None,
    options: LoadOptions | None = None,
    *,
    template: str | None = None,
    legacy_spaces: bool | None = None,
) -> LoadedModel:
    """Load a text GGUF (and its projector: vision and/or audio) for chatting.

    ``template``: Jinja source or a known format name overriding the GGUF's chat template
    (a store manifest's ``template``). ``legacy_spaces``: see ``LoadedModel.legacy_spaces``;
    None decides from the file.

    Files are validated in Python first: a corrupt or truncated file, a projector given as
    the model (or the reverse) and a projector whose output width differs from the text
    model's embedding width are ``UserError``s with a one-line message.
    """
    opts = options or LoadOptions()
    opts.validate()
    t0 = time.perf_counter()
    path = Path(model).expanduser()
    info = read_gguf(path, role="model")
    if info.is_mmproj:
        raise UserError(f"{path} is a projector (mmproj) file, not a text model")
    if is_encoder_decoder(info):  # T5: one sequence, no batch scheduler (encdec.py)
        opts = force_single(opts)
    n_embd_meta = info.arch_key("embedding_length")
    mm_path: Path | None = None
    mm_info: GGUFInfo | None = None
    if mmproj is not None:
        mm_path = Path(mmproj).expanduser()
        mm_info = read_gguf(mm_path, role="projector (mmproj)")
        if not mm_info.is_mmproj:
            raise UserError(
                f"{mm_path} is not a projector (mmproj) file "
                f"(its architecture is {mm_info.architecture or 'unknown'!r}, expected 'clip')"
            )
        width = _projector_width(mm_info)
        cross_attention = _is_cross_attention(mm_info)  # IDEFICS: rows are the ViT's width
        if (
            width is not None
            and not cross_attention
            and isinstance(n_embd_meta, int)
            and width != n_embd_meta
        ):
            raise UserError(
                f"the projector {mm_path.name} outputs {width}-wide embeddings but the text "
                f"model {path.name} takes {n_embd_meta}: they do not belong together"
            )

    _llama.ensure_backend(opts.verbose)
    if mm_info is not None and mm_path is not None and _is_cross_attention(mm_info):
        text, ctx, vision = _open_cross_attention(path, mm_path, info, opts)
    else:
        text, ctx, vision = _open_libllama(path, mm_path, opts)
    try:
        names = [
            info.get("general.name"),
            info.get("general.basename"),
            info.get("general.finetune"),
            path.name,
            path.parent.name,
        ]
        bos = text.token_text(text.bos) if text.bos >= 0 else ""
        eos = text.token_text(text.eos) if text.eos >= 0 else ""
        tmpl = select_template(
            explicit=template,
            gguf_template=text.chat_template(),
            model_names=[n if isinstance(n, str) else None for n in names],
            bos_token=bos,
            eos_token=eos,
        )
        tmpl.image_separator = str(getattr(vision, "image_separator", "") or "")
        if vision is not None and getattr(vision, "kind", "") == "mtmd":
            # images go where llama-server puts them: mtmd's marker in the message text,
            # the family's wrapper tokens added by mtmd; text pieces tokenized as mtmd does
            tmpl.marker_style = "mtmd"
            if legacy_spaces is None and not isinstance(info.get(META_LEGACY_SPACES), bool):
                legacy_spaces = True
        if legacy_spaces is None:
            legacy_spaces = _legacy_spaces(info, text, tmpl.image_token)
    except BaseException:
        if vision is not None:
            vision.close()
        if ctx is not None:
            ctx.close()
        text.close()
        raise
    load_ms = (time.perf_counter() - t0) * 1000
    return LoadedModel(
        path=path,
        mmproj_path=mm_path,
        options=opts,
        info=info,
        text=text,
        ctx=ctx,
        vision=vision,
        template=tmpl,
        legacy_spaces=bool(legacy_spaces),
        space_after_media=_bool_key(info, META_SPACE_AFTER_IMAGE),
        load_ms=load_ms,
    )


def _bool_key(info: GGUFInfo, key: str) -> bool | None:
    value = info.get(key)
    return value if isinstance(value, bool) else None


def _open_libllama(path: Path, mm_path: Path | None, opts: LoadOptions) -> tuple[Any, Any, Any]:
    """libllama's model and context (``n_parallel`` sequences of ``n_ctx`` cells; for an
    encoder-decoder model the ``EncoderDecoderBackend`` over one) and the vision engine
    ``open_vision`` routes the projector to."""
    n_gpu_layers = opts.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if _llama.supports_gpu_offload() else 0
    text = _llama.TextModel(
        str(path), n_gpu_layers=n_gpu_layers, verbose=opts.verbose, tensor_split=opts.tensor_split
    )
    ctx: Any = None
    vision: Any = None
    try:
        n_ctx = opts.n_ctx or min(DEFAULT_N_CTX, text.n_ctx_train or DEFAULT_N_CTX)
        if text.has_encoder:  # an encoder-decoder model (T5)
            ctx = EncoderDecoderBackend(
                text,
                path,
                n_ctx=n_ctx,
                n_threads=opts.n_threads,
                flash_attn=opts.flash_attn,
                kv_cache_type=opts.kv_cache_type,
            )
        else:
            ctx = _llama.Context(
                text,
                n_ctx=n_ctx * opts.n_parallel,
                n_batch=opts.n_batch,
                n_threads=opts.n_threads,
                flash_attn=opts.flash_attn,
                kv_cache_type=opts.kv_cache_type,
                n_seq_max=opts.n_parallel,
            )
        if mm_path is not None:
            from mmchat.vision import open_vision

            vision = open_vision(
                mm_path,
                text_n_embd=text.n_embd_inp,
                n_threads=opts.n_threads,
                device=opts.vision_device,
                llama_model=text.address,
                flash_attn=opts.flash_attn,
            )
    except BaseException:
        if ctx is not None:
            ctx.close()
        text.close()
        raise
    return text, ctx, vision


def _is_cross_attention(mm_info: GGUFInfo) -> bool:
    """A projector for a decoder with cross-attention (IDEFICS), which libllama cannot run."""
    from mmchat.runtime.flamingo import is_flamingo

    return is_flamingo(mm_info)


def _open_cross_attention(
    path: Path, mm_path: Path, info: GGUFInfo, opts: LoadOptions
) -> tuple[Any, Any, Any]:
    """The second text backend: mmchat's cross-attention decoder on ggml (IDEFICS), with a
    vocabulary-only libllama load for the tokenizer, and its vision engine."""
    from mmchat.runtime.flamingo import open_parts

    trained = info.arch_key("context_length")
    n_ctx = opts.n_ctx or min(DEFAULT_N_CTX, int(trained) if trained else DEFAULT_N_CTX)
    kv = opts.kv_cache_type if opts.kv_cache_type in ("f32", "f16") else "f16"
    return open_parts(
        path,
        mm_path,
        n_ctx=n_ctx,
        n_seq=opts.n_parallel,
        n_batch=opts.n_batch,
        n_threads=opts.n_threads,
        device=opts.vision_device,
        kv_cache_type=kv,
    )
