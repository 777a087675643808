"""What every handler needs, kept on ``app.state.mmchat``."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from mmchat.server.limits import Limits
from mmchat.server.models import ModelManager


@dataclass
class ServerState:
    manager: ModelManager
    limits: Limits

    @property
    def max_image_pixels(self) -> int | None:
        return self.limits.max_image_pixels


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.mmchat
    return state
