"""The greedy llama.cpp sampler chain the cross-attention parity tests generate with."""

from __future__ import annotations

from typing import Any

from mmchat.runtime.sampler import SamplerChain, build_sampler


def greedy_chain(vocab: Any) -> SamplerChain:
    """argmax, no penalties (transformers' greedy ``generate``); close it after use."""
    return build_sampler(
        vocab,
        temperature=0.0,
        top_k=40,
        top_p=1.0,
        min_p=0.0,
        repeat_penalty=1.0,
        repeat_last_n=64,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=0,
        grammar=None,
    )
