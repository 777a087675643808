"""Fuzz `mmchat serve` from its own OpenAPI description (schemathesis + hypothesis):
a bounded number of generated requests per operation, valid and invalid, and no 500s.

Two passes: every operation as described (random model names: mostly 400/404), and the
generation endpoints with the body's model pinned to the tiny fixture so that random
options, formats, messages and images reach the runtime (replies capped at a few tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from test_serve import LiveServer, make_store, start_server

EXAMPLES = 8  # per operation and mode; the suite must stay fast on 2 shared cores
SKIP = {"/api/pull"}  # pulling random names would go to the network (the hub)
GENERATION = {"/api/chat", "/api/generate", "/v1/chat/completions"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path_factory.mktemp("serve-fuzz")), max_body_bytes=1 << 20)
    yield srv
    srv.stop()


def operations(live: LiveServer) -> list[Any]:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    return [op for op in ops if op.path not in SKIP]


def pin_to_tiny(path: str, body: Any) -> Any:
    """The body with model "tiny" and at most 4 new tokens (other fields as generated)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body["model"] = "tiny"
    body.pop("keep_alive", None)  # 0 would unload the model after every case
    if path.startswith("/v1/"):
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = 4
    else:
        options = dict(body["options"]) if isinstance(body.get("options"), dict) else {}
        options["num_predict"] = 4
        options.pop("num_ctx", None)  # each new size would reload the model
        body["options"] = options
    return body


def check(live: LiveServer, op: Any, mode: GenerationMode, *, pin: bool) -> list[str]:
    failures: list[str] = []
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        if pin:
            case.body = pin_to_tiny(op.path, case.body)
        response = case.call(base_url=live.url, session=session, timeout=60)
        if response.status_code >= 500:
            failures.append(
                f"{op.method.upper()} {op.path} -> {response.status_code}: "
                f"{response.text[:300]} (body {str(case.body)[:300]})"
            )
        elif response.status_code >= 400 and op.method.upper() != "HEAD":  # HEAD: no body
            assert "error" in response.json(), response.text

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (e.g. a GET without parameters)
        assert mode == GenerationMode.NEGATIVE
    return failures


@pytest.mark.slow
def test_fuzz_every_operation_no_server_errors(live: LiveServer) -> None:
    failures: list[str] = []
    for op in operations(live):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            failures += check(live, op, mode, pin=False)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_fuzz_generation_with_a_real_model_no_server_errors(live: LiveServer) -> None:
    failures: list[str] = []
    for op in operations(live):
        if op.path in GENERATION and op.method.lower() == "post":
            failures += check(live, op, GenerationMode.POSITIVE, pin=True)
    assert not failures, "\n".join(failures)
    r = live.ollama().chat(
        model="tiny", messages=[{"role": "user", "content": "ok?"}], options={"num_predict": 2}
    )
    assert r.done  # and the server still serves


@pytest.fixture(scope="module")
def live_parallel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = make_store(tmp_path_factory.mktemp("serve-fuzz-par"))
    srv = start_server(store, parallel=4, max_body_bytes=1 << 20)
    yield srv
    srv.stop()


@pytest.mark.slow
def test_fuzz_generation_with_parallel_4_no_server_errors(live_parallel: LiveServer) -> None:
    """The generation endpoints of a server answering 4 replies at once (issue 20)."""
    failures: list[str] = []
    for op in operations(live_parallel):
        if op.path in GENERATION and op.method.lower() == "post":
            failures += check(live_parallel, op, GenerationMode.POSITIVE, pin=True)
    assert not failures, "\n".join(failures)
    r = live_parallel.ollama().chat(
        model="tiny", messages=[{"role": "user", "content": "ok?"}], options={"num_predict": 2}
    )
    assert r.done
