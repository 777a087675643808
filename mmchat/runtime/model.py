"""``LoadedModel``: one text model (+ optional vision/audio engine) and its context.

The context holds one sequence (``KVSequence``), which remembers exactly what it contains
(token ids, and media rows identified by sha256 and row), so any prompt, from any session,
is evaluated as "longest common prefix reused, the rest decoded" (KV-cache prefix reuse).
Media inside the reused prefix are not encoded again.

A prompt is a list of token-id runs and ``PromptMedia`` items; a media item is a sequence of
text spans and embedding blocks as the engine lays it out (LLaVA: one block; mtmd: the
family's wrapper tokens, tiles, separators; M-RoPE positions for Qwen2/2.5/3-VL).

One request at a time: ``LoadedModel.lock`` is a FIFO lock; ``ChatSession.send`` and
``evaluate`` hold it while they use the context.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmchat.errors import UserError
from mmchat.gguf_meta import GGUFInfo
from mmchat.runtime import _llama
from mmchat.runtime.kvseq import ContextOverflowError, KVSequence
from mmchat.runtime.lock import FairLock
from mmchat.runtime.messages import ImageInput, Message, image_key
from mmchat.runtime.options import LoadOptions
from mmchat.runtime.pieces import (
    PromptImage,
    PromptItem,
    PromptMedia,
    TextSpan,
    count_positions,
    single_block,
)
from mmchat.runtime.results import Evaluation, PromptRun
from mmchat.runtime.template import ChatTemplate, ImageSlot, TemplateMessage
from mmchat.runtime.tokenizing import PromptTokenizer

if TYPE_CHECKING:
    from mmchat.runtime.session import ChatSession

__all__ = [
    "ContextOverflowError",
    "Evaluation",
    "LoadedModel",
    "PromptImage",
    "PromptItem",
    "PromptMedia",
    "PromptRun",
    "count_positions",
    "seed_or_random",
]


class LoadedModel:
    """A text model with its llama.cpp context and, when given an mmproj, a media engine."""

    def __init__(
        self,
        *,
        path: Path,
        mmproj_path: Path | None,
        options: LoadOptions,
        info: GGUFInfo,
        text: _llama.TextModel,
        ctx: _llama.Context,
        vision: Any,
        template: ChatTemplate,
        legacy_spaces: bool,
        load_ms: float,
        space_after_media: bool | None = None,
    ) -> None:
        self.path = path
        self.mmproj_path = mmproj_path
        self.options = options
        # the header facts without gguf-py's reader (which keeps the whole file memory-mapped)
        self.info = dataclasses.replace(info, _reader=None)
        self._text: _llama.TextModel | None = text
        self._ctx: _llama.Context | None = ctx
        self._vision = vision
        self.template = template
        self.tokenizer = PromptTokenizer(text, template, legacy_spaces, space_after_media)
        self.load_ms = load_ms
        self.lock = FairLock()
        self.n_seq = max(1, int(options.n_parallel))
        """Sequences of the context (``LoadOptions.n_parallel``); each has ``n_ctx`` cells."""
        self._seq = KVSequence(ctx, 0)
        self._scheduler: Any = None
        self._scheduler_lock = threading.Lock()
        self.last_run: PromptRun | None = None
        """Counters of the latest prompt evaluation (tokens evaluated/reused, media encoded)."""
        self._closed = False
        self._finalizer = weakref.finalize(self, _free, text, ctx, vision)

    # -- properties --

    @property
    def legacy_spaces(self) -> bool:
        """See ``PromptTokenizer.legacy_spaces``."""
        return self.tokenizer.legacy_spaces

    @property
    def text(self) -> _llama.TextModel:
        if self._text is None:
            raise RuntimeError("the model is closed")
        return self._text

    @property
    def ctx(self) -> _llama.Context:
        if self._ctx is None:
            raise RuntimeError("the model is closed")
        return self._ctx

    @property
    def vision(self) -> Any:
        """The media engine (``mmchat.vision.VisionEngine``) or None for a text-only model."""
        return self._vision

    @property
    def has_vision(self) -> bool:
        return self._vision is not None and bool(getattr(self._vision, "supports_vision", True))

    @property
    def has_audio(self) -> bool:
        return self._vision is not None and bool(getattr(self._vision, "supports_audio", False))

    @property
    def n_ctx(self) -> int:
        """KV cells one sequence (one conversation) may use."""
        return int(self.ctx.n_ctx_seq)

    @property
    def scheduler(self) -> Any:
        """The ``BatchScheduler`` of a model loaded with ``n_parallel > 1`` or ``scheduled``
        (else None: replies are decoded by the caller's thread)."""
        if self.n_seq <= 1 and not self.options.scheduled:
            return None
        with self._scheduler_lock:
            if self._scheduler is None:
                if self._closed:
                    raise RuntimeError("the model is closed")
                from mmchat.runtime.parallel import BatchScheduler

                self._scheduler = BatchScheduler(self, max_queue=self.options.max_queue)
            return self._scheduler

    @property
    def n_embd(self) -> int:
        return self.text.n_embd_inp

    @property
    def n_vocab(self) -> int:
        return self.text.n_vocab

    @property
    def kv_tokens(self) -> int:
        """How many KV cells the context currently holds (reusable by the next prompt)."""
        return len(self._seq)

    @property
    def next_pos(self) -> int:
        """The position the next token would be decoded at (differs from ``kv_tokens``
        after an M-RoPE image)."""
        return self._seq.next_pos

    def activity(self) -> tuple[int, int] | None:
        """(replies running, requests queued) in the batch scheduler, None without one
        (it is not started just to answer)."""
        scheduler = self._scheduler
        return (scheduler.active, scheduler.queued) if scheduler is not None else None

    def describe(self) -> dict[str, Any]:
        """Facts for ``/show info`` and ``/api/show``."""
        return {
            "model": str(self.path),
            "mmproj": str(self.mmproj_path) if self.mmproj_path else None,
            "architecture": self.info.architecture,
            "description": self.text.desc(),
            "n_ctx": self.n_ctx,
            "n_ctx_train": self.text.n_ctx_train,
            "n_embd": self.text.n_embd,
            "n_vocab": self.n_vocab,
            "n_threads": self.ctx.n_threads,
            "template": self.template.name,
            "template_origin": self.template.origin,
            "projector_type": getattr(self._vision, "projector_type", None),
            "vision": self.has_vision,
            "audio": self.has_audio,
            "mrope": self.text.n_pos_per_embd > 1,
            "parallel": self.n_seq,
        }

    # -- lifetime --

    def close(self, *, timeout: float = 60.0) -> None:
        """Free the context, the model and the media engine (idempotent).

        Waits (up to ``timeout`` seconds, then RuntimeError) for a request in progress: a
        reply that is still being streamed holds the model. Do not call it from inside such a
        stream.
        """
        if self._closed:
            return
        with self._scheduler_lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.close(timeout)
        if not self.lock.acquire(timeout=timeout):
            raise RuntimeError("the model is busy with a request; it cannot be closed now")
        try:
            if self._closed:
                return
            self._closed = True
            self._finalizer()
        finally:
            self.lock.release()
        self._text = None
        self._ctx = None
        self._vision = None
        self._seq.units = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions --

    def session(self, system: str | None = None, params: Any = None) -> ChatSession:
        from mmchat.runtime.session import ChatSession

        return ChatSession(self, system=system, params=params)

    # -- text --

    def tokenize(
        self, text: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int]:
        return self.text.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        return self.text.detokenize(list(ids), special=special)

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokenize a whole prompt string as the checkpoint's own tokenizer would (see
        ``PromptTokenizer``)."""
        return self.tokenizer.tokenize_prompt(text)

    def fim_prompt(self, prefix: str, suffix: str) -> list[int]:
        """``[BOS] <FIM_PRE> prefix <FIM_SUF> suffix <FIM_MID>`` as llama-server's infill
        lays it out; ``UserError`` when the vocabulary has no fill-in-the-middle tokens."""
        pre, suf, mid = self.text.fim_tokens()
        if min(pre, suf, mid) < 0:
            raise UserError(
                f"{self.path.name} has no fill-in-the-middle tokens (FIM prefix/suffix/middle): "
                "send the text before the gap as the prompt only"
            )
        tok = self.text.tokenize
        ids = [self.text.bos] if self.text.add_bos and self.text.bos >= 0 else []
        ids += [pre, *tok(prefix, add_special=False, parse_special=False)]
        ids += [suf, *tok(suffix, add_special=False, parse_special=False), mid]
        return ids

    def _template_messages(
        self, messages: Sequence[Message], system: str | None
    ) -> tuple[list[TemplateMessage], list[ImageInput]]:
        tmsgs: list[TemplateMessage] = []
        media: list[ImageInput] = []
        if system:
            tmsgs.append(TemplateMessage("system", system))
        bind = getattr(self._vision, "bind", None)
        for m in messages:
            tmsgs.append(TemplateMessage(m.role, m.content, len(m.images)))
            for item in m.images:
                # an engine whose rows depend on the text (InstructBLIP's Q-Former reads the
                # instruction) gets each image bound to the text of the message carrying it,
                # in every later turn too; its cache key includes that text
                raw = not isinstance(item, np.ndarray) and getattr(item, "embeddings", None) is None
                media.append(bind(item, m.content) if bind is not None and raw else item)
        return tmsgs, media

    def render(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text the template produces (media shown as markers)."""
        msgs = [Message.coerce(m) for m in messages]
        tmsgs, _ = self._template_messages(msgs, system)
        return self.template.render_text(tmsgs, add_generation_prompt=add_generation_prompt)

    def prompt_segments(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[list[int] | ImageSlot]:
        """The tokenized prompt: token-id lists and media slots (nothing is encoded)."""
        msgs = [Message.coerce(m) for m in messages]
        tmsgs, _ = self._template_messages(msgs, system)
        pieces = self.template.render(tmsgs, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.tokenize_pieces(pieces)

    def build_prompt(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[PromptItem]:
        """Render and tokenize; media items get their layout (not yet their embeddings)."""
        tmsgs, media = self._template_messages(messages, system)
        pieces = self.template.render(tmsgs, add_generation_prompt=add_generation_prompt)
        placed: dict[int, PromptMedia] = {}
        glued: list[str | ImageSlot] = []
        carry = ""  # a media item's closing text, tokenized with the text after it
        for piece in pieces:
            if isinstance(piece, ImageSlot):
                if carry:
                    glued.append(carry)
                item = placed[piece.index] = self._prompt_media(media[piece.index])
                glued.append(piece)
                last = item.layout[-1] if item.layout else None
                carry = last.text if isinstance(last, TextSpan) else ""
            else:
                glued.append(carry + piece)
                carry = ""
        if carry:
            glued.append(carry)
        items: list[PromptItem] = []
        for seg in self.tokenizer.tokenize_pieces(glued):
            items.append(placed[seg.index] if isinstance(seg, ImageSlot) else seg)
        return items

    def _prompt_media(self, media: ImageInput) -> PromptMedia:
        if isinstance(media, np.ndarray):
            emb = np.ascontiguousarray(media, dtype=np.float32)
            self._check_embd(emb)
            return PromptMedia(image_key(emb), emb, single_block(emb.shape[0]), emb)
        embeddings = getattr(media, "embeddings", None)
        if isinstance(embeddings, np.ndarray):  # an ImageEmbedding
            emb = np.ascontiguousarray(embeddings, dtype=np.float32)
            self._check_embd(emb)
            return PromptMedia(
                image_key(media), media, media.layout, emb, media.rel_pos, media.pos_shift
            )
        self.check_media(media)
        layout = tuple(self._vision.layout(media))
        self._check_layout(layout)
        return PromptMedia(image_key(media), media, layout)

    def _check_layout(self, layout: tuple[Any, ...]) -> None:
        """The engine's wrapper tokens must exist in this model's vocabulary."""
        for span in layout:
            if isinstance(span, TextSpan):
                bad = [t for t in span.tokens if not 0 <= t < self.n_vocab]
                if bad:
                    raise UserError(
                        f"the projector wraps media in token {bad[0]}, which this model's "
                        f"vocabulary ({self.n_vocab} tokens) does not have: the projector and "
                        "the model do not belong together"
                    )

    def check_media(self, media: ImageInput) -> None:
        """``UserError`` unless this model can take ``media`` (an image or an audio clip)."""
        audio = getattr(media, "kind", "") == "audio"
        if audio and not self.has_audio:
            raise UserError("this model cannot hear audio (its projector has no audio encoder)")
        if not audio and not self.has_vision:
            raise UserError("this model cannot see images (it was loaded without a projector)")

    def _check_embd(self, emb: np.ndarray) -> None:
        # a cross-attention decoder also takes image rows of its vision width
        if emb.ndim == 2 and self.ctx.n_embd_image and emb.shape[1] == self.ctx.n_embd_image:
            return
        if emb.ndim != 2 or emb.shape[1] != self.n_embd:
            raise UserError(
                f"image embeddings of shape {tuple(emb.shape)} do not fit this model "
                f"(n_embd {self.n_embd})"
            )

    # -- the context --

    def reset(self) -> None:
        """Empty the KV cache (the next prompt is evaluated from scratch)."""
        with self.lock:
            self._seq.reset()

    def encode_media(self, items: Sequence[PromptMedia]) -> PromptRun:
        """Fill in the embeddings of the media items that have none (the caller holds the
        lock); the counters say what was encoded."""
        run = PromptRun()
        self._encode(items, run)
        return run

    def _encode(self, items: Sequence[PromptMedia], run: PromptRun) -> None:
        """Fill in the embeddings of ``items`` (one call to the engine)."""
        todo = [it for it in items if it.embeddings is None]
        if not todo:
            return
        for it in todo:
            self.check_media(it.source)
        t0 = time.perf_counter()
        results = list(self._vision.encode_many([it.source for it in todo]))
        run.encode_ms += (time.perf_counter() - t0) * 1000
        run.images_encoded += len(todo)
        for it, result in zip(todo, results, strict=True):
            run.images_from_cache += bool(getattr(result, "cached", False))
            emb = np.ascontiguousarray(result.embeddings, dtype=np.float32)
            self._check_embd(emb)
            it.embeddings = emb
            self._check_layout(tuple(result.layout))
            it.layout = tuple(result.layout)
            it.rel_pos = result.rel_pos
            it.pos_shift = result.pos_shift

    def run_prompt(
        self, items: Sequence[PromptItem], *, cancel: threading.Event | None = None
    ) -> PromptRun:
        """Bring the context to exactly ``items`` (reusing the common prefix) with logits for
        the last position. The caller holds ``self.lock``."""
        seq = self._seq
        run = PromptRun(images=sum(isinstance(it, PromptMedia) for it in items))
        seq.sync()
        n_ctx = self.n_ctx
        common = 0
        total = 0
        for _attempt in range(3):
            total = count_positions(items)
            if total > n_ctx:
                raise ContextOverflowError(total, n_ctx)
            if not total:
                raise UserError("the prompt is empty")
            common = seq.common_prefix(items)
            # media that overlap the part to evaluate need their embeddings
            need: list[PromptMedia] = []
            pos = 0
            for it in items:
                n = it.cells if isinstance(it, PromptMedia) else len(it)
                if isinstance(it, PromptMedia) and pos + n > common:
                    need.append(it)
                pos += n
            before = [it.layout for it in need]
            self._encode(need, run)
            if [it.layout for it in need] == before:
                break
        else:  # pragma: no cover - an engine whose layouts keep changing
            raise RuntimeError("the media engine's layouts are inconsistent")
        common = seq.cut(common)
        run.prompt_tokens = total
        run.cached = common
        run.evaluated = total - common
        t0 = time.perf_counter()
        try:
            seq.decode(items, common, cancel)
        except BaseException:
            seq.sync()
            raise
        run.eval_ms = (time.perf_counter() - t0) * 1000
        self.last_run = run
        return run

    def decode_token(self, token: int) -> None:
        """Append one generated token to the context (the caller holds the lock)."""
        self._seq.append_token(token, self.n_ctx)

    def logits(self) -> np.ndarray:
        """Logits at the last evaluated position (a copy)."""
        return self.ctx.last_logits()

    # -- parity entry points --

    def evaluate(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
        reuse_cache: bool = False,
    ) -> Evaluation:
        """Media embeddings and final-position logits for chat messages with media.

        The documented entry point for parity checks and scripting: messages are rendered
        with the model's chat template exactly as a chat would send them; each image or audio
        clip (``PreparedImage``, ``PreparedAudio``, ``ImageEmbedding`` or a raw
        ``(n_tokens, n_embd)`` array) is encoded by the engine unless embeddings are given.
        The context is emptied first unless ``reuse_cache``.
        """
        msgs = [Message.coerce(m) for m in messages]
        with self.lock:
            items = self.build_prompt(
                msgs, system=system, add_generation_prompt=add_generation_prompt
            )
            return self._evaluate_items(items, reuse_cache=reuse_cache)

    def evaluate_ids(
        self,
        segments: Sequence[Sequence[int] | np.ndarray],
        *,
        non_causal: bool = False,
        reuse_cache: bool = False,
    ) -> Evaluation:
        """Like ``evaluate`` but on a prompt given directly: lists of token ids and float32
        ``(n_tokens, n_embd)`` embedding arrays, decoded in order (nothing added: include
        BOS yourself)."""
        items: list[PromptItem] = []
        for seg in segments:
            if isinstance(seg, np.ndarray) and seg.ndim == 2:
                emb = np.ascontiguousarray(seg, dtype=np.float32)
                self._check_embd(emb)
                layout = single_block(emb.shape[0], non_causal=non_causal)
                items.append(PromptMedia(image_key(emb), emb, layout, emb))
            else:
                ids = [int(t) for t in np.asarray(seg).reshape(-1)]
                bad = [t for t in ids if not 0 <= t < self.n_vocab]
                if bad:
                    raise UserError(f"token id {bad[0]} is outside the vocabulary ({self.n_vocab})")
                items.append(ids)
        with self.lock:
            return self._evaluate_items(items, reuse_cache=reuse_cache)

    def _evaluate_items(self, items: list[PromptItem], *, reuse_cache: bool) -> Evaluation:
        if not reuse_cache:
            self._seq.reset()
        self.run_prompt(items)
        segments: list[list[int] | np.ndarray] = []
        embeddings: list[np.ndarray] = []
        for it in items:
            if not isinstance(it, PromptMedia):
                _append_tokens(segments, list(it))
                continue
            if it.embeddings is None:  # reused from the cache: encode for the caller
                self._encode([it], PromptRun())
            assert it.embeddings is not None
            embeddings.append(it.embeddings)
            row = 0
            for span in it.layout:
                if isinstance(span, TextSpan):
                    _append_tokens(segments, list(span.tokens))
                else:
                    segments.append(it.embeddings[row : row + span.n_tokens])
                    row += span.n_tokens
        return Evaluation(image_embeddings=embeddings, logits=self.logits(), segments=segments)


def _append_tokens(segments: list[list[int] | np.ndarray], ids: list[int]) -> None:
    if segments and isinstance(segments[-1], list):
        segments[-1].extend(ids)
    elif ids:
        segments.append(ids)


def _free(text: _llama.TextModel, ctx: _llama.Context, vision: Any) -> None:
    try:
        if vision is not None:
            vision.close()
    finally:
        ctx.close()
        text.close()


def seed_or_random(seed: int | None) -> int:
    if seed is not None:
        return int(seed) & 0xFFFFFFFF
    import secrets

    return secrets.randbits(32)
