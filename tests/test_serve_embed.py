"""Embeddings over HTTP (``/api/embed``, ``/api/embeddings``, ``/v1/embeddings``), driven by
the official ``ollama`` and ``openai`` clients, checked against llama.cpp's own embedding
of the same text computed here with llama-cpp-python directly (``Llama(embedding=True)``,
mean pooling: the tiny fixture is a chat model, whose GGUF names no pooling).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import pytest
import uvicorn
from test_serve import LiveServer

from mmchat.runtime import LoadOptions
from mmchat.server import Limits, ModelManager, create_app
from mmchat.store import Store
from mmchat.vision.synthetic import rel_l2

N_CTX = 256
TEXTS = ["a red circle on a white background", "two blue squares, left to right", "x"]


def start(store: Store, **limits: Any) -> LiveServer:
    """A real server whose models use exact arithmetic (flash attention off, f32 KV cache)."""
    options = LoadOptions(n_ctx=N_CTX, n_threads=1, flash_attn=False, kv_cache_type="f32")
    manager = ModelManager(store=store, load_options=options, keep_alive_s=300)
    app = create_app(manager, limits=Limits(**limits))
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


@pytest.fixture(scope="module")
def model_path() -> Path:
    from support.models import converted

    return converted("llava15_hf")[0]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[LiveServer]:
    store = Store(tmp_path_factory.mktemp("serve-embed"))
    store.register("tinytext", model=model_path)
    srv = start(store, max_inputs=8)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def direct(model_path: Path) -> Any:
    """llama.cpp's own embeddings of the fixture (mean pooling, same arithmetic settings)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(model_path),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=1,
        n_gpu_layers=0,
        flash_attn=False,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        verbose=False,
    )

    def embed(text: str) -> np.ndarray:
        return np.asarray(llm.embed(text), dtype=np.float64)

    yield embed
    llm.close()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_ollama_embed_equals_llama_cpp_and_is_deterministic(live: LiveServer, direct: Any) -> None:
    client = live.ollama()
    r = client.embed(model="tinytext", input=TEXTS)
    assert r.model == "tinytext" and len(r.embeddings) == len(TEXTS)
    assert r.prompt_eval_count and r.prompt_eval_count > len(TEXTS)
    for text, got in zip(TEXTS, r.embeddings, strict=True):
        vec = np.asarray(got)
        assert vec.shape == (64,)
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-6  # normalised, as Ollama's /api/embed
        assert rel_l2(vec, unit(direct(text))) <= 1e-5
    again = client.embed(model="tinytext", input=TEXTS)
    assert again.embeddings == r.embeddings  # bit-identical on a repeat
    one = client.embed(model="tinytext", input=TEXTS[1])
    assert one.embeddings == [r.embeddings[1]]  # batching does not change a vector


def test_legacy_embeddings_are_not_normalised(live: LiveServer, direct: Any) -> None:
    r = live.ollama().embeddings(model="tinytext", prompt=TEXTS[0])
    vec = np.asarray(r.embedding)
    assert rel_l2(vec, direct(TEXTS[0])) <= 1e-5
    assert abs(np.linalg.norm(vec) - 1.0) > 1e-3


def test_dimensions_cut_and_renormalise(live: LiveServer) -> None:
    client = live.ollama()
    full = np.asarray(client.embed(model="tinytext", input=TEXTS[0]).embeddings[0])
    cut = np.asarray(client.embed(model="tinytext", input=TEXTS[0], dimensions=16).embeddings[0])
    assert cut.shape == (16,)
    assert rel_l2(cut, unit(full[:16])) <= 1e-6
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tinytext", input="x", dimensions=65)
    assert err.value.status_code == 400 and "64" in str(err.value)


def test_openai_embeddings_float_and_base64(live: LiveServer, direct: Any) -> None:
    client = live.openai()
    # the openai client asks for base64 by default and decodes it itself
    r = client.embeddings.create(model="tinytext", input=TEXTS[:2])
    assert [d.index for d in r.data] == [0, 1] and r.model == "tinytext"
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    floats = client.embeddings.create(model="tinytext", input=TEXTS[:2], encoding_format="float")
    for text, a, b in zip(TEXTS, r.data, floats.data, strict=False):
        assert np.allclose(a.embedding, b.embedding, rtol=0, atol=1e-7)
        assert rel_l2(np.asarray(b.embedding), unit(direct(text))) <= 1e-5
    short = client.embeddings.create(
        model="tinytext", input=TEXTS[0], dimensions=8, encoding_format="float"
    )
    assert len(short.data[0].embedding) == 8
    # token ids are accepted as input too
    ids = live.manager.loaded()[0].embedder.tokenize(TEXTS[0])
    by_ids = client.embeddings.create(model="tinytext", input=ids, encoding_format="float")
    assert np.allclose(by_ids.data[0].embedding, floats.data[0].embedding, atol=1e-7)


def test_truncation_and_limits(live: LiveServer) -> None:
    client = live.ollama()
    long = "word " * (N_CTX * 2)
    r = client.embed(model="tinytext", input=long)
    assert r.prompt_eval_count == N_CTX and len(r.embeddings[0]) == 64
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tinytext", input=long, truncate=False)
    assert err.value.status_code == 400 and "truncate" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tinytext", input=["a"] * 9)
    assert err.value.status_code == 400 and "at most 8" in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nosuchmodel", input="a")
    assert err.value.status_code == 404
    bad = httpx.post(live.url + "/v1/embeddings", json={"model": "tinytext", "input": [10**9]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    empty = httpx.post(live.url + "/v1/embeddings", json={"model": "tinytext", "input": []})
    assert empty.status_code == 400


def test_empty_input_only_loads_the_model(live: LiveServer) -> None:
    client = live.ollama()
    client.generate(model="tinytext", prompt="", keep_alive=0)  # unloaded
    assert "tinytext:latest" not in live.loaded()
    r = client.embed(model="tinytext", input=[])
    assert r.embeddings == [] and "tinytext:latest" in live.loaded()
    assert client.embeddings(model="tinytext", prompt="").embedding == []
