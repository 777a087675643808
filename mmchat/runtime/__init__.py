"""The runtime: text models on llama.cpp (llama-cpp-python's low-level API), chat templates,
chat sessions with KV-cache prefix reuse, sampling, streaming and statistics.

Used alike by the REPL (``mmchat run``) and the HTTP server (``mmchat serve``)::

    from mmchat.runtime import LoadOptions, SamplingParams, load_model

    with load_model("model.gguf", "mmproj.gguf", LoadOptions(n_ctx=4096)) as model:
        chat = model.session(system="Be brief.", params=SamplingParams(seed=1))
        for event in chat.send("What is in this image?", [prepared_image]):
            ...  # Token(text), ContextTrimmed(...), Done(text, stats)

Parity and scripting: ``model.evaluate(messages)`` returns the image embeddings and the
final-position logits; ``model.evaluate_ids(segments)`` does the same for token ids and
embeddings given directly.

Importing this package does not import llama-cpp-python; ``load_model`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmchat.runtime.events import ContextTrimmed, Done, Event, Stats, Token
from mmchat.runtime.messages import Message
from mmchat.runtime.options import LoadOptions, SamplingParams

if TYPE_CHECKING:
    from mmchat.runtime.loader import load_model
    from mmchat.runtime.model import ContextOverflowError, Evaluation, LoadedModel
    from mmchat.runtime.session import ChatSession

__all__ = [
    "ChatSession",
    "ContextOverflowError",
    "ContextTrimmed",
    "Done",
    "Evaluation",
    "Event",
    "LoadOptions",
    "LoadedModel",
    "Message",
    "SamplingParams",
    "Stats",
    "Token",
    "load_model",
]

_LAZY = {
    "ChatSession": "mmchat.runtime.session",
    "ContextOverflowError": "mmchat.runtime.model",
    "Evaluation": "mmchat.runtime.model",
    "LoadedModel": "mmchat.runtime.model",
    "load_model": "mmchat.runtime.loader",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmchat.runtime' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
