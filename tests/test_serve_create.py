"""Model files over HTTP: ``/api/blobs`` (upload verified by digest), ``/api/create`` (from
uploaded GGUF blobs or an existing model; template, system, parameters, quantize) and
``/api/copy``, driven by the official ``ollama`` client as a user would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from test_serve import GREEDY, LiveServer, start_server

from mmchat.store import Store

JINJA = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def files() -> tuple[Path, Path]:
    from support.models import converted

    return converted("llava15_hf")


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, files: tuple[Path, Path]
) -> Iterator[LiveServer]:
    store = Store(tmp_path_factory.mktemp("serve-create"))
    store.register("tinytext", model=files[0])
    srv = start_server(store, max_blob_bytes=64 << 20)
    yield srv
    srv.stop()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(store: Store) -> list[str]:
    return [p.name for p in store.blobs_dir.iterdir() if p.name.startswith(".")]


def test_blob_upload_head_and_create_from_files(live: LiveServer, files: tuple[Path, Path]) -> None:
    client = live.ollama()
    model, mmproj = files
    d_model = client.create_blob(model)
    d_proj = client.create_blob(mmproj)
    assert d_model == sha(model.read_bytes())
    assert httpx.head(f"{live.url}/api/blobs/{d_model}").status_code == 200
    # uploading it again: already there
    again = httpx.post(f"{live.url}/api/blobs/{d_model}", content=model.read_bytes())
    assert again.status_code == 200
    events = list(
        client.create(
            model="made:v1",
            files={"text.gguf": d_model, "mmproj.gguf": d_proj},
            template=JINJA,
            system="You are terse.",
            parameters={"temperature": 0.25, "stop": ["user:", "###"]},
            license="MIT",
            stream=True,
        )
    )
    statuses = [e.status for e in events]
    assert statuses[0] == "parsing GGUF" and statuses[-1] == "success"
    assert f"using existing layer {d_model}" in statuses and "writing manifest" in statuses
    rec = live.store.resolve("made:v1")
    assert rec.template == JINJA and rec.system == "You are terse." and rec.license == "MIT"
    assert rec.params == {"temperature": 0.25, "stop": ["user:", "###"]}
    assert rec.capabilities == ["vision"] and rec.parts["model"]["filename"] == "text.gguf"
    shown = client.show("made:v1")
    assert shown.template == JINJA and 'SYSTEM """You are terse."""' in (shown.modelfile or "")
    raw = httpx.post(f"{live.url}/api/show", json={"model": "made:v1"}).json()
    assert raw["system"] == "You are terse."
    assert shown.capabilities == ["completion", "vision"]
    # the stored system prompt is used when a request has none
    # (keep_alive 0: each request starts from an empty context, so it counts every token)
    reply = client.generate(model="made:v1", prompt="hi", options=GREEDY, keep_alive=0)
    explicit = client.generate(
        model="made:v1", prompt="hi", system="You are terse.", options=GREEDY, keep_alive=0
    )
    other = client.generate(
        model="made:v1", prompt="hi", system="Say more, please.", options=GREEDY, keep_alive=0
    )
    assert reply.prompt_eval_count == explicit.prompt_eval_count != other.prompt_eval_count
    assert reply.response == explicit.response


def test_corrupted_blob_upload_is_rejected_and_nothing_is_kept(
    live: LiveServer, files: tuple[Path, Path]
) -> None:
    data = files[1].read_bytes()
    digest = sha(data + b"not the same")  # the file a client meant to send ...
    damaged = bytearray(data + b"not the same")
    damaged[len(damaged) // 2] ^= 0xFF  # ... with one byte flipped on the way
    r = httpx.post(f"{live.url}/api/blobs/{digest}", content=bytes(damaged))
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert httpx.head(f"{live.url}/api/blobs/{digest}").status_code == 404
    assert not live.store.has_blob(digest) and leftovers(live.store) == []
    # malformed digests and a create that names a missing blob
    bad = httpx.post(f"{live.url}/api/blobs/sha256:xyz", content=b"a")
    assert bad.status_code == 400 and "sha256:<64 hex digits>" in bad.json()["error"]
    assert httpx.head(f"{live.url}/api/blobs/md5:00").status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        live.ollama().create(model="broken", files={"m.gguf": digest})
    assert err.value.status_code == 400 and "upload it first" in str(err.value)
    assert not live.store.exists("broken")


def test_oversized_upload_is_refused(tmp_path: Path) -> None:
    srv = start_server(Store(tmp_path), max_blob_bytes=1000)
    try:
        # far more than the socket buffers hold: the answer still arrives (the rest is read)
        data = b"x" * (32 << 20)
        r = httpx.post(f"{srv.url}/api/blobs/{sha(data)}", content=data, timeout=60)
        assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            for _ in range(5):
                yield b"y" * 1000

        r = httpx.post(f"{srv.url}/api/blobs/{sha(b'y' * 5000)}", content=chunks())
        assert r.status_code == 413
        assert leftovers(srv.store) == [] and not list(srv.store.blobs_dir.glob("sha256-*"))
    finally:
        srv.stop()


def test_create_errors_are_clear(live: LiveServer, files: tuple[Path, Path]) -> None:
    client = live.ollama()
    text = b"not a gguf file at all"
    d_text = sha(text)
    assert httpx.post(f"{live.url}/api/blobs/{d_text}", content=text).status_code == 201
    d_model = client.create_blob(files[0])
    cases = [
        ({"files": {"notes.gguf": d_text}}, "not a GGUF file"),
        ({"files": {"w.safetensors": d_model}}, "mmchat convert"),
        ({"files": {"../x.gguf": d_model}}, "plain file name"),
        ({"files": {"a.gguf": d_model, "b.gguf": d_model}}, None),
        ({"from_": "tinytext", "template": "{{ .Prompt }}"}, "Go template"),
        ({"from_": "tinytext", "adapters": {"a.gguf": d_model}}, "LoRA"),
        ({"from_": "tinytext", "parameters": {"nosuch": 1}}, "Unknown parameter"),
        ({"from_": "tinytext", "quantize": "q9_z"}, "unknown quantization"),
        ({}, "neither"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ollama.ResponseError) as err:
            client.create(model="bad", **kwargs)  # type: ignore[arg-type]
        assert err.value.status_code == 400, (kwargs, err.value)
        if needle:
            assert needle in str(err.value), (kwargs, str(err.value))
    # the server's own paths never show up in a message
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="bad", files={"notes.gguf": d_text})
    assert str(live.store.root) not in str(err.value)
    with pytest.raises(ollama.ResponseError) as err:
        client.create(model="bad", from_="nosuchmodel")
    assert err.value.status_code == 404
    assert not live.store.exists("bad")


def test_create_from_a_model_and_copy(live: LiveServer) -> None:
    client = live.ollama()
    r = client.create(model="derived", from_="tinytext", parameters={"num_ctx": 512})
    assert r.status == "success"
    rec = live.store.resolve("derived")
    base = live.store.resolve("tinytext")
    assert rec.parts == base.parts and rec.params == {"num_ctx": 512}
    client.generate(model="derived", prompt="hi", options=GREEDY)
    assert {m.model: m.context_length for m in client.ps().models}["derived:latest"] == 512
    client.copy("derived", "derived-copy:2")
    names = {m.model for m in client.list().models}
    assert {"derived:latest", "derived-copy:2"} <= names
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nosuchmodel", "x")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("derived", "../escape")
    assert err.value.status_code == 400


def test_create_with_quantize(live: LiveServer) -> None:
    client = live.ollama()
    events = list(client.create(model="tiny-q8", from_="tinytext", quantize="q8_0", stream=True))
    statuses = [e.status for e in events]
    assert "quantizing F32 model to Q8_0" in statuses and statuses[-1] == "success"
    quant = [e for e in events if e.status and e.status.startswith("quantizing")]
    assert quant[-1].completed == quant[-1].total and quant[-1].total
    rec = live.store.resolve("tiny-q8")
    assert rec.quant == "Q8_0"
    assert rec.parts["model"]["digest"] != live.store.resolve("tinytext").parts["model"]["digest"]
    assert client.generate(model="tiny-q8", prompt="hi", options=GREEDY).done
    with pytest.raises(ollama.ResponseError) as err:  # quantizing twice is refused
        client.create(model="tiny-q4", from_="tiny-q8", quantize="q4_0")
    assert err.value.status_code == 400 and "already quantized" in str(err.value)
    assert leftovers(live.store) == []


def test_a_multi_megabyte_upload_is_stored_byte_for_byte(live: LiveServer) -> None:
    import os

    data = os.urandom(9 * 1024 * 1024 + 17)  # several write pieces, the last one partial
    digest = sha(data)
    r = httpx.post(f"{live.url}/api/blobs/{digest}", content=data, timeout=60)
    assert r.status_code == 201
    assert live.store.blob_path(digest).read_bytes() == data
    assert leftovers(live.store) == []
    again = httpx.post(f"{live.url}/api/blobs/{digest}", content=data * 3, timeout=60)
    assert again.status_code == 200  # already there: the body is read and dropped


def test_stale_upload_temporaries_are_swept_at_start(tmp_path: Path) -> None:
    import os
    import time

    store = Store(tmp_path)
    store.blobs_dir.mkdir(parents=True)
    old = store.blobs_dir / ".upload-123-dead"
    fresh = store.blobs_dir / ".upload-456-live"
    blob = store.blobs_dir / ("sha256-" + "0" * 64)
    for p in (old, fresh, blob):
        p.write_bytes(b"partial")
    day_ago = time.time() - 2 * 86400
    os.utime(old, (day_ago, day_ago))
    os.utime(blob, (day_ago, day_ago))
    srv = start_server(store)
    try:
        assert not old.exists() and fresh.exists() and blob.exists()
    finally:
        srv.stop()


def test_mmchat_run_uses_the_stored_system_prompt(
    live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model created with a system prompt (``/api/create``'s ``system``) gets it in
    ``mmchat run`` too, unless ``--system`` says otherwise."""
    from mmchat.repl.loader import resolve_model

    client = live.ollama()
    assert client.create(model="pirate", from_="tinytext", system="Talk like a pirate.").status
    monkeypatch.setenv("MMCHAT_HOME", str(live.store.home))
    source = resolve_model("pirate", pull=False)
    assert source.system == "Talk like a pirate."
