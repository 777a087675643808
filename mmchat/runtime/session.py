"""``ChatSession``: a conversation with a loaded model, streamed reply by reply.

Behaviour the REPL and the server rely on:

- **KV-cache prefix reuse.** Every turn renders the whole conversation with the chat
  template and hands it to ``LoadedModel.run_prompt``, which keeps the longest common prefix
  already in the context and decodes only the rest. A follow-up question about an image seen
  before costs only the new tokens, and the image is not encoded again (``Stats``:
  ``prompt_eval_tokens``, ``cached_tokens``, ``images_encoded``).
- **Context overflow.** When the prompt plus room for the reply (``min(max_tokens, n_ctx/4)``)
  would not fit, the oldest turns (a user message and the replies after it) are left out of
  the prompt, the system prompt always kept; a ``ContextTrimmed`` event says how many
  messages. The history keeps them (``export``). A single message that cannot fit even alone
  (e.g. an image with more tokens than the context) is a ``UserError`` and nothing is added to
  the history. A reply that fills the context ends with ``done_reason == "length"``.
- **Cancellation.** ``send`` is a generator: stop iterating and ``close()`` it (or let it be
  garbage-collected, or raise KeyboardInterrupt inside it) and the session stays usable. The
  user message and the part of the reply already yielded are kept in the history (the
  assistant message is marked ``interrupted``); the context keeps exactly the tokens that were
  decoded, and the next turn reuses them as far as they match the re-rendered conversation.
  If the prompt itself was interrupted (before any reply), the user message is dropped.
- **Stop strings** end the reply before the stop string (which is not part of the text);
  text that may be the start of a stop string is held back until it is decided.
- The first whitespace of a reply is dropped (SentencePiece's "▁" after ``ASSISTANT:``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmchat.errors import UserError
from mmchat.runtime.events import ContextTrimmed, Done, DoneReason, Event, Stats, Token
from mmchat.runtime.messages import (
    ImageInput,
    ImageLoader,
    Message,
    messages_from_data,
)
from mmchat.runtime.model import (
    ContextOverflowError,
    LoadedModel,
    PromptImage,
    PromptItem,
    count_positions,
    seed_or_random,
)
from mmchat.runtime.options import SamplingParams
from mmchat.runtime.sampler import SamplerChain, build_sampler
from mmchat.runtime.streaming import ReplyText

EXPORT_VERSION = 1


def grammar_for(p: SamplingParams) -> str | None:
    """The GBNF grammar that ``p`` asks for (its own, JSON, or a JSON schema's)."""
    if p.grammar is not None:
        return p.grammar
    if p.format is None:
        return None
    if p.format == "json":
        from llama_cpp.llama_grammar import JSON_GBNF

        return str(JSON_GBNF)
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(p.format)))
    except Exception as exc:
        raise UserError(f"cannot use this JSON schema as a format: {exc}") from exc


def sampler_for(model: LoadedModel, p: SamplingParams) -> SamplerChain:
    """The llama.cpp sampler chain for ``p`` (a bad grammar fails here)."""
    return build_sampler(
        model.text,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        min_p=p.min_p,
        repeat_penalty=p.repeat_penalty,
        repeat_last_n=p.repeat_last_n,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        seed=seed_or_random(p.seed),
        grammar=grammar_for(p),
    )


class ChatSession:
    """A conversation: system prompt, messages, sampling parameters, and statistics."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        system: str | None = None,
        params: SamplingParams | None = None,
    ) -> None:
        self.model = model
        self.system: str | None = system or None
        if params is None:
            params = SamplingParams(seed=model.options.seed)
        params.validate()
        self.params = params
        self.messages: list[Message] = []
        self.window_start = 0
        """Index of the first message the model still sees (older ones were trimmed)."""
        self.last_stats: Stats | None = None
        self._cancel = threading.Event()
        self._job_cancel: threading.Event | None = None

    # -- conversation state --

    def clear(self) -> None:
        """Forget the conversation (the system prompt and parameters stay)."""
        self.messages.clear()
        self.window_start = 0

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def set_params(self, **changes: Any) -> SamplingParams:
        """Change sampling parameters by name (``/set parameter``); returns the new set."""
        self.params = self.params.updated(**changes)
        return self.params

    @property
    def visible_messages(self) -> list[Message]:
        """The messages the model sees (after any trimming)."""
        return self._window(self.window_start)

    def cancel(self) -> None:
        """Ask a running ``send`` (in another thread) to stop at the next token or batch."""
        self._cancel.set()
        job_cancel = self._job_cancel
        if job_cancel is not None:
            job_cancel.set()

    def export(self) -> dict[str, Any]:
        """The conversation as plain JSON-able data (images by sha256 + path)."""
        return {
            "version": EXPORT_VERSION,
            "model": str(self.model.path),
            "system": self.system,
            "params": {k: v for k, v in asdict(self.params).items()},
            "messages": [m.to_dict() for m in self.messages],
        }

    def load(
        self,
        data: Mapping[str, Any],
        *,
        load_image: ImageLoader | None = None,
        base_dir: Path | None = None,
    ) -> None:
        """Replace the conversation with one from ``export`` (images re-read and checked)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("messages", []), list):
            raise UserError("not a saved mmchat conversation")
        messages = messages_from_data(
            data.get("messages", []), load_image=load_image, base_dir=base_dir
        )
        if any(m.images for m in messages) and not self.model.has_vision:
            raise UserError("the conversation has images but this model cannot see images")
        params = self.params
        if isinstance(data.get("params"), Mapping):
            params = params.updated(**dict(data["params"]))
        self.params = params
        self.system = data.get("system") or None
        self.messages = messages
        self.window_start = 0

    # -- talking --

    def send(
        self,
        text: str,
        images: Sequence[ImageInput] = (),
        *,
        params: SamplingParams | None = None,
    ) -> Generator[Event, None, None]:
        """Add a user message and stream the reply: ``Token``s, maybe a ``ContextTrimmed``
        first, and a final ``Done`` with the statistics."""
        p = params or self.params
        p.validate()
        imgs = list(images)
        model = self.model
        for media in imgs:
            if getattr(media, "embeddings", None) is None and not hasattr(media, "ndim"):
                model.check_media(media)  # this model cannot see images / hear audio
        return self._send(Message("user", text, imgs), p)

    def reply(self, *, params: SamplingParams | None = None) -> Generator[Event, None, None]:
        """Generate an assistant reply to the history as it is (its last message must be the
        user's), e.g. for an API request that brings its own messages."""
        if not self.messages or self.messages[-1].role != "user":
            raise UserError("the conversation must end with a user message")
        p = params or self.params
        p.validate()
        return self._send(None, p)

    def infill(
        self, prefix: str, suffix: str, *, params: SamplingParams | None = None
    ) -> Generator[Event, None, None]:
        """Fill in the middle: generate the text between ``prefix`` and ``suffix`` with the
        vocabulary's FIM tokens (``<PRE> prefix <SUF> suffix <MID>``, llama.cpp's order). No
        chat template; the history is not used. ``UserError`` for a model without them."""
        p = params or self.params
        p.validate()
        ids = self.model.fim_prompt(prefix, suffix)
        return self._send(None, p, prompt=[ids])

    def _send(
        self, user: Message | None, p: SamplingParams, prompt: list[PromptItem] | None = None
    ) -> Generator[Event, None, None]:
        if self.model.scheduler is not None:
            return self._send_parallel(user, p, prompt)
        return self._send_alone(user, p, prompt)

    def _send_parallel(
        self, user: Message | None, p: SamplingParams, prompt: list[PromptItem] | None
    ) -> Generator[Event, None, None]:
        """The reply from the model's batch scheduler (a model served with --parallel)."""
        from mmchat.runtime.parallel import job_events

        added = False
        if user is not None:
            self.messages.append(user)
            added = True
        shown = ""
        stop = threading.Event()  # this reply's own: the scheduler may look after we return
        self._job_cancel = stop
        if self._cancel.is_set():
            stop.set()
        try:
            items, dropped = (prompt, 0) if prompt is not None else self._fit(p)
            if dropped:
                yield ContextTrimmed(dropped, count_positions(items), self.model.n_ctx)
            job = self.model.scheduler.submit(items, p, stop)
            for ev in job_events(job):
                if isinstance(ev, Done):
                    ev.stats.dropped_messages = dropped
                    self.messages.append(Message("assistant", ev.text))
                    self.last_stats = ev.stats
                    added = False
                    yield ev
                    return
                if isinstance(ev, Token):
                    shown += ev.text
                yield ev
        except (GeneratorExit, KeyboardInterrupt):
            stop.set()
            if shown:
                self.messages.append(Message("assistant", shown, interrupted=True))
            elif added:
                self.messages.pop()
            raise
        except BaseException:
            stop.set()
            if shown:
                self.messages.append(Message("assistant", shown, interrupted=True))
            elif added:
                self.messages.pop()
            raise
        finally:
            self._job_cancel = None
            self._cancel.clear()

    def _send_alone(
        self, user: Message | None, p: SamplingParams, prompt: list[PromptItem] | None
    ) -> Generator[Event, None, None]:
        model = self.model
        t_call = time.perf_counter()
        model.lock.acquire()
        t_start = time.perf_counter()
        stats = Stats(load_ms=model.load_ms, queue_ms=(t_start - t_call) * 1000)
        added = False
        chain: SamplerChain | None = None
        try:
            chain = self._sampler(p)  # a bad grammar fails here, before anything changes
            if user is not None:
                self.messages.append(user)
                added = True
            try:
                items, dropped = (prompt, 0) if prompt is not None else self._fit(p)
                if count_positions(items) > model.n_ctx:
                    raise ContextOverflowError(count_positions(items), model.n_ctx)
                stats.dropped_messages = dropped
                if dropped:
                    yield ContextTrimmed(dropped, count_positions(items), model.n_ctx)
                run = model.run_prompt(items, cancel=self._cancel)
            except BaseException:
                if added:
                    self.messages.pop()
                raise
            stats.prompt_tokens = run.prompt_tokens
            stats.prompt_eval_tokens = run.evaluated
            stats.cached_tokens = run.cached
            stats.prompt_eval_ms = run.eval_ms
            stats.images = run.images
            stats.images_encoded = run.images_encoded
            stats.images_from_cache = run.images_from_cache
            stats.image_encode_ms = run.encode_ms
            done = yield from self._generate(p, chain, stats, t_start, added)
        finally:
            if chain is not None:
                chain.close()
            self._cancel.clear()
            model.lock.release()
        # yielded after the lock is released: a consumer that stops reading at Done (and
        # keeps the generator around) does not hold the model
        yield done

    def _fit(self, p: SamplingParams) -> tuple[list[PromptItem], int]:
        """The prompt for the visible conversation, trimming the oldest turns to make room."""
        model = self.model
        n_ctx = model.n_ctx
        reserve = max(1, min(p.max_tokens if p.max_tokens is not None else n_ctx, n_ctx // 4))
        start = self.window_start
        last_user = max(i for i, m in enumerate(self.messages) if m.role == "user")
        while True:
            items = model.build_prompt(self._window(start), system=self.system)
            n = count_positions(items)
            if n + reserve <= n_ctx:
                break
            nxt = next(
                (i for i in range(start + 1, last_user + 1) if self.messages[i].role == "user"),
                None,
            )
            if nxt is None:
                if n < n_ctx:  # fits, with less room for the reply
                    break
                raise self._too_long(items, n, n_ctx)
            start = nxt
        dropped = sum(1 for m in self.messages[self.window_start : start] if m.role != "system")
        self.window_start = start
        return items, dropped

    def _window(self, start: int) -> list[Message]:
        """Messages from ``start`` on, plus any system messages before it (never trimmed)."""
        kept = [m for m in self.messages[:start] if m.role == "system"]
        return kept + self.messages[start:]

    def _too_long(self, items: list[PromptItem], n: int, n_ctx: int) -> UserError:
        img_tokens = [it.positions for it in items if isinstance(it, PromptImage)]
        if img_tokens and max(img_tokens) >= n_ctx - 1:
            return ContextOverflowError(
                n,
                n_ctx,
                f"the image needs {max(img_tokens)} tokens but the context holds only {n_ctx} "
                "(start with a larger context, e.g. --ctx)",
            )
        return ContextOverflowError(
            n,
            n_ctx,
            f"the message needs {n} tokens with the system prompt but the context holds "
            f"only {n_ctx} (shorten it or start with a larger context, e.g. --ctx)",
        )

    def _sampler(self, p: SamplingParams) -> SamplerChain:
        return sampler_for(self.model, p)

    def _generate(
        self,
        p: SamplingParams,
        chain: SamplerChain,
        stats: Stats,
        t_start: float,
        user_added: bool,
    ) -> Generator[Event, None, Done]:
        model = self.model
        reply = ReplyText(p.stop)
        pending: list[int] = []  # token ids whose text is not yet yielded
        reason: DoneReason = "stop"
        busy = 0.0  # seconds spent sampling and decoding (not waiting for the consumer)
        try:
            while True:
                if p.max_tokens is not None and stats.generated_tokens >= p.max_tokens:
                    reason = "length"
                    break
                if self._cancel.is_set():
                    raise KeyboardInterrupt
                t0 = time.perf_counter()
                token = chain.sample(model.ctx)
                busy += time.perf_counter() - t0
                if model.text.is_eog(token):
                    break
                stats.generated_tokens += 1
                pending.append(token)
                chunk = reply.feed(model.text.piece(token))
                if chunk:
                    if not stats.ttft_ms:
                        stats.ttft_ms = (time.perf_counter() - t_start) * 1000
                    yield Token(chunk, pending)
                    pending = []
                if reply.stopped:
                    break
                if model.kv_tokens >= model.n_ctx:
                    reason = "length"
                    break
                t0 = time.perf_counter()
                model.decode_token(token)
                busy += time.perf_counter() - t0
            chunk = reply.finish()
            if chunk:
                if not stats.ttft_ms:
                    stats.ttft_ms = (time.perf_counter() - t_start) * 1000
                yield Token(chunk, pending)
        except (GeneratorExit, KeyboardInterrupt):
            stats.eval_ms = busy * 1000
            stats.total_ms = (time.perf_counter() - t_start) * 1000
            stats.done_reason = "cancelled"
            self.messages.append(Message("assistant", reply.shown, interrupted=True))
            self.last_stats = stats
            raise
        except Exception:  # a failed decode: keep the history consistent with what was seen
            if reply.shown or not user_added:
                self.messages.append(Message("assistant", reply.shown, interrupted=True))
            else:
                self.messages.pop()
            raise
        stats.eval_ms = busy * 1000
        stats.total_ms = (time.perf_counter() - t_start) * 1000
        stats.done_reason = reason
        self.messages.append(Message("assistant", reply.text))
        self.last_stats = stats
        return Done(text=reply.text, stats=stats, done_reason=reason)

    def ask(self, text: str, images: Sequence[ImageInput] = (), **kw: Any) -> Done:
        """Send and wait for the whole reply (convenience for scripts and tests)."""
        done: Done | None = None
        for ev in self.send(text, images, **kw):
            if isinstance(ev, Done):
                done = ev
        assert done is not None
        return done
