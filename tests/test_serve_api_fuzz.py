"""Fuzz the newer endpoints (embeddings, text completions, create/copy/blobs) from the
server's own OpenAPI description, as tests/test_serve_fuzz.py does for the rest: generated
requests, valid and invalid, and never a 500. A second pass pins the model of the
embedding and completion requests to the tiny fixture so that random inputs, options and
prompts reach llama.cpp.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from schemathesis import GenerationMode
from test_serve import LiveServer, make_store, start_server
from test_serve_fuzz import check, operations

NEW_PATHS = {
    "/api/embed",
    "/api/embeddings",
    "/v1/embeddings",
    "/v1/completions",
    "/api/copy",
    "/api/create",
    "/api/blobs/{digest}",
}
WITH_MODEL = {"/api/embed", "/api/embeddings", "/v1/embeddings", "/v1/completions"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = make_store(tmp_path_factory.mktemp("serve-api-fuzz"))
    srv = start_server(store, max_body_bytes=1 << 20, max_blob_bytes=1 << 20, max_prompts=2)
    yield srv
    srv.stop()


def test_fuzz_new_endpoints_no_server_errors(live: LiveServer) -> None:
    ops = [op for op in operations(live) if op.path in NEW_PATHS]
    assert {op.path for op in ops} == NEW_PATHS
    failures: list[str] = []
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += check(live, op, mode, pin=False)
        if op.path in WITH_MODEL:
            failures += check(live, op, GenerationMode.POSITIVE, pin=True)
    assert not failures, "\n".join(failures)
    r = live.ollama().embed(model="tinytext", input="still serving")
    assert len(r.embeddings) == 1
