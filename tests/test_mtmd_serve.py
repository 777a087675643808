"""Every mtmd family through ``mmchat serve`` with the official ``ollama`` and ``openai``
clients: images (and audio, through OpenAI's ``input_audio``), the same greedy reply as
in-process, and the KV prefix reused by a follow-up request."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from test_mtmd_families import AUDIO, SQUARE, TONE, VISION, files
from test_serve import LiveServer, start_server

from mmchat.runtime import LoadOptions, SamplingParams
from mmchat.runtime.loader import load_model
from mmchat.store import Store
from mmchat.vision import load_image
from mmchat.vision.audio import load_audio

GREEDY = {"temperature": 0, "num_predict": 6, "seed": 1}
pytestmark = pytest.mark.skipif(not (VISION or AUDIO), reason="no mtmd fixtures")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    store = Store(tmp_path_factory.mktemp("mtmd-serve"))
    for family in VISION + AUDIO:
        model, mmproj = files(family)
        store.register(family, model=model, mmproj=mmproj, params={"num_ctx": 4096})
    srv = start_server(store, max_body_bytes=4 << 20)
    yield srv
    srv.stop()


def in_process(family: str, text: str, media: Any) -> str:
    """The greedy reply of the runtime itself (same load options as the test server)."""
    with load_model(*files(family), LoadOptions(n_ctx=4096, n_threads=1)) as lm:
        done = lm.session(params=SamplingParams(temperature=0, max_tokens=6, seed=1)).ask(
            text, [media]
        )
        return done.text


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("family", VISION)
def test_ollama_chat_with_an_image(live: LiveServer, family: str) -> None:
    client = live.ollama()
    msg = {"role": "user", "content": "What is in this image?", "images": [str(SQUARE)]}
    r = client.chat(model=family, messages=[msg], options=GREEDY)
    assert r.done and r.message.role == "assistant"
    assert r.message.content == in_process(family, "What is in this image?", load_image(SQUARE))
    # a follow-up about the same image evaluates only the new tokens
    follow = [msg, {"role": "assistant", "content": r.message.content}]
    follow.append({"role": "user", "content": "Say more."})
    r2 = client.chat(model=family, messages=follow, options=GREEDY)
    assert r2.done and 0 < r2.prompt_eval_count < r.prompt_eval_count + r.eval_count + 20


@pytest.mark.parametrize("family", VISION)
def test_openai_chat_with_a_data_uri_image(live: LiveServer, family: str) -> None:
    uri = "data:image/png;base64," + b64(SQUARE)
    r = live.openai().chat.completions.create(
        model=family,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=6,
        seed=1,
    )
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage is not None and r.usage.prompt_tokens > 10


@pytest.mark.parametrize("family", AUDIO)
def test_openai_chat_with_input_audio(live: LiveServer, family: str) -> None:
    r = live.openai().chat.completions.create(
        model=family,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": b64(TONE), "format": "wav"}},
                    {"type": "text", "text": "What do you hear?"},
                ],
            }
        ],
        temperature=0,
        max_tokens=6,
        seed=1,
    )
    text = r.choices[0].message.content
    assert text == in_process(family, "What do you hear?", load_audio(TONE))


@pytest.mark.parametrize("family", AUDIO[:1])
def test_audio_that_is_not_audio_is_a_400(live: LiveServer, family: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.openai().chat.completions.create(
            model=family,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "input_audio": {"data": b64(SQUARE)}},
                        {"type": "text", "text": "Hear this."},
                    ],
                }
            ],
        )
    assert "not an audio file" in str(err.value)
    # the server is still up and the model answers the next request
    ok = live.openai().chat.completions.create(
        model=family, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert ok.choices[0].message.role == "assistant"


@pytest.mark.parametrize("family", VISION[:1])
def test_audio_to_a_vision_model_is_a_400(live: LiveServer, family: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.openai().chat.completions.create(
            model=family,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": b64(TONE)}}],
                }
            ],
        )
    assert "cannot hear audio" in str(err.value)


def test_show_reports_the_capabilities(live: LiveServer) -> None:
    client = live.ollama()
    for family in VISION:
        assert "vision" in client.show(family).capabilities
    for family in AUDIO:
        caps = client.show(family).capabilities
        assert "audio" in caps
