"""``BatchScheduler``: several replies from one model at once (continuous batching).

A model loaded with ``n_parallel = N`` has one llama.cpp context with N sequences (slots),
each a ``KVSequence`` of at most ``n_ctx`` cells. Requests (``Job``s) come from any thread;
one scheduler thread owns the context and runs steps:

1. Free slots take queued jobs in arrival order (FIFO); a job goes to the free slot whose
   KV cells share the longest prefix with its prompt, so a client continuing its
   conversation re-evaluates only the new tokens. Its media are encoded then.
2. One ``llama_decode`` per step carries the next token of every replying job plus a chunk
   (up to ``n_batch`` cells) of one waiting prompt, so running replies keep streaming while
   a long prompt is evaluated. Image rows cannot share a batch with tokens: a job's image
   block is decoded on its own step.
3. Each replying job samples from its own logits with its own sampler chain and stop rules.

A cancelled job (its client went away) leaves its slot at the next step; its KV cells stay
for the next request that shares them. When N jobs run and the queue holds ``max_queue``
more, ``submit`` raises ``QueueFullError`` (the server answers 503 with Retry-After).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mmchat.errors import UserError
from mmchat.runtime.events import Done, DoneReason, Event, Stats, Token
from mmchat.runtime.kvseq import Chunk, ContextOverflowError, KVSequence
from mmchat.runtime.pieces import PromptItem, PromptMedia, count_positions, prompt_units
from mmchat.runtime.sampler import SamplerChain
from mmchat.runtime.streaming import ReplyText

if TYPE_CHECKING:
    from mmchat.runtime.model import LoadedModel
    from mmchat.runtime.options import SamplingParams

DEFAULT_MAX_QUEUE = 64


class QueueFullError(UserError):
    """Every slot is busy and the queue is full: try again shortly."""

    retry_after_s = 1


@dataclass
class Job:
    """One reply being produced by the scheduler."""

    items: list[PromptItem]
    params: SamplingParams
    chain: SamplerChain
    cancel: threading.Event
    stats: Stats
    events: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    slot: int = -1
    """Its sequence, once admitted."""
    chunks: Iterator[Chunk] | None = None
    pending: Chunk | None = None
    replying: bool = False
    reply: ReplyText | None = None
    token: int = -1
    held: list[int] = field(default_factory=list)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    busy_s: float = 0.0


class BatchScheduler:
    """Continuous batching over the sequences of one ``LoadedModel``."""

    def __init__(self, model: LoadedModel, *, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        self.model = model
        self.max_queue = max_queue
        self.slots: list[KVSequence] = [KVSequence(model.ctx, i) for i in range(model.n_seq)]
        self.jobs: list[Job | None] = [None] * model.n_seq
        self.waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="mmchat-batch", daemon=True)
        self._thread.start()

    # -- requests (any thread) --

    @property
    def active(self) -> int:
        with self._cond:
            return sum(j is not None for j in self.jobs)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self.waiting)

    def submit(
        self, items: list[PromptItem], params: SamplingParams, cancel: threading.Event
    ) -> Job:
        """Queue a reply to ``items``; its events arrive on ``job.events``."""
        from mmchat.runtime.session import sampler_for

        chain = sampler_for(self.model, params)
        job = Job(items, params, chain, cancel, Stats(load_ms=self.model.load_ms))
        with self._cond:
            if self._closed:
                chain.close()
                raise UserError("the model is being unloaded")
            if len(self.waiting) >= self.max_queue and all(j is not None for j in self.jobs):
                chain.close()
                raise QueueFullError(
                    f"the server is busy: {len(self.jobs)} replies are running and "
                    f"{len(self.waiting)} are waiting; try again shortly"
                )
            self.waiting.append(job)
            self._cond.notify_all()
        return job

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the scheduler thread --

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._closed or any(j is not None for j in self.jobs) or bool(self.waiting)
                    )
                )
                if self._closed:
                    break
            try:
                with self.model.lock:
                    self._admit()
                    self._step()
            except BaseException as exc:  # pragma: no cover - a bug: fail the running jobs
                for i, job in enumerate(self.jobs):
                    if job is not None:
                        self._finish(i, job, exc)
        with self._cond:
            rest = [j for j in self.jobs if j is not None] + list(self.waiting)
            self.waiting.clear()
        for job in rest:
            job.chain.close()
            job.events.put(UserError("the model was unloaded"))

    def _admit(self) -> None:
        while True:
            with self._cond:
                free = [i for i, j in enumerate(self.jobs) if j is None]
                if not free or not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancel.is_set():
                job.chain.close()
                job.events.put(KeyboardInterrupt())
                continue
            units = prompt_units(job.items)  # once, for every free slot
            slot = max(free, key=lambda i: (self.slots[i].common_prefix(job.items, units), -i))
            try:
                self._start(slot, job)
            except BaseException as exc:
                job.chain.close()
                job.events.put(exc)
                continue
            with self._cond:
                self.jobs[slot] = job

    def _start(self, slot: int, job: Job) -> None:
        seq = self.slots[slot]
        model = self.model
        total = count_positions(job.items)
        if total > model.n_ctx:
            raise ContextOverflowError(total, model.n_ctx)
        job.t_start = time.perf_counter()
        job.stats.queue_ms = (job.t_start - job.t_submit) * 1000
        seq.sync()
        common = seq.common_prefix(job.items)
        need = []
        pos = 0
        for it in job.items:
            n = it.cells if isinstance(it, PromptMedia) else len(it)
            if isinstance(it, PromptMedia) and pos + n > common:
                need.append(it)
            pos += n
        run = model.encode_media(need)
        common = seq.cut(seq.common_prefix(job.items))
        st = job.stats
        st.prompt_tokens = total
        st.cached_tokens = common
        st.prompt_eval_tokens = total - common
        st.images = sum(isinstance(it, PromptMedia) for it in job.items)
        st.images_encoded = run.images_encoded
        st.images_from_cache = run.images_from_cache
        st.image_encode_ms = run.encode_ms
        job.slot = slot
        # a prompt chunk shares its batch with the next token of every other slot
        job.chunks = seq.chunks(job.items, common, max(1, model.ctx.n_batch - model.n_seq))
        job.pending = next(job.chunks, None)

    def _step(self) -> None:
        model = self.model
        ctx = model.ctx
        t0 = time.perf_counter()
        for i, job in enumerate(self.jobs):  # cancelled jobs leave their slot now
            if job is not None and job.cancel.is_set():
                self._finish(i, job, KeyboardInterrupt())
        # an image block of the first prompting job goes alone
        prompting = [j for j in self.jobs if j is not None and not j.replying]
        for job in prompting:
            if job.pending is not None and job.pending.embd is not None:
                seq = self.slots[job.slot]
                try:
                    seq.apply(job.pending)
                except BaseException as exc:
                    seq.sync()
                    self._finish(job.slot, job, exc)
                    return
                self._advance(job, t0)
                return
        tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        logits: list[int] = []
        replying: list[tuple[Job, int]] = []
        for job in self.jobs:
            if job is not None and job.replying:
                seq = self.slots[job.slot]
                if len(seq) >= model.n_ctx:
                    self._done(job, "length")
                    continue
                replying.append((job, len(tokens)))
                tokens.append(job.token)
                pos.append(seq.next_pos)
                seqs.append(seq.seq_id)
                logits.append(1)
        prompt_job: Job | None = None
        chunk: Chunk | None = None
        for job in prompting:
            if job.pending is not None and job.pending.tokens is not None:
                prompt_job, chunk = job, job.pending
                break
        if prompt_job is not None and chunk is not None:
            assert chunk.tokens is not None
            tokens.extend(int(t) for t in chunk.tokens)
            pos.extend(int(p) for p in chunk.pos)
            seqs.extend([prompt_job.slot] * len(chunk.tokens))
            logits.extend([0] * (len(chunk.tokens) - 1) + [1 if chunk.last else 0])
        if not tokens:
            return
        try:
            ctx.decode_mixed(
                np.asarray(tokens, dtype=np.int32),
                np.asarray(pos, dtype=np.int32),
                np.asarray(seqs, dtype=np.int32),
                np.asarray(logits, dtype=np.int8),
            )
        except BaseException as exc:
            for i, job in enumerate(self.jobs):
                if job is not None and (job.replying or job is prompt_job):
                    self.slots[i].sync()
                    self._finish(i, job, exc)
            return
        for job, _ in replying:
            seq = self.slots[job.slot]
            seq.units.append(job.token)
            seq.cell_pos.append(seq.next_pos)
            seq.next_pos += 1
        if prompt_job is not None and chunk is not None:
            self.slots[prompt_job.slot].commit(chunk)
        dt = time.perf_counter() - t0
        for job, idx in replying:
            job.busy_s += dt
            self._sample(job, idx)
        if prompt_job is not None:
            self._advance(prompt_job, t0, idx=len(tokens) - 1)

    def _advance(self, job: Job, t0: float, idx: int = -1) -> None:
        """After one of ``job``'s prompt chunks: the next one, or its first token."""
        assert job.chunks is not None
        job.stats.prompt_eval_ms += (time.perf_counter() - t0) * 1000
        last = job.pending is not None and job.pending.last
        job.pending = next(job.chunks, None)
        if job.pending is None:
            if not last:  # pragma: no cover - a prompt always ends with its last cell
                raise RuntimeError("the prompt ended without its last cell")
            job.replying = True
            job.reply = ReplyText(job.params.stop)
            self._sample(job, idx)

    def _sample(self, job: Job, idx: int) -> None:
        model = self.model
        p = job.params
        t0 = time.perf_counter()
        token = job.chain.sample(model.ctx, idx)
        job.busy_s += time.perf_counter() - t0
        assert job.reply is not None
        if model.text.is_eog(token):
            self._done(job, "stop")
            return
        st = job.stats
        st.generated_tokens += 1
        job.held.append(token)
        text = job.reply.feed(model.text.piece(token))
        if text:
            if not st.ttft_ms:
                st.ttft_ms = (time.perf_counter() - job.t_start) * 1000
            job.events.put(Token(text, job.held))
            job.held = []
        if job.reply.stopped:
            self._done(job, "stop")
        elif p.max_tokens is not None and st.generated_tokens >= p.max_tokens:
            self._done(job, "length")
        else:
            job.token = token

    def _done(self, job: Job, reason: DoneReason) -> None:
        assert job.reply is not None
        rest = job.reply.finish()
        st = job.stats
        if rest:
            if not st.ttft_ms:
                st.ttft_ms = (time.perf_counter() - job.t_start) * 1000
            job.events.put(Token(rest, job.held))
        st.eval_ms = job.busy_s * 1000
        st.total_ms = (time.perf_counter() - job.t_start) * 1000
        st.done_reason = reason
        self._finish(job.slot, job, Done(text=job.reply.text, stats=st, done_reason=reason))

    def _finish(self, slot: int, job: Job, last: Any) -> None:
        job.chain.close()
        with self._cond:
            if self.jobs[slot] is job:
                self.jobs[slot] = None
            self._cond.notify_all()
        job.events.put(last)


def job_events(job: Job) -> Iterator[Event]:
    """The events of a job as the consumer sees them: ``Token``s then ``Done``; an error or
    a cancellation is raised."""
    while True:
        item = job.events.get()
        if isinstance(item, BaseException):
            raise item
        yield item
        if isinstance(item, Done):
            return


def auto_parallel(model_path: Any, n_ctx: int | None, kv_cache_type: str) -> int:
    """``default_parallel`` for a GGUF file on this machine (its size, the KV cache one
    sequence of ``n_ctx`` needs by its header, the memory available now)."""
    import os
    from pathlib import Path

    from mmchat.gguf_meta import read_gguf
    from mmchat.runtime.options import DEFAULT_N_CTX

    path = Path(model_path)
    try:
        info = read_gguf(path, role="model")
        n_layer = int(info.arch_key("block_count") or 0)
        n_embd = int(info.arch_key("embedding_length") or 0)
        n_head = int(info.arch_key("attention.head_count") or 1)
        n_head_kv = int(info.arch_key("attention.head_count_kv") or n_head)
        train = int(info.arch_key("context_length") or DEFAULT_N_CTX)
    except Exception:
        return 1
    ctx = n_ctx or min(DEFAULT_N_CTX, train)
    width = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 1, "q4_0": 1}.get(kv_cache_type, 2)
    kv = 2 * n_layer * ctx * (n_embd * n_head_kv // max(n_head, 1)) * width
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1
    return default_parallel(path.stat().st_size, kv, available)


def default_parallel(model_bytes: int, kv_bytes_per_seq: int, available: int) -> int:
    """Ollama's rule of thumb: 4 sequences when their KV cache fits in half the memory left
    after the weights, else as many as fit (at least 1)."""
    room = max(0, available - model_bytes) // 2
    if kv_bytes_per_seq <= 0:
        return 4
    return int(max(1, min(4, room // kv_bytes_per_seq)))
