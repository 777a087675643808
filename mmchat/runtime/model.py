"""``load_model`` and ``LoadedModel``: one text model (+ optional vision engine) and its context.

The llama.cpp context of a ``LoadedModel`` holds one sequence. The model remembers exactly
what that sequence contains (token ids, and image positions identified by image sha256 and
row), so any prompt, from any session, is evaluated as "longest common prefix reused, the
rest decoded" (KV-cache prefix reuse; ``llama_memory_seq_rm`` drops a diverging tail).
Images inside the reused prefix are not encoded again.

One request at a time: ``LoadedModel.lock`` is a FIFO lock; ``ChatSession.send`` and
``evaluate`` hold it while they use the context.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmchat.errors import UserError
from mmchat.gguf_meta import GGUFInfo, read_gguf
from mmchat.runtime import _llama
from mmchat.runtime.lock import FairLock
from mmchat.runtime.messages import ImageInput, Message, image_key
from mmchat.runtime.options import DEFAULT_N_CTX, LoadOptions, SamplingParams
from mmchat.runtime.template import (
    ChatTemplate,
    ImageSlot,
    TemplateMessage,
    select_template,
)

if TYPE_CHECKING:
    from mmchat.runtime.session import ChatSession

# A position in the context: a token id, or (image key, row) for an image embedding row.
Unit = int | tuple[str, int]


class ContextOverflowError(UserError):
    """A prompt needs more positions than the context has."""

    def __init__(self, needed: int, n_ctx: int, message: str | None = None) -> None:
        super().__init__(
            message
            or f"the prompt needs {needed} tokens but the context holds {n_ctx} "
            "(start with a larger context, e.g. --ctx)"
        )
        self.needed = needed
        self.n_ctx = n_ctx


@dataclass
class PromptImage:
    """An image slot of a tokenized prompt: optional text tokens the vision engine wants
    around the image (mtmd's ``<start_of_image>``…), then ``n_tokens`` embedding rows."""

    key: str
    n_tokens: int
    source: ImageInput
    embeddings: np.ndarray | None = None
    non_causal: bool = False
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    @property
    def positions(self) -> int:
        return len(self.prefix) + self.n_tokens + len(self.suffix)

    def layout(self) -> tuple[tuple[int, ...], int, tuple[int, ...], bool]:
        return (self.prefix, self.n_tokens, self.suffix, self.non_causal)


PromptItem = list[int] | PromptImage


@dataclass
class Evaluation:
    """What ``evaluate``/``evaluate_ids`` computed.

    ``image_embeddings``: one float32 ``(n_tokens, n_embd)`` array per image, in prompt order;
    ``logits``: float32 ``(n_vocab,)`` logits at the final prompt position;
    ``segments``: the prompt as it was decoded (token-id lists and embedding arrays).
    """

    image_embeddings: list[np.ndarray]
    logits: np.ndarray
    segments: list[list[int] | np.ndarray] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        """The text token ids of the prompt (image positions left out)."""
        return [t for s in self.segments if isinstance(s, list) for t in s]


@dataclass
class PromptRun:
    """Counters of one prompt evaluation."""

    prompt_tokens: int = 0
    evaluated: int = 0
    cached: int = 0
    images: int = 0
    images_encoded: int = 0
    images_from_cache: int = 0
    encode_ms: float = 0.0
    eval_ms: float = 0.0


def _projector_width(info: GGUFInfo) -> int | None:
    """The output width of a LLaVA-style projector (``mm.2``), if the file has one."""
    bias = info.tensor("mm.2.bias")
    if bias is not None and bias.shape:
        return int(bias.shape[0])
    weight = info.tensor("mm.2.weight")
    if weight is not None and len(weight.shape) >= 2:
        return int(weight.shape[1])
    return None


def _runs(items: Sequence[PromptItem]) -> list[PromptItem]:
    """Items with each image's prefix/suffix tokens split out as token runs."""
    out: list[PromptItem] = []
    for it in items:
        if isinstance(it, PromptImage):
            if it.prefix:
                out.append(list(it.prefix))
            out.append(it)
            if it.suffix:
                out.append(list(it.suffix))
        else:
            out.append(it)
    return out


def _units(items: Sequence[PromptItem]) -> list[Unit]:
    out: list[Unit] = []
    for it in _runs(items):
        if isinstance(it, PromptImage):
            out.extend((it.key, j) for j in range(it.n_tokens))
        else:
            out.extend(it)
    return out


def count_positions(items: Sequence[PromptItem]) -> int:
    return sum(it.positions if isinstance(it, PromptImage) else len(it) for it in items)


class LoadedModel:
    """A text model with its llama.cpp context and, when given an mmproj, a vision engine."""

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
        self.legacy_spaces = legacy_spaces
        """How text that follows a special token (``</s>``, ``<image>``) or an image is
        tokenized. True: as a fragment of its own, with SentencePiece's dummy-prefix "▁"
        (transformers' ``legacy=True`` tokenizers, original LLaVA's ``tokenizer_image_token``,
        llama.cpp's own tokenizer and mtmd). False: as the continuation of the prompt, no
        "▁" (transformers' ``legacy=False`` tokenizers, e.g. the llava-hf checkpoints); only
        the very start of the prompt gets the dummy prefix. See ``_legacy_spaces``."""
        self._special: re.Pattern[str] | None = None
        self._special_ids: dict[str, int] = {}
        self.load_ms = load_ms
        self.lock = FairLock()
        self._units: list[Unit] = []
        self.last_run: PromptRun | None = None
        """Counters of the latest prompt evaluation (tokens evaluated/reused, images encoded)."""
        self._closed = False
        self._layouts: dict[str, tuple[tuple[int, ...], int, tuple[int, ...], bool]] = {}
        """What the vision engine returned for images seen before (prefix/suffix tokens,
        rows, non-causal), so that their prompt positions are known without encoding."""
        self._finalizer = weakref.finalize(self, _free, text, ctx, vision)

    # -- properties --

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
        """The vision engine (``mmchat.vision.VisionEngine``) or None for a text-only model."""
        return self._vision

    @property
    def has_vision(self) -> bool:
        return self._vision is not None

    @property
    def n_ctx(self) -> int:
        return self.ctx.n_ctx

    @property
    def n_embd(self) -> int:
        return self.text.n_embd

    @property
    def n_vocab(self) -> int:
        return self.text.n_vocab

    @property
    def kv_tokens(self) -> int:
        """How many positions the context currently holds (reusable by the next prompt)."""
        return len(self._units)

    def describe(self) -> dict[str, Any]:
        """Facts for ``/show info`` and ``/api/show``."""
        return {
            "model": str(self.path),
            "mmproj": str(self.mmproj_path) if self.mmproj_path else None,
            "architecture": self.info.architecture,
            "description": self.text.desc(),
            "n_ctx": self.n_ctx,
            "n_ctx_train": self.text.n_ctx_train,
            "n_embd": self.n_embd,
            "n_vocab": self.n_vocab,
            "n_threads": self.ctx.n_threads,
            "template": self.template.name,
            "template_origin": self.template.origin,
            "projector_type": getattr(self._vision, "projector_type", None),
        }

    # -- lifetime --

    def close(self, *, timeout: float = 60.0) -> None:
        """Free the context, the model and the vision engine (idempotent).

        Waits (up to ``timeout`` seconds, then RuntimeError) for a request in progress: a
        reply that is still being streamed holds the model. Do not call it from inside such a
        stream.
        """
        if self._closed:
            return
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
        self._units = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> LoadedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions --

    def session(
        self, system: str | None = None, params: SamplingParams | None = None
    ) -> ChatSession:
        from mmchat.runtime.session import ChatSession

        return ChatSession(self, system=system, params=params)

    # -- text --

    def tokenize(
        self, text: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int]:
        return self.text.tokenize(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        return self.text.detokenize(list(ids), special=special)

    def _special_split(self, text: str) -> list[tuple[str, int | None]]:
        """``text`` cut into (fragment, None) and (special token text, id) pieces, as
        llama.cpp's ``parse_special`` would cut it (control, user-defined, unknown tokens)."""
        if self._special is None:
            self._special_ids = self.text.special_tokens()
            names = sorted(self._special_ids, key=len, reverse=True)
            self._special = re.compile("|".join(re.escape(n) for n in names) or r"(?!x)x")
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._special.finditer(text):
            if m.start() > pos:
                out.append((text[pos : m.start()], None))
            out.append((m.group(0), self._special_ids[m.group(0)]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out

    def _tokenize_continuation(self, text: str) -> list[int]:
        """Tokens of ``text`` as the continuation of a prompt: no SentencePiece dummy prefix.

        llama.cpp prepends "▁" to every separately tokenized fragment of an SPM vocabulary
        that asks for it. To get the continuation form, tokenize a probe character plus the
        text and strip the probe's tokens; the result is checked by detokenizing it.
        """
        plain = self.text.tokenize(text, add_special=False, parse_special=False)
        if not text or self.text.detokenize(plain) == text:
            return plain  # no dummy prefix in this vocabulary
        for probe in ("\n", "\x01", "#"):
            head = self.text.tokenize(probe, add_special=False, parse_special=False)
            ids = self.text.tokenize(probe + text, add_special=False, parse_special=False)
            if ids[: len(head)] != head:
                continue
            rest = ids[len(head) :]
            if self.text.detokenize(rest) == text:
                return rest
        return plain

    def _tokenize_piece(self, piece: str, *, at_start: bool) -> list[int]:
        bos_text = self.template.bos_token
        add_bos = at_start and self.text.add_bos and not (bos_text and piece.startswith(bos_text))
        if self.legacy_spaces:
            return self.text.tokenize(piece, add_special=add_bos)
        out = [self.text.bos] if add_bos else []
        offset = 0
        for frag, special_id in self._special_split(piece):
            if special_id is not None:
                out.append(special_id)
            elif at_start and offset == 0:
                out.extend(self.text.tokenize(frag, add_special=False, parse_special=False))
            else:
                out.extend(self._tokenize_continuation(frag))
            offset += len(frag)
        return out

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokenize a whole prompt string as the checkpoint's own tokenizer would: BOS when
        the model wants one (unless the text starts with it), special tokens parsed, and the
        model's rule for the text after special tokens (``legacy_spaces``)."""
        return self._tokenize_piece(text, at_start=True)

    def _tokenize_pieces(self, pieces: Sequence[str | ImageSlot]) -> list[list[int] | ImageSlot]:
        out: list[list[int] | ImageSlot] = []
        for i, piece in enumerate(pieces):
            if isinstance(piece, ImageSlot):
                out.append(piece)
            else:
                out.append(self._tokenize_piece(piece, at_start=(i == 0)))
        if pieces and isinstance(pieces[0], ImageSlot) and self.text.add_bos:
            out.insert(0, [self.text.bos])  # a prompt that starts with an image
        return out

    def _template_messages(
        self, messages: Sequence[Message], system: str | None
    ) -> tuple[list[TemplateMessage], list[ImageInput]]:
        tmsgs: list[TemplateMessage] = []
        images: list[ImageInput] = []
        if system:
            tmsgs.append(TemplateMessage("system", system))
        for m in messages:
            tmsgs.append(TemplateMessage(m.role, m.content, len(m.images)))
            images.extend(m.images)
        return tmsgs, images

    def render(
        self,
        messages: Sequence[Message | Mapping[str, Any]],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text the template produces (images shown as markers)."""
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
        """The tokenized prompt: token-id lists and image slots (nothing is encoded)."""
        msgs = [Message.coerce(m) for m in messages]
        tmsgs, _ = self._template_messages(msgs, system)
        pieces = self.template.render(tmsgs, add_generation_prompt=add_generation_prompt)
        return self._tokenize_pieces(pieces)

    def build_prompt(
        self,
        messages: Sequence[Message],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[PromptItem]:
        """Render and tokenize; image slots get their token count (not yet their embeddings)."""
        tmsgs, images = self._template_messages(messages, system)
        pieces = self.template.render(tmsgs, add_generation_prompt=add_generation_prompt)
        items: list[PromptItem] = []
        for seg in self._tokenize_pieces(pieces):
            if isinstance(seg, ImageSlot):
                items.append(self._prompt_image(images[seg.index]))
            else:
                items.append(seg)
        return items

    def _prompt_image(self, image: ImageInput) -> PromptImage:
        if isinstance(image, np.ndarray):
            emb = np.ascontiguousarray(image, dtype=np.float32)
            self._check_embd(emb)
            return PromptImage(image_key(emb), int(emb.shape[0]), image, emb)
        embeddings = getattr(image, "embeddings", None)
        if isinstance(embeddings, np.ndarray):  # an ImageEmbedding
            emb = np.ascontiguousarray(embeddings, dtype=np.float32)
            self._check_embd(emb)
            return PromptImage(
                image_key(image),
                int(emb.shape[0]),
                image,
                emb,
                bool(getattr(image, "non_causal", False)),
            )
        if self._vision is None:
            raise UserError("this model cannot see images (it was loaded without a projector)")
        key = image_key(image)
        known = self._layouts.get(key)
        if known is not None:
            prefix, n, suffix, non_causal = known
            return PromptImage(key, n, image, None, non_causal, prefix, suffix)
        return PromptImage(key, int(self._vision.tokens_for(image)), image)

    def _check_embd(self, emb: np.ndarray) -> None:
        if emb.ndim != 2 or emb.shape[1] != self.n_embd:
            raise UserError(
                f"image embeddings of shape {tuple(emb.shape)} do not fit this model "
                f"(n_embd {self.n_embd})"
            )

    # -- the context --

    def reset(self) -> None:
        """Empty the KV cache (the next prompt is evaluated from scratch)."""
        with self.lock:
            self._reset_kv()

    def _reset_kv(self) -> None:
        self.ctx.clear()
        self._units = []

    def _sync(self) -> None:
        """Make ``_units`` agree with the context after an interruption or a failed decode."""
        held = self.ctx.pos_max() + 1
        if held < len(self._units):
            del self._units[held:]
        elif held > len(self._units) and not self.ctx.truncate(len(self._units)):
            self._reset_kv()

    def _encode(self, images: Sequence[PromptImage], run: PromptRun) -> None:
        """Fill in the embeddings of ``images`` (one call to the vision engine)."""
        todo = [img for img in images if img.embeddings is None]
        if not todo:
            return
        if self._vision is None:
            raise UserError("this model cannot see images (it was loaded without a projector)")
        t0 = time.perf_counter()
        if hasattr(self._vision, "encode_many"):
            results = list(self._vision.encode_many([img.source for img in todo]))
        else:
            results = [self._vision.encode(img.source) for img in todo]
        run.encode_ms += (time.perf_counter() - t0) * 1000
        run.images_encoded += len(todo)
        for img, result in zip(todo, results, strict=True):
            run.images_from_cache += bool(getattr(result, "cached", False))
            if getattr(result, "decoder_pos", None) is not None or (
                getattr(result, "n_pos", 0) not in (0, result.embeddings.shape[0])
            ):
                raise UserError(
                    "this model places image tokens with M-RoPE positions, which the "
                    "runtime does not support yet"
                )
            emb = np.ascontiguousarray(result.embeddings, dtype=np.float32)
            self._check_embd(emb)
            img.embeddings = emb
            img.n_tokens = int(emb.shape[0])
            img.non_causal = bool(getattr(result, "non_causal", False))
            img.prefix = tuple(int(t) for t in getattr(result, "prefix_tokens", ()) or ())
            img.suffix = tuple(int(t) for t in getattr(result, "suffix_tokens", ()) or ())
            self._layouts[img.key] = img.layout()

    def run_prompt(
        self, items: Sequence[PromptItem], *, cancel: threading.Event | None = None
    ) -> PromptRun:
        """Bring the context to exactly ``items`` (reusing the common prefix) with logits for
        the last position. The caller holds ``self.lock``."""
        run = PromptRun(images=sum(isinstance(it, PromptImage) for it in items))
        self._sync()
        n_ctx = self.n_ctx
        units: list[Unit] = []
        common = 0
        for _attempt in range(3):
            units = _units(items)
            if len(units) > n_ctx:
                raise ContextOverflowError(len(units), n_ctx)
            if not units:
                raise UserError("the prompt is empty")
            common = 0
            limit = min(len(units), len(self._units))
            while common < limit and units[common] == self._units[common]:
                common += 1
            if common == len(units):  # fully cached: recompute the last position for its logits
                common -= 1
            u = units[common]
            if isinstance(u, tuple):  # never start inside an image
                common -= u[1]
            # images that overlap the part to evaluate need their embeddings
            need: list[PromptImage] = []
            pos = 0
            for it in items:
                n = it.positions if isinstance(it, PromptImage) else len(it)
                if isinstance(it, PromptImage) and pos + n > common:
                    need.append(it)
                pos += n
            before = [img.layout() for img in need]
            self._encode(need, run)
            if [img.layout()[:3] for img in need] == [b[:3] for b in before]:
                break
        else:  # pragma: no cover - a vision engine whose token counts keep changing
            raise RuntimeError("the vision engine's token counts are inconsistent")

        if common < len(self._units):
            if not self.ctx.truncate(common):
                self._reset_kv()
                common = 0
            else:
                del self._units[common:]
        run.prompt_tokens = len(units)
        run.cached = common
        run.evaluated = len(units) - common

        t0 = time.perf_counter()
        try:
            self._decode_items(items, common, len(units), cancel)
        except BaseException:
            self._sync()
            raise
        run.eval_ms = (time.perf_counter() - t0) * 1000
        self.last_run = run
        return run

    def _decode_items(
        self,
        items: Sequence[PromptItem],
        start: int,
        total: int,
        cancel: threading.Event | None,
    ) -> None:
        ctx = self.ctx
        n_batch = ctx.n_batch
        pos = 0
        for it in _runs(items):
            n = it.n_tokens if isinstance(it, PromptImage) else len(it)
            lo = max(start - pos, 0)
            if lo >= n:
                pos += n
                continue
            if isinstance(it, PromptImage):
                assert it.embeddings is not None
                emb = it.embeddings
                if it.non_causal:
                    if n > ctx.n_ubatch:
                        raise UserError(
                            f"this image needs {n} tokens in one batch but the batch size is "
                            f"{ctx.n_ubatch} (load with a larger n_batch)"
                        )
                    step = n
                else:
                    step = n_batch
                for a in range(lo, n, step):
                    b = min(a + step, n)
                    if cancel is not None and cancel.is_set():
                        raise KeyboardInterrupt
                    ctx.decode_embeddings(
                        emb[a:b],
                        pos + a,
                        logits_last=(pos + b == total),
                        non_causal=it.non_causal,
                    )
                    self._units.extend((it.key, j) for j in range(a, b))
            else:
                arr = np.asarray(it, dtype=np.int32)
                for a in range(lo, n, n_batch):
                    b = min(a + n_batch, n)
                    if cancel is not None and cancel.is_set():
                        raise KeyboardInterrupt
                    ctx.decode_tokens(arr[a:b], pos + a, logits_last=(pos + b == total))
                    self._units.extend(it[a:b])
            pos += n

    def decode_token(self, token: int) -> None:
        """Append one generated token to the context (the caller holds the lock)."""
        pos = len(self._units)
        if pos >= self.n_ctx:
            raise ContextOverflowError(pos + 1, self.n_ctx)
        try:
            self.ctx.decode_one(token, pos)
        except BaseException:
            self._sync()
            raise
        self._units.append(token)

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
        """Image embeddings and final-position logits for chat messages with images.

        The documented entry point for parity checks and scripting: messages are rendered
        with the model's chat template exactly as a chat would send them; each image
        (``PreparedImage``, ``ImageEmbedding`` or a raw ``(n_tokens, n_embd)`` array) is
        encoded by the vision engine unless embeddings are given. The context is emptied
        first unless ``reuse_cache``.
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
                items.append(PromptImage(image_key(emb), int(emb.shape[0]), emb, emb, non_causal))
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
            self._reset_kv()
        self.run_prompt(items)
        segments: list[list[int] | np.ndarray] = []
        embeddings: list[np.ndarray] = []
        for it in items:
            if isinstance(it, PromptImage):
                if it.embeddings is None:  # reused from the cache: encode for the caller
                    self._encode([it], PromptRun())
                assert it.embeddings is not None
                embeddings.append(it.embeddings)
                segments.append(it.embeddings)
            else:
                segments.append(list(it))
        return Evaluation(image_embeddings=embeddings, logits=self.logits(), segments=segments)


META_LEGACY_SPACES = "mmchat.tokenizer.legacy_spaces"


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
    """Load a text GGUF (and its projector) for chatting.

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
        if width is not None and isinstance(n_embd_meta, int) and width != n_embd_meta:
            raise UserError(
                f"the projector {mm_path.name} outputs {width}-wide embeddings but the text "
                f"model {path.name} takes {n_embd_meta}: they do not belong together"
            )

    _llama.ensure_backend(opts.verbose)
    n_gpu_layers = opts.n_gpu_layers
    if n_gpu_layers is None:
        n_gpu_layers = -1 if _llama.supports_gpu_offload() else 0
    text = _llama.TextModel(str(path), n_gpu_layers=n_gpu_layers, verbose=opts.verbose)
    ctx: _llama.Context | None = None
    vision: Any = None
    try:
        n_ctx = opts.n_ctx or min(DEFAULT_N_CTX, text.n_ctx_train or DEFAULT_N_CTX)
        ctx = _llama.Context(
            text,
            n_ctx=n_ctx,
            n_batch=opts.n_batch,
            n_threads=opts.n_threads,
            flash_attn=opts.flash_attn,
            kv_cache_type=opts.kv_cache_type,
        )
        if mm_path is not None:
            from mmchat.vision import open_vision

            vision = open_vision(
                mm_path,
                text_n_embd=text.n_embd,
                n_threads=opts.n_threads,
                device=opts.vision_device,
                llama_model=text.address,
            )
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
        load_ms=load_ms,
    )


def seed_or_random(seed: int | None) -> int:
    if seed is not None:
        return int(seed) & 0xFFFFFFFF
    import secrets

    return secrets.randbits(32)
