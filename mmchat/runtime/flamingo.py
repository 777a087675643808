"""Flamingo-style models (IDEFICS v1, OpenFlamingo) in the runtime: a second text backend
beside libllama.

They do not put image rows into the token sequence: an image is one ``<image>`` token
whose Perceiver rows feed the gated cross-attention blocks of the decoder (libmmvision's
decoder, ``mmchat.native.decoder``). The pieces here fit the runtime's existing contracts:

- :class:`FlamingoBackend` implements ``TextBackend`` (decode at explicit positions per
  sequence, truncate by position, logits). ``decode_embeddings`` with rows of the *image*
  width (the vision tower's: 1280 for IDEFICS's ViT-H, the decoder's ``n_embd`` is 4096 or
  8192) means "the image whose ``<image>`` token sits at ``pos``": the backend registers the
  rows (cross-attention K/V computed once) and decodes the ``<image>`` token there. Rows of
  width ``n_embd`` (when it differs) are ordinary input embeddings.
- :class:`IdeficsEngine` is the ``VisionEngine`` of projector types ``idefics`` and
  ``openflamingo``: rows cached per image like every engine. IDEFICS: its preprocessing
  (bicubic resize to the square input, CLIP mean/std) and the layout ``[image block of
  n_latents rows advancing ONE position, <fake_token_around_image>]``: with the converter's
  template, which writes ``<fake_token_around_image>`` once before each run of image markers,
  a message with two images becomes ``<fake><image><fake><image><fake>``, as IDEFICS's
  processor writes it. OpenFlamingo: open_clip's preprocessing (short side resized, centre
  crop) and the ``<image>`` token alone.
- Per-model facts come from the projector file: the image token, and whether an
  end-of-sequence token ends an image's reach (IDEFICS: yes; OpenFlamingo:
  ``openflamingo.eos_ends_image`` false, ``<|endofchunk|>`` does not).
- :class:`VocabModel` is the tokenizer: libllama reading only the vocabulary of the text
  GGUF (``vocab_only``: the cross-attention tensors stop a full libllama load on purpose).
- sampling runs llama.cpp's sampler chain on this backend's logits array
  (``SamplerChain.sample_logits``).
- :class:`IdeficsRuntime` ties them together for direct use and the parity tests
  (``evaluate_ids``: a prompt as token ids with its images; ``generate``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmchat.errors import CorruptFileError, UserError
from mmchat.gguf_meta import GGUFInfo
from mmchat.runtime import _llama
from mmchat.runtime._llama import C, TextModel
from mmchat.runtime.sampler import SamplerChain
from mmchat.vision.cache import EmbeddingCache
from mmchat.vision.engine import ImageEmbedding, VisionEngine, read_mmproj_header
from mmchat.vision.image import PreparedImage, clip_crop_pixels
from mmchat.vision.layout import EmbedSpan, Layout, TextSpan

PROJECTOR = "idefics"
PROJECTORS = (PROJECTOR, "openflamingo")


# --- tokenizer --------------------------------------------------------------------------


class VocabModel(TextModel):
    """The vocabulary of a text GGUF through libllama (``vocab_only``): tokenize,
    detokenize, pieces, special tokens, end-of-generation, chat template."""

    def __init__(self, path: str, *, verbose: bool = False) -> None:
        _llama.ensure_backend(verbose)
        params = C.llama_model_default_params()
        params.vocab_only = True
        _llama.clear_recent_errors()
        ptr = C.llama_model_load_from_file(path.encode("utf-8"), params)
        if not ptr:
            why = _llama.recent_errors()
            raise CorruptFileError(
                f"llama.cpp cannot read the vocabulary of {path}" + (f": {why}" if why else "")
            )
        self.ptr = ptr
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self._piece_cache: dict[int, bytes] = {}
        # a vocab-only load reads no hyper-parameters: take them from the metadata
        self.arch = self.meta("general.architecture") or "llama"
        self.n_embd = int(self.meta(f"{self.arch}.embedding_length") or 0)
        self.n_embd_inp = self.n_embd
        self.n_pos_per_embd = 1
        self.n_ctx_train = int(self.meta(f"{self.arch}.context_length") or 0)
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.eos = int(C.llama_vocab_eos(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))

    def desc(self) -> str:
        n_layer = self.meta(f"{self.arch}.block_count") or "?"
        family = {"llama": "idefics", "gptneox": "openflamingo", "mpt": "openflamingo"}.get(
            self.arch, self.arch
        )
        return f"{family} {n_layer} layers, {self.n_embd} wide (cross-attention decoder)"


# --- the decoder backend ----------------------------------------------------------------


class FlamingoBackend:
    """``TextBackend`` over libmmvision's cross-attention decoder (see the module doc)."""

    def __init__(
        self,
        text_path: str | Path,
        *,
        n_ctx: int,
        n_batch: int = 512,
        n_seq: int = 1,
        n_threads: int | None = None,
        device: str | None = None,
        image_token: int,
        eos_token: int,
        n_image_rows: int,
        n_image_slots: int = 16,
        kv_f16: bool = False,
    ) -> None:
        from mmchat.native.decoder import DecoderContext, DecoderModel
        from mmchat.native.model import (
            MMV_ERR_BACKEND,
            MMV_ERR_INVALID_ARGUMENT,
            MMV_ERR_OUT_OF_MEMORY,
            NativeError,
        )

        threads = int(n_threads or _llama.usable_cpus())
        try:
            self.model = DecoderModel(text_path, device=device, n_threads=threads)
            self.ctx = DecoderContext(
                self.model,
                n_ctx=n_ctx,
                n_seq=n_seq,
                n_batch=n_batch,
                n_image_slots=n_image_slots,
                n_image_rows=n_image_rows,
                eos_token=eos_token,
                kv_f16=kv_f16,
            )
        except NativeError as exc:
            if exc.status in (MMV_ERR_INVALID_ARGUMENT, MMV_ERR_BACKEND, MMV_ERR_OUT_OF_MEMORY):
                raise UserError(f"Cannot load {Path(text_path).name}: {exc}") from None
            raise CorruptFileError(
                f"Cannot load the cross-attention text model {text_path}: {exc}"
            ) from None
        self.info = self.model.info
        self.n_ctx = int(n_ctx)
        self.n_ctx_seq = int(n_ctx)
        """Positions each sequence may use (``LoadedModel.n_ctx``)."""
        self.n_embd_image = int(self.info.n_embd_image)
        """Image rows (the vision width) go to the cross-attention."""
        self.n_batch = self.ctx.n_batch
        self.n_ubatch = self.ctx.n_batch
        self.n_threads = threads
        self.image_token = int(image_token)
        self._error = NativeError
        self._mixed: dict[int, np.ndarray] = {}
        self._perf = {
            "load_ms": 0.0,
            "prompt_eval_ms": 0.0,
            "eval_ms": 0.0,
            "n_prompt_eval": 0.0,
            "n_eval": 0.0,
        }

    @property
    def n_pos_per_embd(self) -> int:
        return 1

    def _run(
        self,
        pos: np.ndarray,
        *,
        tokens: np.ndarray | None,
        embd: np.ndarray | None,
        logits_last: bool,
        seq_id: int,
    ) -> None:
        n = len(pos)
        t0 = time.perf_counter()
        for s in range(0, n, self.n_batch):
            e = min(n, s + self.n_batch)
            try:
                self.ctx.decode(
                    pos[s:e],
                    tokens=None if tokens is None else tokens[s:e],
                    embd=None if embd is None else embd[s:e],
                    logits_last=logits_last and e == n,
                    seq=seq_id,
                )
            except self._error as exc:
                raise _llama.DecodeError(3, f"the cross-attention decoder failed: {exc}") from None
        ms = (time.perf_counter() - t0) * 1000.0
        key = "eval" if n == 1 and logits_last else "prompt_eval"
        self._perf[f"{key}_ms"] += ms
        self._perf[f"n_{key}"] += n

    def perf(self) -> dict[str, float]:
        """Timings as ``_llama.Context.perf`` reports them (a single token with logits counts
        as a generation step)."""
        return dict(self._perf)

    @staticmethod
    def _positions(pos: int | np.ndarray, n: int) -> np.ndarray:
        if isinstance(pos, np.ndarray):
            if pos.size != n:
                raise ValueError(f"{pos.size} positions for {n} entries")
            return pos.astype(np.int32)
        return np.arange(int(pos), int(pos) + n, dtype=np.int32)

    def decode_tokens(
        self, tokens: np.ndarray, pos: int | np.ndarray, *, logits_last: bool, seq_id: int = 0
    ) -> None:
        toks = np.asarray(tokens, dtype=np.int32)
        self._run(
            self._positions(pos, len(toks)),
            tokens=toks,
            embd=None,
            logits_last=logits_last,
            seq_id=seq_id,
        )

    def decode_one(self, token: int, pos: int, seq_id: int = 0) -> None:
        self.decode_tokens(np.array([token], dtype=np.int32), pos, logits_last=True, seq_id=seq_id)

    def add_image(self, rows: np.ndarray, pos: int, seq_id: int = 0) -> None:
        """Register an image whose ``<image>`` token is at ``pos`` (decode it afterwards)."""
        try:
            self.ctx.add_image(rows, int(pos), seq=seq_id)
        except self._error as exc:
            raise UserError(f"Cannot attach the image: {exc}") from None

    def decode_embeddings(
        self,
        embd: np.ndarray,
        pos: int | np.ndarray,
        *,
        logits_last: bool,
        non_causal: bool = False,
        seq_id: int = 0,
    ) -> None:
        if embd.ndim != 2:
            raise ValueError(f"embeddings of shape {embd.shape}")
        if embd.shape[1] == self.n_embd_image:
            # an image: its rows go to the cross-attention, its <image> token to the sequence
            p = int(pos if not isinstance(pos, np.ndarray) else pos.reshape(-1)[0])
            self.add_image(embd, p, seq_id)
            self.decode_tokens(
                np.array([self.image_token], dtype=np.int32),
                p,
                logits_last=logits_last,
                seq_id=seq_id,
            )
            return
        if embd.shape[1] != self.info.n_embd:
            raise ValueError(
                f"rows of width {embd.shape[1]}: neither image rows ({self.info.n_embd_image}) "
                f"nor input embeddings ({self.info.n_embd})"
            )
        if non_causal:
            raise UserError("the cross-attention decoder has no non-causal embedding input")
        self._run(
            self._positions(pos, len(embd)),
            tokens=None,
            embd=embd,
            logits_last=logits_last,
            seq_id=seq_id,
        )

    def decode_mixed(
        self, tokens: np.ndarray, pos: np.ndarray, seq_ids: np.ndarray, logits: np.ndarray
    ) -> None:
        """Tokens of several sequences (parallel serving), as ``_llama.Context.decode_mixed``:
        one graph per ``n_batch`` entries, each token attending to its own sequence only; the
        logits of the entries ``logits`` marks are kept for ``logits_at(i)``."""
        toks = np.asarray(tokens, dtype=np.int32)
        p = np.asarray(pos, dtype=np.int32)
        seqs = np.asarray(seq_ids, dtype=np.int32)
        want = np.asarray(logits, dtype=np.int8)
        self._mixed = {}
        n = len(toks)
        t0 = time.perf_counter()
        for s in range(0, n, self.n_batch):
            e = min(n, s + self.n_batch)
            try:
                self.ctx.decode_batch(toks[s:e], p[s:e], seqs[s:e], want[s:e])
            except self._error as exc:
                raise _llama.DecodeError(3, f"the cross-attention decoder failed: {exc}") from None
            for i in np.flatnonzero(want[s:e]):
                self._mixed[s + int(i)] = self.ctx.logits_ith(int(i))
        key = "eval" if n == 1 else "prompt_eval"  # as llama.cpp counts a batch
        self._perf[f"{key}_ms"] += (time.perf_counter() - t0) * 1000.0
        self._perf[f"n_{key}"] += n

    def logits_at(self, i: int) -> np.ndarray:
        """Logits of entry ``i`` of the last ``decode_mixed``."""
        if i not in self._mixed:
            raise RuntimeError(f"no logits were computed for batch entry {i}")
        return self._mixed[i]

    def pos_max(self, seq_id: int = 0) -> int:
        return self.ctx.pos_max(seq_id)

    def truncate(self, n_keep: int, seq_id: int = 0) -> bool:
        self.ctx.truncate(max(0, int(n_keep)), seq_id)
        return True

    def clear(self) -> None:
        self.ctx.clear()

    def last_logits(self) -> np.ndarray:
        return self.ctx.logits()

    def sample(self, chain: SamplerChain) -> int:
        """The generation step's sampling (llama.cpp's chain on this backend's logits)."""
        return chain.sample_logits(self.last_logits())

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


# --- the vision engine ------------------------------------------------------------------


def idefics_pixels(
    image: PreparedImage | Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """IdeficsImageProcessor: RGB, bicubic resize to size x size (no crop, no padding),
    /255, normalise; float32 [3, size, size]."""
    img = image.image if isinstance(image, PreparedImage) else image
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    a = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


class IdeficsEngine(VisionEngine):
    """Projector types ``idefics`` / ``openflamingo`` on libmmvision: CLIP ViT + Perceiver
    rows per image."""

    kind = "mmvision"

    def __init__(
        self,
        mmproj: Path,
        *,
        n_threads: int | None = None,
        device: str | None = None,
        max_batch: int = 4,
        cache: EmbeddingCache | None = None,
        disk_cache: bool | Path = False,
    ) -> None:
        from mmchat.vision.engine import open_native_vision

        super().__init__(mmproj, cache=cache, disk_cache=disk_cache)
        meta = read_mmproj_header(mmproj)
        proj = str(meta.get("clip.projector_type", ""))
        self.openflamingo = proj == "openflamingo"
        ns = "openflamingo" if self.openflamingo else "idefics"
        try:
            self.image_token = int(meta.get(f"{ns}.image_token_id"))
            self.fake_token = -1 if self.openflamingo else int(meta.get("idefics.fake_token_id"))
        except (TypeError, ValueError):
            raise CorruptFileError(
                f"{mmproj} lacks {ns}.image_token_id (or its fake token)"
            ) from None
        self.eos_ends_image = bool(meta.get(f"{ns}.eos_ends_image", True))
        """Whether an end-of-sequence token ends an image's reach (IDEFICS's rule)."""
        self.model = open_native_vision(
            mmproj, device=device, n_threads=n_threads, max_batch=max_batch
        )
        info = self.model.info
        if info.projector_type not in PROJECTORS:
            self.model.close()
            raise UserError(
                f"{mmproj.name} is a '{info.projector_type}' projector, not IDEFICS/OpenFlamingo"
            )
        self.info = info
        self.projector_type = info.projector_type
        self.n_embd = info.n_embd
        self.image_size = info.image_size

    def tokens_for(self, image: PreparedImage) -> int:
        return self.info.n_tokens

    def layout(self, image: PreparedImage) -> Layout:
        if self.openflamingo:  # the <image> token alone
            return (EmbedSpan(int(self.info.n_tokens), 1),)
        return idefics_layout(self.info.n_tokens, self.fake_token)

    def pixels(self, image: PreparedImage) -> np.ndarray:
        size, mean, std = self.info.image_size, self.info.image_mean, self.info.image_std
        if self.openflamingo:  # open_clip's transform: short side resized, centre crop
            return clip_crop_pixels(image, size, mean, std)
        return idefics_pixels(image, size, mean, std)

    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        t0 = time.perf_counter()
        rows = self.model.encode(np.stack([self.pixels(im) for im in images]))
        ms = (time.perf_counter() - t0) * 1000.0 / max(1, len(images))
        return [
            ImageEmbedding(
                digest=im.digest,
                embeddings=np.ascontiguousarray(rows[i]),
                layout=self.layout(im),
                encode_ms=ms,
            )
            for i, im in enumerate(images)
        ]

    def _close(self) -> None:
        self.model.close()


def idefics_layout(n_rows: int, fake_token: int) -> Layout:
    """An IDEFICS image in the prompt: the ``<image>`` token carrying ``n_rows`` rows (one
    position), then ``<fake_token_around_image>``."""
    return (EmbedSpan(int(n_rows), 1), TextSpan((int(fake_token),)))


# --- loading ----------------------------------------------------------------------------


def is_flamingo(mmproj_info: GGUFInfo) -> bool:
    """Whether a projector header belongs to a cross-attention model (the loader's switch)."""
    return str(mmproj_info.get("clip.projector_type", "")) in PROJECTORS


def open_parts(
    text_path: str | Path,
    mmproj_path: str | Path,
    *,
    n_ctx: int,
    n_seq: int = 1,
    n_batch: int = 512,
    n_threads: int | None = None,
    device: str | None = None,
    kv_cache_type: str = "f32",
    n_image_slots: int = 16,
) -> tuple[VocabModel, FlamingoBackend, IdeficsEngine]:
    """What ``load_model`` needs for an IDEFICS / OpenFlamingo pair: the tokenizer (in place of
    ``_llama.TextModel``), the decoder (in place of ``_llama.Context``; ``n_ctx`` positions
    per sequence) and the vision engine; everything is closed again on failure."""
    if kv_cache_type not in ("f32", "f16"):
        raise UserError(
            f"the cross-attention decoder keeps its KV cache in f32 or f16, not {kv_cache_type}"
        )
    engine = IdeficsEngine(Path(mmproj_path), n_threads=n_threads, device=device)
    vocab: VocabModel | None = None
    try:
        vocab = VocabModel(str(text_path))
        backend = FlamingoBackend(
            text_path,
            n_ctx=n_ctx,
            n_seq=n_seq,
            n_batch=n_batch,
            n_threads=n_threads,
            device=device,
            image_token=engine.image_token,
            eos_token=vocab.eos if engine.eos_ends_image else -1,
            n_image_rows=engine.info.n_tokens,
            n_image_slots=n_image_slots,
            kv_f16=kv_cache_type == "f16",
        )
    except BaseException:
        if vocab is not None:
            vocab.close()
        engine.close()
        raise
    if backend.info.n_embd_image != engine.n_embd or backend.info.n_vocab != vocab.n_vocab:
        backend.close()
        vocab.close()
        engine.close()
        raise UserError(
            f"{Path(mmproj_path).name} gives image rows of width {engine.n_embd} but the "
            f"decoder reads {backend.info.n_embd_image}: the files do not belong together"
        )
    return vocab, backend, engine


# --- direct use ---------------------------------------------------------------------------


@dataclass
class IdeficsRuntime:
    """Tokenizer, vision engine and decoder of one converted IDEFICS / OpenFlamingo model."""

    vocab: VocabModel
    engine: IdeficsEngine
    backend: FlamingoBackend

    @classmethod
    def open(
        cls,
        text_path: str | Path,
        mmproj_path: str | Path,
        *,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        device: str | None = None,
    ) -> IdeficsRuntime:
        vocab, backend, engine = open_parts(
            text_path,
            mmproj_path,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            device=device,
        )
        return cls(vocab, engine, backend)

    def prefill(self, ids: Sequence[int], images: Sequence[np.ndarray], seq_id: int = 0) -> None:
        """Decode a prompt given as token ids with its ``<image>`` tokens in place and the
        image rows in their order (the sequence is cleared first)."""
        slots = [i for i, t in enumerate(ids) if t == self.engine.image_token]
        if len(slots) != len(images):
            raise UserError(f"{len(slots)} <image> tokens but {len(images)} images")
        self.backend.truncate(0, seq_id)
        start = 0
        for p, rows in zip(slots, images, strict=True):
            if p > start:
                self.backend.decode_tokens(
                    np.asarray(ids[start:p]), start, logits_last=False, seq_id=seq_id
                )
            self.backend.decode_embeddings(rows, p, logits_last=p == len(ids) - 1, seq_id=seq_id)
            start = p + 1
        if start < len(ids):
            self.backend.decode_tokens(
                np.asarray(ids[start:]), start, logits_last=True, seq_id=seq_id
            )

    def evaluate_ids(self, ids: Sequence[int], images: Sequence[np.ndarray]) -> np.ndarray:
        """Final logits of a prompt (see ``prefill``)."""
        self.prefill(ids, images)
        return self.backend.last_logits()

    def generate(
        self, ids: Sequence[int], images: Sequence[np.ndarray], n: int, chain: SamplerChain
    ) -> list[int]:
        self.prefill(ids, images)
        out: list[int] = []
        pos = len(ids)
        for _ in range(n):
            tok = self.backend.sample(chain)
            out.append(tok)
            if self.vocab.is_eog(tok):
                break
            self.backend.decode_one(tok, pos)
            pos += 1
        return out

    def close(self) -> None:
        self.backend.close()
        self.engine.close()
        self.vocab.close()
