"""`mmchat serve` driven by the official clients (``ollama``, ``openai``) against a real
uvicorn server on an ephemeral 127.0.0.1 port, with the tiny converted LLaVA fixture.

The replies of the random-weight model are gibberish: the tests check the protocol, the
statistics and determinism (greedy + fixed seed), not the words.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import uvicorn

from mmchat.runtime import LoadOptions
from mmchat.server import Limits, ModelManager, create_app
from mmchat.store import Store

IMAGES = Path(__file__).resolve().parent / "fixtures" / "images"
IMAGE = IMAGES / "landscape.png"
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7, "num_predict": 8}


# ----------------------------------------------------------------------------- fixtures
@dataclass
class LiveServer:
    url: str
    manager: ModelManager
    store: Store
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def ollama(self, **kw: Any) -> ollama.Client:
        return ollama.Client(host=self.url, timeout=60, **kw)

    def openai(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def loaded(self) -> list[str]:
        return [e.name for e in self.manager.loaded()]


def start_server(
    store: Store,
    *,
    api_key: str | None = None,
    parallel: int | None = 1,
    load_options: LoadOptions | None = None,
    loader: Any = None,
    **limits: Any,
) -> LiveServer:
    """A real server in a thread, on a free loopback port, serving ``store``."""
    manager = ModelManager(
        store=store,
        load_options=load_options or LoadOptions(n_ctx=1024, n_threads=1),
        keep_alive_s=300,
        parallel=parallel,
        loader=loader,
    )
    app = create_app(manager, api_key=api_key, limits=Limits(**limits))
    # proto IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on such sockets, and without
    # it every response body waits ~40 ms behind its headers (Nagle + delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", manager, store, server, thread)


def make_store(root: Path) -> Store:
    """A store with the tiny LLaVA fixture as ``tiny`` (vision) and ``tinytext`` (no mmproj)."""
    from support.models import converted

    model, mmproj = converted("llava15_hf")
    store = Store(root)
    store.register("tiny", model=model, mmproj=mmproj)
    store.register("tinytext", model=model)
    return store


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path_factory.mktemp("serve")), max_body_bytes=4 << 20)
    yield srv
    srv.stop()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def data_uri(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(path)}"


def ask(client: ollama.Client, text: str, *, image: bool = True, **kw: Any) -> Any:
    msg: dict[str, Any] = {"role": "user", "content": text}
    if image:
        msg["images"] = [str(IMAGE)]  # the client reads the file and sends base64
    kw.setdefault("options", GREEDY)
    return client.chat(model="tiny", messages=[msg], **kw)


# ----------------------------------------------------------------------------- Ollama API
def test_ollama_chat_with_an_image_file(live: LiveServer) -> None:
    r = ask(live.ollama(), "What is in this picture?")
    assert r.done is True and r.done_reason in ("stop", "length")
    assert r.message.role == "assistant" and isinstance(r.message.content, str)
    assert r.model == "tiny"
    assert 1 <= r.eval_count <= 8
    assert r.prompt_eval_count > 0  # evaluated now (image positions included) or cached
    for name in ("prompt_eval_duration", "eval_duration", "total_duration"):
        assert isinstance(r[name], int) and r[name] > 0, name
    assert isinstance(r.load_duration, int) and r.load_duration >= 0
    parts = r.load_duration + r.prompt_eval_duration + r.eval_duration
    assert r.total_duration >= parts * 0.9  # total covers load, prompt and generation
    assert "tiny:latest" in live.loaded()


def test_ollama_chat_streaming_matches_the_whole_reply(live: LiveServer) -> None:
    client = live.ollama()
    whole = ask(client, "Describe it.")
    chunks = list(ask(client, "Describe it.", stream=True))
    assert len(chunks) >= 2
    assert all(c.done is False for c in chunks[:-1])
    last = chunks[-1]
    assert last.done is True and last.done_reason == whole.done_reason
    assert last.eval_count == whole.eval_count
    assert isinstance(last.total_duration, int) and last.total_duration > 0
    assert last.load_duration == 0  # already loaded
    # same greedy request, same reply; the repeat found the whole prompt in the KV cache
    assert "".join(c.message.content or "" for c in chunks) == whole.message.content
    assert last.prompt_eval_count < whole.prompt_eval_count or whole.prompt_eval_count <= 2


def test_ollama_generate_with_an_image(live: LiveServer) -> None:
    client = live.ollama()
    r = client.generate(model="tiny", prompt="Caption:", images=[str(IMAGE)], options=GREEDY)
    assert r.done and isinstance(r.response, str) and 1 <= r.eval_count <= 8
    streamed = list(
        client.generate(
            model="tiny", prompt="Caption:", images=[str(IMAGE)], options=GREEDY, stream=True
        )
    )
    assert streamed[-1].done and "".join(c.response for c in streamed) == r.response


def test_ollama_options_and_system_prompt(live: LiveServer) -> None:
    client = live.ollama()
    r = client.chat(
        model="tiny",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Count to ten."},
        ],
        options={"num_predict": 3, "temperature": 0.7, "top_p": 0.5, "top_k": 5, "seed": 1},
    )
    assert r.eval_count <= 3
    if r.eval_count == 3:
        assert r.done_reason == "length"
    again = client.chat(
        model="tiny",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Count to ten."},
        ],
        options={"num_predict": 3, "temperature": 0.7, "top_p": 0.5, "top_k": 5, "seed": 1},
    )
    assert again.message.content == r.message.content  # the seed makes sampling repeatable


def test_ollama_stop_strings(live: LiveServer) -> None:
    client = live.ollama()
    opts = {"temperature": 0, "seed": 1, "num_predict": 12}
    full = ask(client, "Stop test.", image=False, options=opts).message.content
    if len(full) < 4:
        pytest.skip("the tiny model's reply is too short to cut")
    stop = full[2:4]
    cut = full.index(stop)
    r = ask(client, "Stop test.", image=False, options={**opts, "stop": [stop]})
    assert r.message.content == full[:cut].strip() and r.done_reason == "stop"
    o = live.openai().chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Stop test."}],
        temperature=0,
        seed=1,
        max_tokens=12,
        stop=stop,
    )
    assert o.choices[0].message.content == full[:cut].strip()


def test_ollama_format_json_schema(live: LiveServer) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    r = live.ollama().chat(
        model="tiny",
        messages=[{"role": "user", "content": "A number, as JSON."}],
        format=schema,
        options={"temperature": 0, "num_predict": 40},
    )
    text = r.message.content.strip()
    assert text.startswith("{")
    if r.done_reason == "stop":
        assert isinstance(json.loads(text)["n"], int)


def test_ollama_format_json(live: LiveServer) -> None:
    r = live.ollama().chat(
        model="tiny",
        messages=[{"role": "user", "content": "Answer in JSON."}],
        format="json",
        options={"temperature": 0, "num_predict": 24},
    )
    text = r.message.content.strip()
    assert text.startswith(("{", "[")) or text == ""  # the grammar allows only JSON
    if r.done_reason == "stop":
        json.loads(text)


def test_ollama_list_show_ps(live: LiveServer) -> None:
    client = live.ollama()
    names = {m.model: m for m in client.list().models}
    assert {"tiny:latest", "tinytext:latest"} <= set(names)
    tiny = names["tiny:latest"]
    assert tiny.size and tiny.size > 0 and tiny.digest and len(tiny.digest) == 64
    assert tiny.details is not None and tiny.details.format == "gguf"
    assert tiny.details.family == "llama" and "clip" in (tiny.details.families or [])
    assert tiny.details.quantization_level == "F32"

    shown = client.show("tiny")
    assert shown.capabilities == ["completion", "vision"]
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.embedding_length"] == 64
    assert "FROM " in (shown.modelfile or "")
    assert client.show("tinytext").capabilities == ["completion"]

    ask(client, "hi", image=False)
    running = {m.model: m for m in client.ps().models}
    assert "tiny:latest" in running
    p = running["tiny:latest"]
    assert p.context_length == 1024 and p.size == tiny.size
    assert p.expires_at is not None and p.expires_at.timestamp() > time.time() + 60


def test_the_image_embedding_cache_is_shared_across_requests(live: LiveServer) -> None:
    client = live.ollama()
    image = IMAGES / "portrait.png"

    def go(system: str) -> None:
        client.chat(
            model="tiny",
            messages=[
                {"role": "system", "content": system},
                {"role": "user", "content": "And this one?", "images": [str(image)]},
            ],
            options=GREEDY,
        )

    go("First request.")
    entry = next(e for e in live.manager.loaded() if e.name == "tiny:latest")
    before = entry.model.vision.encode_count
    go("Another request, with another system prompt in front of the image.")
    # the KV cache could not be reused up to the image, yet it was not encoded again
    assert entry.model.vision.encode_count == before


def test_ollama_version_and_root(live: LiveServer) -> None:
    from mmchat import __version__

    assert httpx.get(live.url + "/api/version").json() == {"version": __version__}
    root = httpx.get(live.url + "/")
    assert root.status_code == 200 and "running" in root.text


def test_keep_alive_load_and_unload(live: LiveServer) -> None:
    client = live.ollama()
    # keep_alive 0: unloaded as soon as the request is done
    ask(client, "bye", image=False, keep_alive=0)
    assert "tiny:latest" not in live.loaded()
    assert "tiny:latest" not in {m.model for m in client.ps().models}
    # an empty request only loads the model
    r = client.generate(model="tiny", prompt="", keep_alive="1s")
    assert r.done and r.done_reason == "load" and r.response == ""
    assert "tiny:latest" in {m.model for m in client.ps().models}
    deadline = time.monotonic() + 5
    while "tiny:latest" in live.loaded() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "tiny:latest" not in live.loaded(), "the 1s keep-alive did not unload the model"
    # ... and an empty chat with keep_alive 0 unloads it
    client.chat(model="tiny", messages=[], keep_alive="-1")
    assert "tiny:latest" in live.loaded()
    r2 = client.chat(model="tiny", messages=[], keep_alive=0)
    assert r2.done_reason == "unload" and "tiny:latest" not in live.loaded()
    # and the next real request loads it again and reports the load time
    again = ask(client, "hello again", image=False)
    assert again.load_duration > 0


def test_num_ctx_reloads_the_model(live: LiveServer) -> None:
    client = live.ollama()
    ask(client, "hi", image=False, options={**GREEDY, "num_ctx": 256})
    assert {m.model: m.context_length for m in client.ps().models}["tiny:latest"] == 256
    ask(client, "hi", image=False)  # the server's default again
    assert {m.model: m.context_length for m in client.ps().models}["tiny:latest"] == 1024


# ----------------------------------------------------------------------------- OpenAI API
def openai_messages(text: str, uri: str) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": uri}},
            ],
        },
    ]


def test_openai_chat_with_a_data_uri_image(live: LiveServer) -> None:
    client = live.openai()
    kw: dict[str, Any] = {"model": "tiny", "max_tokens": 6, "temperature": 0, "seed": 3}
    r = client.chat.completions.create(messages=openai_messages("What?", data_uri(IMAGE)), **kw)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 16  # the image's positions count

    chunks = list(
        client.chat.completions.create(
            messages=openai_messages("What?", data_uri(IMAGE)),  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == (
        r.usage.completion_tokens
    )
    assert len({c.id for c in chunks}) == 1


def test_openai_models(live: LiveServer) -> None:
    client = live.openai()
    ids = {m.id for m in client.models.list()}
    assert {"tiny:latest", "tinytext:latest"} <= ids
    assert client.models.retrieve("tiny").id == "tiny:latest"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nothere")
    assert "nothere" in str(err.value)


def test_openai_json_response_format(live: LiveServer) -> None:
    r = live.openai().chat.completions.create(
        model="tinytext",
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
        max_tokens=16,
        temperature=0,
    )
    text = (r.choices[0].message.content or "").strip()
    assert text.startswith(("{", "[")) or text == ""


# ----------------------------------------------------------------------------- concurrency
def test_eight_concurrent_clients_get_the_answers_they_get_alone(live: LiveServer) -> None:
    def one(i: int) -> str:
        r = ask(live.ollama(), f"Question number {i}?", image=i % 2 == 0)
        assert r.done
        return str(r.message.content)

    alone = [one(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone


def test_requests_to_a_busy_model_are_served_in_arrival_order(live: LiveServer) -> None:
    clients = [live.ollama() for _ in range(4)]
    for c in clients:  # connected and warm before the clock starts
        ask(c, "warm up", image=False, options={"num_predict": 1})
    served: list[tuple[str, int]] = []
    lock = threading.Lock()

    def queued(i: int) -> None:
        r = ask(clients[i], f"queued {i}", image=False, options={"num_predict": 2, "seed": 1})
        with lock:  # created_at is stamped when the reply is done: the service order
            served.append((str(r.created_at), i))

    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "A long answer, please."}],
        "options": {"temperature": 0, "num_predict": 600},
    }
    threads = []
    with httpx.stream("POST", live.url + "/api/chat", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        next(lines)  # the long request holds the model now
        for i in range(4):
            t = threading.Thread(target=queued, args=(i,))
            t.start()
            threads.append(t)
            time.sleep(0.3)  # arrival order: 0, 1, 2, 3
        for _ in lines:
            pass
    for t in threads:
        t.join(30)
    assert [i for _, i in sorted(served)] == [0, 1, 2, 3]


def test_client_disconnect_mid_stream_stops_generation(live: LiveServer) -> None:
    client = live.ollama()
    ask(client, "warm up", image=False)
    entry = next(e for e in live.manager.loaded() if e.name == "tiny:latest")
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "options": {"temperature": 0, "num_predict": 900},
    }
    with httpx.stream("POST", live.url + "/api/chat", json=body, timeout=30) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        got = [json.loads(next(lines)) for _ in range(3)]
    if any(g["done"] for g in got):
        pytest.skip("the tiny model ended its reply within three tokens")
    deadline = time.monotonic() + 10
    while entry.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert entry.active == 0, "the request still holds the model after the client left"
    # it stopped early: the context holds the prompt and a few tokens, not 900
    assert entry.model.kv_tokens < 200
    after = ask(client, "Are you still there?", image=True)
    assert after.done and after.eval_count >= 1


def test_a_failing_request_does_not_take_the_server_down(live: LiveServer) -> None:
    client = live.ollama()
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(
            model="tiny",
            messages=[{"role": "user", "content": "word " * 400}],
            options={"num_ctx": 64, "num_predict": 4},
        )
    assert err.value.status_code == 400 and "context" in err.value.error
    r = client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "short"}],
        options={"num_ctx": 64, "num_predict": 4, "temperature": 0},
    )
    assert r.done
    ask(client, "and with the default context", image=True)


def test_openai_client_disconnect_then_next_request(live: LiveServer) -> None:
    client = live.openai()
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Go on and on."}],
        max_tokens=900,
        temperature=0,
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Next"}], max_tokens=3
    )
    assert r.choices[0].finish_reason in ("stop", "length")
