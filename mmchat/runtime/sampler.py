"""llama.cpp's sampler chain over libllama contexts and other ``TextBackend``s' logits:
the only sampler mmchat has (no hand-written sampling)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from mmchat.errors import UserError
from mmchat.runtime._llama import C, Context, TextModel, clear_recent_errors, recent_errors

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class SamplerChain:
    """A llama.cpp sampler chain; freed with ``close()``."""

    def __init__(self) -> None:
        params = C.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr: Any = C.llama_sampler_chain_init(params)

    def add(self, smpl: Any) -> None:
        if not smpl:
            raise UserError("llama.cpp could not create a sampler" + _why())
        C.llama_sampler_chain_add(self.ptr, smpl)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        """Sample from the logits of batch entry ``idx`` of the last decode (-1: the last).
        ``ctx`` is a ``Context``, or another ``TextBackend`` (its logits array is sampled)."""
        if isinstance(ctx, Context):
            return int(C.llama_sampler_sample(self.ptr, ctx.ptr, idx))
        return self.sample_logits(ctx.last_logits() if idx < 0 else ctx.logits_at(idx))

    def sample_logits(self, logits: np.ndarray) -> int:
        """Sample one token from a logits vector (what ``llama_sampler_sample`` does with a
        context's logits), and accept it."""
        n = int(logits.shape[0])
        data = np.zeros(n, dtype=_TOKEN_DATA)  # llama_token_data: id, logit, p
        data["id"] = np.arange(n, dtype=np.int32)
        data["logit"] = logits
        cur = C.llama_token_data_array(
            data.ctypes.data_as(ctypes.POINTER(C.llama_token_data)), n, -1, False
        )
        C.llama_sampler_apply(self.ptr, ctypes.byref(cur))
        if not 0 <= int(cur.selected) < int(cur.size):
            raise RuntimeError("the sampler chain selected no token")
        token = int(cur.data[int(cur.selected)].id)
        C.llama_sampler_accept(self.ptr, token)
        return token

    def close(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None


def _why() -> str:
    why = recent_errors()
    return f": {why}" if why else ""


def build_sampler(
    model: TextModel,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repeat_penalty: float,
    repeat_last_n: int,
    frequency_penalty: float,
    presence_penalty: float,
    seed: int,
    grammar: str | None,
) -> SamplerChain:
    chain = SamplerChain()
    try:
        if grammar is not None:
            clear_recent_errors()
            smpl = C.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
            if not smpl:
                raise UserError("the grammar is not valid GBNF (with a rule named root)" + _why())
            chain.add(smpl)
        if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
            chain.add(
                C.llama_sampler_init_penalties(
                    model.n_vocab,
                    repeat_last_n,
                    repeat_penalty,
                    frequency_penalty,
                    presence_penalty,
                )
            )
        if temperature <= 0:
            chain.add(C.llama_sampler_init_greedy())
            return chain
        if top_k > 0:
            chain.add(C.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            chain.add(C.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            chain.add(C.llama_sampler_init_min_p(min_p, 1))
        chain.add(C.llama_sampler_init_temp(temperature))
        chain.add(C.llama_sampler_init_dist(seed))
    except BaseException:
        chain.close()
        raise
    return chain
