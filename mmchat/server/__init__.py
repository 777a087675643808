"""``mmchat serve``: an Ollama- and OpenAI-compatible HTTP API over the local model store.

Public API::

    manager = ModelManager()                    # loads models on first use, unloads when idle
    app = create_app(manager, api_key=None)     # the FastAPI application (ASGI)

Modules: ``app`` (factory, middleware, error handlers), ``ollama_api`` (``/api/*``),
``openai_api`` (``/v1/*``), ``embed_api`` (``/api/embed``, ``/api/embeddings``,
``/v1/embeddings``), ``completions_api`` (``/v1/completions``), ``files_api``
(``/api/copy``, ``/api/blobs``, ``/api/create``; ``requantize`` for its ``quantize``),
``schemas`` (request/response models: they make
``/openapi.json``), ``models`` (the model manager), ``chat`` (one generation request,
streamed from a worker thread), ``images`` (base64 / data-URI decoding), ``limits``
(request size, images per request, pixels per image), ``errors`` (JSON error bodies).
"""

from __future__ import annotations

from mmchat.server.app import create_app
from mmchat.server.limits import Limits
from mmchat.server.models import ModelManager

__all__ = ["Limits", "ModelManager", "create_app"]
