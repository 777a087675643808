"""``POST /v1/completions`` through the official ``openai`` client: whole and streamed, a
list of prompts, stop strings, and the refusals (echo, logprobs, token ids, suffix on a
model without fill-in-the-middle tokens). A prompt is completed as Ollama does it, through
the chat template, so the text equals ``/api/generate``'s for the same prompt.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import LiveServer, make_store, start_server

GREEDY = {"temperature": 0, "seed": 7}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    srv = start_server(make_store(tmp_path_factory.mktemp("serve-cmpl")), max_prompts=3)
    yield srv
    srv.stop()


def test_completion_equals_generate(live: LiveServer) -> None:
    client = live.openai()
    r = client.completions.create(model="tinytext", prompt="Once upon", max_tokens=6, **GREEDY)
    assert r.object == "text_completion" and r.model == "tinytext" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    gen = live.ollama().generate(
        model="tinytext", prompt="Once upon", options={**GREEDY, "num_predict": 6}
    )
    assert gen.response == r.choices[0].text


def test_streamed_completion_matches_the_whole_one(live: LiveServer) -> None:
    client = live.openai()
    whole = client.completions.create(model="tinytext", prompt="Hi", max_tokens=8, **GREEDY)
    chunks = list(
        client.completions.create(
            model="tinytext",
            prompt="Hi",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_a_list_of_prompts_gives_one_choice_each(live: LiveServer) -> None:
    client = live.openai()
    prompts = ["Hi", "Once upon"]
    r = client.completions.create(model="tinytext", prompt=prompts, max_tokens=4, **GREEDY)
    singles = [
        client.completions.create(model="tinytext", prompt=p, max_tokens=4, **GREEDY)
        for p in prompts
    ]
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(
        model="tinytext", prompt=prompts, max_tokens=4, stream=True, **GREEDY
    ):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in r.choices]


def test_stop_strings_end_the_text(live: LiveServer) -> None:
    client = live.openai()
    full = client.completions.create(model="tinytext", prompt="Hi", max_tokens=12, **GREEDY)
    text = full.choices[0].text
    cut = text[len(text) // 2 :][:2].strip() or text[-1]
    r = client.completions.create(
        model="tinytext", prompt="Hi", max_tokens=12, stop=[cut], **GREEDY
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(cut)]


def test_refusals_are_clear(live: LiveServer) -> None:
    client = live.openai()
    cases = [
        ({"echo": True}, "echo is not supported"),
        ({"logprobs": 2}, "logprobs"),
        ({"prompt": [1, 2, 3]}, "token-id prompts"),
        ({"suffix": "return x"}, "no fill-in-the-middle tokens"),
        ({"prompt": ["a", "b", "c", "d"]}, "at most 3"),
        ({"n": 2}, "n"),
    ]
    for extra, needle in cases:
        args = {"model": "tinytext", "prompt": "Hi", "max_tokens": 2, **extra}
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**args)  # type: ignore[call-overload]
        assert needle in err.value.message, (extra, err.value.message)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nosuchmodel", prompt="Hi")
    r = httpx.post(live.url + "/v1/completions", json={"model": "tinytext"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def with_fim_tokens(src: Path, dst: Path) -> Path:
    """A copy of the GGUF ``src`` whose vocabulary names three of its tokens as the
    fill-in-the-middle prefix / suffix / middle tokens (how code models' GGUFs mark them)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    writer.add_uint32("tokenizer.ggml.fim_pre_token_id", n_vocab - 3)
    writer.add_uint32("tokenizer.ggml.fim_suf_token_id", n_vocab - 2)
    writer.add_uint32("tokenizer.ggml.fim_mid_token_id", n_vocab - 1)
    for t in reader.tensors:
        writer.add_tensor(
            t.name, t.data, raw_shape=list(reversed(t.shape)), raw_dtype=t.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_suffix_fills_in_the_middle_with_the_fim_tokens(tmp_path: Path) -> None:
    from support.models import converted

    from mmchat.runtime import LoadOptions, SamplingParams
    from mmchat.runtime.loader import load_model
    from mmchat.store import Store

    model, _ = converted("llava15_hf")
    fim = with_fim_tokens(model, tmp_path / "fim.gguf")
    with load_model(fim, None, LoadOptions(n_ctx=1024, n_threads=1)) as lm:
        ids = lm.fim_prompt("def add(a, b):", "    return c")
        n = lm.n_vocab
        assert ids[-1] == n - 1 and n - 3 in ids and n - 2 in ids
        assert ids.index(n - 3) < ids.index(n - 2) < len(ids) - 1
        params = SamplingParams(temperature=0, max_tokens=8, seed=1)
        want = "".join(
            e.text
            for e in lm.session().infill("def add(a, b):", "    return c", params=params)
            if hasattr(e, "text") and not hasattr(e, "stats")
        )
    store = Store(tmp_path / "store")
    store.register("fim", model=fim)
    srv = start_server(store)
    try:
        r = srv.openai().completions.create(
            model="fim",
            prompt="def add(a, b):",
            suffix="    return c",
            max_tokens=8,
            temperature=0,
            seed=1,
        )
        assert r.choices[0].text == want
    finally:
        srv.stop()
