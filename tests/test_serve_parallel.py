"""``mmchat serve --parallel N``: several replies from one model at once (continuous batching).

- 8 concurrent clients (official ``ollama`` and ``openai`` clients, streaming and not, with
  and without images, different prompts and lengths) each get the same greedy reply as when
  they run alone; an M-RoPE model (Qwen2-VL) and a model whose images come in pieces
  (SmolVLM) too;
- a client that goes away mid-stream frees its slot at once (the queued request starts);
- a full queue answers 503 with Retry-After; ``/health`` and ``/api/ps`` report the load;
- a follow-up request reuses its conversation's KV prefix in whichever slot holds it.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_serve import LiveServer, start_server

from mmchat.runtime import LoadOptions
from mmchat.store import Store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DEMO = ROOT / "mmchat" / "data" / "demo"
GREEDY = {"temperature": 0, "seed": 1}


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mmchat.converters import convert

    return convert(DEMO, outdir=tmp_path_factory.mktemp("demo-par"), name="demo")


def make_store(root: Path, demo: Any) -> Store:
    from test_mtmd_families import FAMILIES, files

    store = Store(root)
    store.register("demo", model=demo.model_path, mmproj=demo.mmproj_path)
    for family in ("qwen2vl", "smolvlm", "gemma3"):
        if family in FAMILIES:
            model, mmproj = files(family)
            store.register(family, model=model, mmproj=mmproj)
    return store


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, demo_files: Any) -> Iterator[LiveServer]:
    store = make_store(tmp_path_factory.mktemp("par"), demo_files)
    srv = start_server(store, parallel=4, load_options=LoadOptions(n_ctx=1024, n_threads=2))
    yield srv
    srv.stop()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# Eight requests, different shapes: (api, stream, prompt, image or None, max tokens)
REQUESTS: list[tuple[str, bool, str, str | None, int]] = [
    ("ollama", True, "What's in this image?", "red-circle.png", 12),
    ("ollama", False, "What shape is it?", "green-triangle.png", 8),
    ("openai", True, "How many shapes are there?", "blue-square-yellow-star.png", 10),
    ("openai", False, "What colour is it?", "red-circle.png", 6),
    ("ollama", True, "Hello! Tell me something long about circles and squares.", None, 24),
    ("openai", True, "What is in this picture?", "green-triangle.png", 16),
    ("ollama", False, "Say hi", None, 4),
    ("openai", False, "Describe the picture.", "blue-square-yellow-star.png", 20),
]


def run_request(live: LiveServer, model: str, req: tuple[str, bool, str, str | None, int]) -> str:
    api, stream, prompt, image, n = req
    if api == "ollama":
        msg: dict[str, Any] = {"role": "user", "content": prompt}
        if image:
            msg["images"] = [str(EXAMPLES / image)]
        opts = {**GREEDY, "num_predict": n}
        client = live.ollama()
        if stream:
            return "".join(
                c.message.content for c in client.chat(model, [msg], options=opts, stream=True)
            )
        return client.chat(model, [msg], options=opts).message.content or ""
    content: Any = prompt
    if image:
        uri = "data:image/png;base64," + b64(EXAMPLES / image)
        content = [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": prompt},
        ]
    kw: dict[str, Any] = {"temperature": 0, "seed": 1, "max_tokens": n}
    oa = live.openai()
    messages: Any = [{"role": "user", "content": content}]
    if stream:
        parts = oa.chat.completions.create(model=model, messages=messages, stream=True, **kw)
        return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    return (
        oa.chat.completions.create(model=model, messages=messages, **kw).choices[0].message.content
        or ""
    )


def concurrently(live: LiveServer, model: str, reqs: list[Any]) -> list[str]:
    out: list[Any] = [None] * len(reqs)

    def work(i: int) -> None:
        try:
            out[i] = run_request(live, model, reqs[i])
        except BaseException as exc:  # reported below
            out[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out


def test_eight_clients_get_what_they_get_alone(live: LiveServer) -> None:
    alone = [run_request(live, "demo", r) for r in REQUESTS]
    together = concurrently(live, "demo", REQUESTS)
    assert together == alone
    assert any(alone)  # the demo model answers (it names shapes)


@pytest.mark.parametrize("family", ["qwen2vl", "smolvlm"])
def test_pieces_and_mrope_models_in_parallel(live: LiveServer, family: str) -> None:
    from test_mtmd_families import FAMILIES

    if family not in FAMILIES:
        pytest.skip(f"no {family} fixture")
    reqs = [(api, s, p, img, n) for (api, s, p, img, n) in REQUESTS[:6]]
    alone = [run_request(live, family, r) for r in reqs]
    assert concurrently(live, family, reqs) == alone


def test_health_and_ps_report_the_parallel_model(live: LiveServer) -> None:
    run_request(live, "demo", REQUESTS[6])
    health = httpx.get(live.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["parallel"] == 4
    assert any(m["name"].startswith("demo") and m["parallel"] == 4 for m in health["models"])
    ps = httpx.get(live.url + "/api/ps", timeout=10).json()
    assert any(m["parallel"] == 4 for m in ps["models"])


def test_a_follow_up_reuses_its_prefix(live: LiveServer) -> None:
    client = live.ollama()
    first = {
        "role": "user",
        "content": "What's in this image?",
        "images": [str(EXAMPLES / "red-circle.png")],
    }
    r1 = client.chat("demo", [first], options={**GREEDY, "num_predict": 6})
    follow = [first, {"role": "assistant", "content": r1.message.content}]
    follow.append({"role": "user", "content": "And what colour is it?"})
    r2 = client.chat("demo", follow, options={**GREEDY, "num_predict": 6})
    # only the new turn is evaluated: far less than the image's 64 rows
    assert 0 < r2.prompt_eval_count < 40


# ----------------------------------------------------------------------------- slots, queue
@pytest.fixture
def small(tmp_path: Path, demo_files: Any) -> Iterator[LiveServer]:
    """Two slots, one place in the queue; contexts long enough that an endless reply keeps
    its slot for many seconds."""
    store = make_store(tmp_path, demo_files)
    opts = LoadOptions(n_ctx=16384, n_threads=1, max_queue=1)
    srv = start_server(store, parallel=2, load_options=opts)
    yield srv
    srv.stop()


LONG = "gemma3"  # a random tiny model: greedy, it repeats itself without ever ending


def _long_stream(live: LiveServer, started: threading.Event, stop: threading.Event) -> None:
    body = {"model": LONG, "prompt": "Talk", "options": {"num_predict": 100000, "temperature": 0}}
    with httpx.stream("POST", live.url + "/api/generate", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            started.set()
            if stop.is_set():
                return  # leaving the block closes the connection: the client goes away


def test_queue_overflow_is_503_and_a_cancelled_stream_frees_its_slot(small: LiveServer) -> None:
    from test_mtmd_families import FAMILIES

    if LONG not in FAMILIES:
        pytest.skip(f"no {LONG} fixture")
    run_request(small, LONG, REQUESTS[6])  # load the model
    stops = [threading.Event(), threading.Event()]
    starts = [threading.Event(), threading.Event()]
    streams = [
        threading.Thread(target=_long_stream, args=(small, starts[i], stops[i]), daemon=True)
        for i in range(2)
    ]
    for t in streams:
        t.start()
    assert all(s.wait(60) for s in starts)  # both slots busy
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(run_request(small, LONG, REQUESTS[6])), daemon=True
    )
    waiter.start()
    deadline = time.monotonic() + 30
    while httpx.get(small.url + "/health", timeout=5).json()["models"][0]["queued"] < 1:
        assert time.monotonic() < deadline, "the third request never queued"
        time.sleep(0.05)
    over = httpx.post(
        small.url + "/api/chat",
        json={"model": LONG, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert over.status_code == 503 and int(over.headers["Retry-After"]) >= 1
    assert "busy" in over.json()["error"]
    stops[0].set()  # one client goes away: the queued request takes its slot
    waiter.join(timeout=60)
    assert queued and isinstance(queued[0], str)
    stops[1].set()
    for t in streams:
        t.join(timeout=30)
