"""Turning an API request's messages into the runtime's (system prompt, messages).

Both APIs (Ollama and OpenAI) parse their own message shapes into ``Turn``s; the checks
that do not depend on the API — images on system messages, the image limit, images sent to
a model without vision, who speaks last — live here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mmchat.server.errors import ApiError
from mmchat.server.images import RawImage, prepare
from mmchat.server.state import ServerState


@dataclass
class Turn:
    """One parsed message: its 1-based position, role (system/user/assistant), text, images."""

    index: int
    role: str
    text: str
    images: list[RawImage]


def build_conversation(
    turns: Iterable[Turn], state: ServerState, record: Any, *, allow_empty: bool
) -> tuple[str | None, list[Any]]:
    """Check the turns and prepare their images; return (system prompt, runtime messages).

    ``allow_empty``: a request with no messages at all is valid (Ollama's load/unload call).
    """
    from mmchat.runtime import Message

    system_parts: list[str] = []
    chat: list[Turn] = []
    n_images = 0
    for turn in turns:
        n_images += len(turn.images)
        if turn.role == "system":
            if turn.images:
                raise ApiError(400, f"message {turn.index} is a system message with images")
            system_parts.append(turn.text)
        else:
            chat.append(turn)
    state.limits.check_image_count(n_images)
    n_audio = sum(1 for t in chat for m in t.images if m.audio)
    if n_images - n_audio and "vision" not in record.capabilities:
        raise ApiError(
            400,
            f"model {record.name!r} cannot see images (it has no vision projector); "
            "send text only or use a vision model",
            code="model_has_no_vision",
        )
    if n_audio and "audio" not in record.capabilities:
        raise ApiError(
            400,
            f"model {record.name!r} cannot hear audio (its projector has no audio encoder); "
            "send text only or use an audio model",
            code="model_has_no_audio",
        )
    if chat and chat[-1].role != "user":
        raise ApiError(400, "the last message must be the user's")
    if not chat and (system_parts or not allow_empty):
        raise ApiError(400, "the messages have no user message")
    messages = [
        Message(t.role, t.text, prepare(t.images, state.max_image_pixels) if t.images else [])
        for t in chat
    ]
    system = "\n\n".join(p for p in system_parts if p) or None
    return system, messages
