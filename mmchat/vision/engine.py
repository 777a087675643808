"""Vision engines behind one interface, with caching, and ``open_vision`` which picks one.

LLaVA projectors (``mlp``, ``mlp_norm``) run on libmmvision, mmchat's exact CLIP graph; every
other projector type runs on llama.cpp's mtmd (Gemma 3, Qwen2.5-VL, SmolVLM, InternVL …).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError
from mmchat.gguf_meta import GGUFInfo, read_gguf
from mmchat.settings import load_settings
from mmchat.vision.cache import (
    CachedEntry,
    DiskCache,
    EmbeddingCache,
    file_digest,
    shared_cache,
)
from mmchat.vision.image import PreparedImage, clip_crop_pixels, llava_pixels
from mmchat.vision.layout import (
    EmbedSpan,
    Layout,
    TextSpan,
    layout_from_array,
    layout_to_array,
    single_block,
)

LLAVA_PROJECTORS = ("mlp", "mlp_norm", "linear", "mlp_deep", "mlp_downsample")  # + NeVA's
# How the LLaVA engine prepares pixels: absent/"pad" = LLaVA's pad to square + resize,
# "resize_crop" = CLIPImageProcessor's resize of the short side + centre crop (NeVA)
PREPROCESS_KEY = "mmchat.vision.image_preprocess"


@dataclass
class ImageEmbedding:
    """What the runtime injects for one image or audio clip (``llama_batch.embd``).

    ``embeddings`` holds the rows of every block in order; ``layout`` says how they are laid
    out in the prompt (text spans such as ``<start_of_image>`` or tile separators, and
    embedding blocks), as mtmd returns them. A LLaVA image is one block.
    """

    digest: str
    embeddings: np.ndarray
    """float32, C-contiguous, [n_rows, n_embd]; read-only when it came from a cache."""
    layout: Layout = ()
    """Empty: one block of all rows (causal, consecutive positions)."""
    encode_ms: float = 0.0
    cached: bool = False
    rel_pos: np.ndarray | None = field(default=None, repr=False)
    """M-RoPE only: [n_rows, 4] (t, y, x, z) positions of each row for a block starting at
    position 0; ``pos_shift`` says which sections move with the block's start."""
    pos_shift: tuple[int, int, int, int] = (1, 1, 1, 1)

    def __post_init__(self) -> None:
        if not self.layout:
            self.layout = single_block(int(self.embeddings.shape[0]))

    @property
    def n_tokens(self) -> int:
        """Embedding rows."""
        return int(self.embeddings.shape[0])

    @property
    def n_embd(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def non_causal(self) -> bool:
        return any(isinstance(s, EmbedSpan) and s.non_causal for s in self.layout)

    @property
    def prefix_tokens(self) -> tuple[int, ...]:
        """Text tokens before the first block (e.g. <start_of_image>)."""
        out: list[int] = []
        for s in self.layout:
            if not isinstance(s, TextSpan):
                break
            out.extend(s.tokens)
        return tuple(out)

    @property
    def suffix_tokens(self) -> tuple[int, ...]:
        """Text tokens after the last block."""
        out: list[int] = []
        for s in reversed(self.layout):
            if not isinstance(s, TextSpan):
                break
            out[:0] = s.tokens
        return tuple(out)


class VisionEngine(ABC):
    """Encodes ``PreparedImage``s into LLM-space embeddings, at most once per image."""

    projector_type: str
    n_embd: int
    image_size: int
    kind: str  # "mmvision" or "mtmd": part of every cache key

    def __init__(
        self,
        mmproj: Path,
        *,
        cache: EmbeddingCache | None = None,
        disk_cache: bool | Path = False,
    ) -> None:
        self.mmproj = mmproj
        self.cache = cache if cache is not None else shared_cache()
        self.encode_count = 0
        """Images actually run through the encoder (cache hits do not count)."""
        self._lock = threading.RLock()
        st = mmproj.stat()
        self._model_key = f"{self.kind}:{mmproj.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        self._disk: DiskCache | None = None
        if disk_cache:
            root = (
                disk_cache if isinstance(disk_cache, Path) else load_settings().cache_dir / "vision"
            )
            self._disk = DiskCache(root)
        self._disk_key: str | None = None

    # -- to implement -------------------------------------------------------------------
    @abstractmethod
    def tokens_for(self, image: PreparedImage) -> int:
        """How many embedding rows ``encode(image)`` returns."""

    def layout(self, image: PreparedImage) -> Layout:
        """How ``encode(image)`` lays the image out in the prompt, without encoding it."""
        return single_block(self.tokens_for(image))

    @abstractmethod
    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        """Run the encoder on images not in any cache."""

    def _close(self) -> None:  # noqa: B027  (optional hook)
        pass

    # -- public -------------------------------------------------------------------------
    @property
    def model_key(self) -> str:
        return self._model_key

    def _disk_model_key(self) -> str:
        if self._disk_key is None:
            self._disk_key = f"{self.kind}-v2-{file_digest(self.mmproj)}"
        return self._disk_key

    def encode(self, image: PreparedImage) -> ImageEmbedding:
        """The embeddings of ``image``; computed once per (model, image bytes)."""
        return self.encode_many([image])[0]

    def encode_many(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        """Like ``encode`` for several images; uncached ones are encoded in batches."""
        results: list[ImageEmbedding | None] = [None] * len(images)
        todo: dict[str, list[int]] = {}
        with self._lock:
            for i, img in enumerate(images):
                t0 = time.perf_counter()
                hit = self.cache.get(self._model_key, img.digest)
                if hit is None and self._disk is not None:
                    hit = self._disk.get(self._disk_model_key(), img.digest)
                    if hit is not None:
                        self.cache.put(self._model_key, img.digest, hit)
                if hit is not None:
                    results[i] = self._from_cache(img.digest, hit, time.perf_counter() - t0)
                else:
                    todo.setdefault(img.digest, []).append(i)
            if todo:
                firsts = [images[idx[0]] for idx in todo.values()]
                fresh = self._encode_batch(firsts)
                self.encode_count += len(firsts)
                for emb, img in zip(fresh, firsts, strict=True):
                    if not np.isfinite(emb.embeddings).all():  # never cached
                        size = f" ({img.width}×{img.height})" if hasattr(img, "width") else ""
                        raise UserError(
                            f"the {self.projector_type} encoder produced invalid values (NaN/inf) "
                            f"for {img.source}{size}; try another size or aspect ratio"
                        )
                for emb, idx in zip(fresh, todo.values(), strict=True):
                    entry = self._to_entry(emb)
                    self.cache.put(self._model_key, emb.digest, entry)
                    if self._disk is not None:
                        self._disk.put(self._disk_model_key(), emb.digest, entry)
                    results[idx[0]] = emb
                    for j in idx[1:]:
                        results[j] = self._from_cache(emb.digest, entry, 0.0)
        out: list[ImageEmbedding] = []
        for r in results:
            assert r is not None
            out.append(r)
        return out

    def close(self) -> None:
        with self._lock:
            self._close()

    def __enter__(self) -> VisionEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _to_entry(emb: ImageEmbedding) -> CachedEntry:
        meta: dict[str, Any] = {
            "layout": layout_to_array(emb.layout),
            "pos_shift": np.asarray(emb.pos_shift, dtype=np.int32),
        }
        if emb.rel_pos is not None:
            meta["rel_pos"] = emb.rel_pos
        return CachedEntry(emb.embeddings, meta)

    @staticmethod
    def _from_cache(digest: str, entry: CachedEntry, seconds: float) -> ImageEmbedding:
        m = entry.meta
        layout = layout_from_array(m["layout"]) if "layout" in m else ()
        shift = tuple(int(x) for x in np.atleast_1d(m.get("pos_shift", (1, 1, 1, 1))))
        rel = m.get("rel_pos")
        return ImageEmbedding(
            digest=digest,
            embeddings=entry.embeddings,
            layout=layout,
            encode_ms=seconds * 1000.0,
            cached=True,
            rel_pos=None if rel is None else np.asarray(rel, dtype=np.int32),
            pos_shift=(*shift, 1, 1, 1, 1)[:4],  # type: ignore[arg-type]
        )


def open_native_vision(mmproj: Path, **kw: Any) -> Any:
    """libmmvision's ``NativeVisionModel`` for ``mmproj`` (``kw``: device, n_threads,
    expected_n_embd, max_batch, fast_math), its failures as one-line errors: a bad argument
    (an unknown device) or no memory / backend as ``UserError``, a file it cannot use as
    ``CorruptFileError``. Every engine on libmmvision opens its model here."""
    from mmchat.native import NativeError, NativeVisionModel, load_library
    from mmchat.native.model import (
        MMV_ERR_BACKEND,
        MMV_ERR_INVALID_ARGUMENT,
        MMV_ERR_OUT_OF_MEMORY,
    )

    try:
        return NativeVisionModel(load_library(), mmproj, **kw)
    except NativeError as exc:
        if exc.status == MMV_ERR_INVALID_ARGUMENT:  # e.g. an unknown device name
            raise UserError(str(exc)) from None
        if exc.status in (MMV_ERR_BACKEND, MMV_ERR_OUT_OF_MEMORY):
            raise UserError(f"Cannot load projector {mmproj.name}: {exc}") from None
        raise CorruptFileError(f"Cannot load projector {mmproj}: {exc}") from None


class LlavaEngine(VisionEngine):
    """LLaVA-family mmproj files on libmmvision (exact CLIP + mlp/mlp_norm projector)."""

    kind = "mmvision"

    def __init__(
        self,
        mmproj: Path,
        *,
        text_n_embd: int | None,
        n_threads: int | None = None,
        device: str | None = None,
        max_batch: int = 4,
        fast_math: bool = False,
        cache: EmbeddingCache | None = None,
        disk_cache: bool | Path = False,
    ) -> None:
        if fast_math:
            self.kind = "mmvision-fast"
        super().__init__(mmproj, cache=cache, disk_cache=disk_cache)
        # NeVA ("square" in NeMo): CLIPImageProcessor's resize + centre crop, not LLaVA's pad
        self.centre_crop = read_gguf(mmproj).get(PREPROCESS_KEY) == "resize_crop"
        self.model = open_native_vision(
            mmproj,
            device=device,
            n_threads=n_threads,
            expected_n_embd=text_n_embd,
            max_batch=max_batch,
            fast_math=fast_math,
        )
        info = self.model.info
        self.info = info
        self.projector_type = info.projector_type
        self.n_embd = info.n_embd
        self.image_size = info.image_size
        self.device = info.device
        # LLaVA 1.6: grid pinpoints in the mmproj -> anyres (several views per image)
        from mmchat.vision.anyres import AnyresSpec, load_anyres

        try:
            anyres = load_anyres(
                mmproj,
                image_size=info.image_size,
                patch_size=info.patch_size,
                image_mean=info.image_mean,
                image_std=info.image_std,
                n_embd=info.n_embd,
            )
        except BaseException:
            self.model.close()
            raise
        self.anyres: AnyresSpec | None = anyres[0] if anyres else None
        self.image_newline: np.ndarray | None = anyres[1] if anyres else None

    def tokens_for(self, image: PreparedImage) -> int:
        if self.anyres is not None:
            from mmchat.vision.anyres import n_tokens

            return n_tokens(self.anyres, (image.width, image.height))
        return self.info.n_tokens

    def pixels(self, image: PreparedImage) -> np.ndarray:
        """The preprocessed [3, S, S] tensor this engine feeds the encoder."""
        prepare = clip_crop_pixels if self.centre_crop else llava_pixels
        return prepare(image, self.info.image_size, self.info.image_mean, self.info.image_std)

    def _encode_batch(self, images: Sequence[PreparedImage]) -> list[ImageEmbedding]:
        from mmchat.native import NativeError

        t0 = time.perf_counter()
        if self.anyres is not None and self.image_newline is not None:
            from mmchat.vision.anyres import encode_many

            def encode_views(views: list[np.ndarray]) -> np.ndarray:
                try:
                    return self.model.encode(np.stack(views))
                except NativeError as exc:
                    raise UserError(f"Image encoding failed: {exc}") from None

            # every view of every image in one call (libmmvision batches max_batch at a time)
            embs = encode_many(images, self.anyres, self.image_newline, encode_views)
            ms = (time.perf_counter() - t0) * 1000.0 / len(images)
            return [
                ImageEmbedding(digest=img.digest, embeddings=emb, encode_ms=ms)
                for img, emb in zip(images, embs, strict=True)
            ]
        px = np.stack([self.pixels(img) for img in images])
        try:
            out = self.model.encode(px)
        except NativeError as exc:
            raise UserError(f"Image encoding failed: {exc}") from None
        ms = (time.perf_counter() - t0) * 1000.0 / len(images)
        return [
            ImageEmbedding(digest=img.digest, embeddings=np.ascontiguousarray(out[i]), encode_ms=ms)
            for i, img in enumerate(images)
        ]

    def _close(self) -> None:
        self.model.close()


def read_mmproj_header(mmproj: Path) -> GGUFInfo:
    """Read and sanity-check an mmproj header; ``UserError`` for anything that is not one."""
    info = read_gguf(mmproj, role="projector (mmproj)")
    if not info.is_mmproj:
        arch = info.architecture or "unknown"
        raise CorruptFileError(
            f"{mmproj} is not a projector (mmproj) file: it is a '{arch}' model "
            "(pass the vision projector GGUF, architecture 'clip')"
        )
    return info


def projector_type_of(info: GGUFInfo) -> str:
    proj = info.get("clip.projector_type")
    if proj is None and info.get("clip.has_llava_projector"):
        return "mlp"
    if proj is None:
        vision = info.get("clip.vision.projector_type")
        if vision is not None:
            return str(vision)
        raise CorruptFileError(f"{info.path} has no clip.projector_type; is it an mmproj file?")
    return str(proj)


def runs_on_mmvision(info: GGUFInfo) -> bool:
    """Whether libmmvision runs this projector exactly: a LLaVA projector (``mlp``,
    ``mlp_norm``) on a CLIP tower with its class token. Files that only share the type name
    (moondream's ``mlp`` on a SigLIP tower without ``v.class_embd``) go to mtmd."""
    return projector_type_of(info) in LLAVA_PROJECTORS and info.tensor("v.class_embd") is not None


def _check_llava_width(info: GGUFInfo, text_n_embd: int | None) -> None:
    if not text_n_embd:
        return
    proj = projector_type_of(info)
    name = {"mlp": "mm.2.weight", "mlp_norm": "mm.3.weight", "mlp_downsample": "mm.4.weight"}.get(
        proj, "mm.0.weight"
    )
    t = info.tensor(name)
    if t is not None and len(t.shape) >= 2 and int(t.shape[1]) != text_n_embd:
        raise UserError(
            f"{info.path.name} projects images to {int(t.shape[1])}-wide embeddings but the "
            f"language model is {text_n_embd} wide: this mmproj belongs to another model"
        )


def open_vision(
    mmproj: str | Path,
    *,
    text_n_embd: int,
    n_threads: int | None = None,
    device: str | None = None,
    llama_model: int | None = None,
    cache: EmbeddingCache | None = None,
    disk_cache: bool | Path = False,
    max_batch: int = 4,
    engine: str | None = None,
    flash_attn: bool | None = None,
) -> VisionEngine:
    """Open the vision half of a model.

    Validates the header in Python first (``UserError`` for a missing, corrupt, truncated or
    mismatched file), then routes: LLaVA projectors to libmmvision, the rest to mtmd (which
    needs ``llama_model``, the ``llama_model*`` of the loaded text model). ``engine`` forces
    "mmvision" or "mtmd" (for comparisons; mtmd also runs LLaVA files, with its known bugs).
    ``device`` is a ggml device name or "cpu" (default: the best one). ``flash_attn``: the
    encoder's attention kernel on mtmd (None: llama.cpp's choice; libmmvision's graph is exact
    either way).
    """
    path = Path(mmproj).expanduser()
    info = read_mmproj_header(path)
    proj = projector_type_of(info)
    if proj in ("qformer", "eva_concat"):  # BLIP-2, InstructBLIP, MiniGPT-4 / MiniGPT-v2
        if engine not in (None, "mmvision"):
            raise UserError(f"projector type '{proj}' runs on mmvision only")
        from mmchat.vision.qformer import QformerEngine

        return QformerEngine(
            path,
            text_n_embd=text_n_embd,
            n_threads=n_threads,
            device=device,
            max_batch=max_batch,
            cache=cache,
            disk_cache=disk_cache,
        )
    if proj == "internvit":  # NVLM-D: tiles with text tags, only libmmvision runs it
        if engine not in (None, "mmvision"):
            raise UserError("projector type 'internvit' (NVLM-D) runs on mmvision only")
        from mmchat.vision.internvit import InternVitEngine

        return InternVitEngine(
            path,
            text_n_embd=text_n_embd,
            llama_model=llama_model,
            n_threads=n_threads,
            device=device,
            max_batch=max_batch,
            cache=cache,
            disk_cache=disk_cache,
        )
    if proj in ("idefics", "openflamingo"):  # rows for the decoder's cross-attention (issue 18)
        if engine not in (None, "mmvision"):
            raise UserError(f"projector type '{proj}' runs on mmvision only")
        from mmchat.runtime.flamingo import IdeficsEngine

        return IdeficsEngine(
            path,
            n_threads=n_threads,
            device=device,
            max_batch=max_batch,
            cache=cache,
            disk_cache=disk_cache,
        )
    chosen = engine or ("mmvision" if runs_on_mmvision(info) else "mtmd")
    if chosen == "mmvision":
        if proj not in LLAVA_PROJECTORS:
            raise UserError(f"projector type '{proj}' is not a LLaVA projector (mlp, mlp_norm)")
        _check_llava_width(info, text_n_embd)
        return LlavaEngine(
            path,
            text_n_embd=text_n_embd,
            n_threads=n_threads,
            device=device,
            max_batch=max_batch,
            cache=cache,
            disk_cache=disk_cache,
        )
    if chosen == "mtmd":
        from mmchat.vision.mtmd import MtmdEngine

        if llama_model is None:
            raise UserError(
                f"projector type '{proj}' runs on llama.cpp's mtmd, which needs the loaded "
                "text model (llama_model)"
            )
        return MtmdEngine(
            path,
            llama_model=llama_model,
            text_n_embd=text_n_embd,
            projector_type=proj,
            n_threads=n_threads,
            use_gpu=(device or "").lower() != "cpu",
            cache=cache,
            disk_cache=disk_cache,
            flash_attn=flash_attn,
        )
    raise ValueError(f"engine {engine!r}: use 'mmvision' or 'mtmd'")
