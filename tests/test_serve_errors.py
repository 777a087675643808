"""Bad input to `mmchat serve`: each refused with the right status and a JSON error body
(Ollama's ``{"error": "..."}`` on /api, OpenAI's ``{"error": {"message": ...}}`` on /v1), and
the server keeps serving afterwards."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest
from test_serve import IMAGE, IMAGES, LiveServer, ask, b64, data_uri, make_store, start_server

LIMIT = 1 << 20  # 1 MiB request bodies


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(
        make_store(tmp_path_factory.mktemp("serve-errors")),
        max_body_bytes=LIMIT,
        max_images=2,
        max_image_pixels=100_000,  # large.png (1200x700) is over, the others are under
    )
    yield srv
    srv.stop()


def ollama_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    return str(body["error"])


def openai_error(resp: httpx.Response, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body["error"], dict) and isinstance(body["error"]["message"], str), body
    assert body["error"]["type"]
    return str(body["error"]["message"])


def still_serving(live: LiveServer) -> None:
    r = ask(live.ollama(), "still there?", image=False, options={"num_predict": 2})
    assert r.done


def chat_body(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "options": {"num_predict": 2},
    }
    body.update(kw)
    return body


# ----------------------------------------------------------------------------- malformed
@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/show", "/api/pull"])
def test_malformed_json_is_400_on_the_ollama_api(live: LiveServer, path: str) -> None:
    resp = httpx.post(live.url + path, content=b'{"model": "tiny", "messages": [', timeout=10)
    assert "malformed JSON" in ollama_error(resp, 400)


def test_malformed_json_is_400_on_the_openai_api(live: LiveServer) -> None:
    resp = httpx.post(
        live.url + "/v1/chat/completions",
        content=b"{not json}",
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert "malformed JSON" in openai_error(resp, 400)
    with pytest.raises(openai.BadRequestError):
        live.openai().chat.completions.create(model="tiny", messages=[])


def test_wrong_types_are_400_naming_the_field(live: LiveServer) -> None:
    resp = httpx.post(
        live.url + "/api/chat", json=chat_body(options={"temperature": "hot"}), timeout=10
    )
    assert "options.temperature" in ollama_error(resp, 400)
    resp = httpx.post(live.url + "/api/chat", json={"messages": []}, timeout=10)
    assert "model" in ollama_error(resp, 400)
    resp = httpx.post(live.url + "/api/chat", json=chat_body(keep_alive="soon"), timeout=10)
    assert "keep_alive" in ollama_error(resp, 400)
    resp = httpx.post(
        live.url + "/api/chat",
        json=chat_body(messages=[{"role": "tool", "content": "x"}]),
        timeout=10,
    )
    msg = ollama_error(resp, 400)
    assert "messages.0.role" in msg and "'system', 'user' or 'assistant'" in msg
    resp = httpx.post(live.url + "/api/chat", json=chat_body(options={"top_p": 0}), timeout=10)
    assert "top_p" in ollama_error(resp, 400)
    resp = httpx.post(
        live.url + "/api/chat", json=chat_body(format={"$ref": "https://x.test/s"}), timeout=10
    )
    assert "$ref" in ollama_error(resp, 400)
    still_serving(live)


def test_a_curl_style_form_content_type_is_still_json(live: LiveServer) -> None:
    resp = httpx.post(
        live.url + "/api/show",
        content=b'{"model": "tiny"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert resp.status_code == 200 and "vision" in resp.json()["capabilities"]


def test_unknown_endpoint_and_method_are_json(live: LiveServer) -> None:
    assert "/api/nothing" in ollama_error(httpx.get(live.url + "/api/nothing"), 404)
    assert "not allowed" in ollama_error(httpx.get(live.url + "/api/chat"), 405)
    assert "/v1/nothing" in openai_error(httpx.get(live.url + "/v1/nothing"), 404)


# ----------------------------------------------------------------------------- unknown model
def test_unknown_model_is_404_naming_it(live: LiveServer) -> None:
    client = live.ollama()
    for call in (
        lambda: client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}]),
        lambda: client.generate(model="no-such-model", prompt="x"),
        lambda: client.show("no-such-model"),
        lambda: client.delete("no-such-model"),
    ):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and "no-such-model" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:  # the streaming path too
        msgs = [{"role": "user", "content": "x"}]
        list(client.chat(model="no-such-model", messages=msgs, stream=True))
    assert err.value.status_code == 404
    with pytest.raises(openai.NotFoundError) as oerr:
        live.openai().chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert "no-such-model" in str(oerr.value)
    resp = httpx.post(live.url + "/api/chat", json=chat_body(model="bad name!"), timeout=10)
    assert "bad name!" in ollama_error(resp, 400)


# ----------------------------------------------------------------------------- limits
def test_oversized_body_is_413(live: LiveServer) -> None:
    big = base64.b64encode(b"\0" * LIMIT).decode()
    body = chat_body(messages=[{"role": "user", "content": "x", "images": [big]}])
    resp = httpx.post(live.url + "/api/chat", json=body, timeout=30)
    assert "larger than the limit" in ollama_error(resp, 413)
    resp = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert "larger than the limit" in openai_error(resp, 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(20):
            yield b"a" * (LIMIT // 10)
        yield b'"}'

    resp = httpx.post(live.url + "/api/generate", content=chunked(), timeout=30)
    assert "larger than the limit" in ollama_error(resp, 413)
    still_serving(live)


def test_too_many_images_is_400(live: LiveServer) -> None:
    img = b64(IMAGE)
    body = chat_body(messages=[{"role": "user", "content": "x", "images": [img, img, img]}])
    resp = httpx.post(live.url + "/api/chat", json=body, timeout=10)
    assert "at most 2" in ollama_error(resp, 400)


def test_too_many_pixels_is_413(live: LiveServer) -> None:
    body = chat_body(
        messages=[{"role": "user", "content": "x", "images": [b64(IMAGES / "large.png")]}]
    )
    resp = httpx.post(live.url + "/api/chat", json=body, timeout=10)
    msg = ollama_error(resp, 413)
    assert "840,000 pixels" in msg and "image 1 of message 1" in msg
    still_serving(live)


# ----------------------------------------------------------------------------- images
def test_non_image_base64_is_400_naming_the_image(live: LiveServer) -> None:
    text = base64.b64encode(b"this is not a picture at all").decode()
    body = chat_body(
        messages=[
            {"role": "user", "content": "a", "images": [b64(IMAGE)]},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c", "images": [text]},
        ]
    )
    msg = ollama_error(httpx.post(live.url + "/api/chat", json=body, timeout=10), 400)
    assert "image 1 of message 3" in msg and "not an image" in msg
    body = chat_body(messages=[{"role": "user", "content": "a", "images": ["%%% not base64"]}])
    msg = ollama_error(httpx.post(live.url + "/api/chat", json=body, timeout=10), 400)
    assert "not valid base64" in msg
    with pytest.raises(openai.BadRequestError) as err:
        live.openai().chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + text},
                        },
                    ],
                }
            ],
        )
    assert "not an image" in str(err.value)
    still_serving(live)


def test_image_to_a_model_without_vision_is_400(live: LiveServer) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        live.ollama().chat(
            model="tinytext",
            messages=[{"role": "user", "content": "see", "images": [str(IMAGE)]}],
        )
    assert err.value.status_code == 400 and "cannot see images" in err.value.error
    with pytest.raises(openai.BadRequestError) as oerr:
        live.openai().chat.completions.create(
            model="tinytext",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}],
                }
            ],
        )
    assert "cannot see images" in str(oerr.value)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///etc/passwd", "never reads files"),
        (f"file://{IMAGE}", "never reads files"),
        ("http://127.0.0.1:1/cat.png", "does not download"),
        ("https://example.com/cat.png", "does not download"),
        (str(IMAGE), "not a data URI"),
        ("data:image/png,rawbytes", "without ';base64'"),
    ],
)
def test_image_urls_other_than_data_uris_are_refused(
    live: LiveServer, url: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.openai().chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "x"},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        )
    assert words in str(err.value)
    body = err.value.body
    assert isinstance(body, dict) and words in str(body.get("message"))


def test_a_file_path_in_ollama_images_is_never_read(live: LiveServer) -> None:
    # The ollama client would read an existing path itself; a raw request sends the text.
    for path in ("../../etc/passwd.png", "~/secret.jpg", f"file://{IMAGE}"):
        body = chat_body(messages=[{"role": "user", "content": "x", "images": [path]}])
        msg = ollama_error(httpx.post(live.url + "/api/chat", json=body, timeout=10), 400)
        assert "never reads files" in msg or "not an image" in msg, msg
    body = chat_body(messages=[{"role": "user", "content": "x", "images": [str(IMAGE)]}])
    msg = ollama_error(httpx.post(live.url + "/api/chat", json=body, timeout=10), 400)
    assert "never reads files" in msg or "not an image" in msg


def test_unsupported_content_part_and_parameters(live: LiveServer) -> None:
    client = live.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
                    ],
                }
            ],
        )
    assert "input_audio" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], n=2
        )
    resp = httpx.post(
        live.url + "/api/generate",
        json={"model": "tiny", "prompt": "x", "raw": True, "stream": False},
        timeout=10,
    )
    assert "raw" in ollama_error(resp, 400)
