"""Runtime pieces that need no model: chat templates, streamed text, the FIFO lock, options."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mmchat.errors import UserError
from mmchat.runtime.events import Stats
from mmchat.runtime.lock import FairLock
from mmchat.runtime.options import SamplingParams
from mmchat.runtime.streaming import ReplyText, holdback
from mmchat.runtime.template import (
    KNOWN_FORMATS,
    ChatTemplate,
    ImageSlot,
    TemplateError,
    TemplateMessage,
    guess_format,
    select_template,
)

FIXTURES = Path(__file__).parent / "fixtures"


def hf_template() -> str:
    """The llava-hf fixture's chat template (typed content parts, writes its own <image>)."""
    data = json.loads((FIXTURES / "llava15_hf" / "chat_template.json").read_text())
    return str(data["chat_template"])


def builtin(name: str) -> ChatTemplate:
    fmt = next(f for f in KNOWN_FORMATS if f.name == name)
    return ChatTemplate.from_format(fmt, bos_token="<s>", eos_token="</s>")


# --- templates ------------------------------------------------------------------------------


def test_builtin_llava_format_places_image_first_with_newline_and_system_before() -> None:
    t = builtin("llava-1.5")
    msgs = [
        TemplateMessage("system", "Be brief."),
        TemplateMessage("user", "What is this?", n_images=1),
        TemplateMessage("assistant", "A cat."),
        TemplateMessage("user", "And this?", n_images=1),
    ]
    pieces = t.render(msgs)
    assert pieces == [
        "Be brief. USER: ",
        ImageSlot(0),
        "\nWhat is this? ASSISTANT: A cat.</s>USER: ",
        ImageSlot(1),
        "\nAnd this? ASSISTANT:",
    ]
    assert t.parts_style is False


def test_parts_style_template_writes_its_own_image_token() -> None:
    t = ChatTemplate(source=hf_template(), name="gguf", bos_token="<s>", eos_token="</s>")
    assert t.parts_style
    msgs = [
        TemplateMessage("system", "Sys."),
        TemplateMessage("user", "Two pictures", n_images=2),
    ]
    assert t.render(msgs) == [
        "Sys. USER: ",
        ImageSlot(0),
        "\n",
        ImageSlot(1),
        "\nTwo pictures ASSISTANT:",
    ]
    # without the generation prompt (e.g. to show a saved conversation)
    assert t.render_text(msgs[:1], add_generation_prompt=False) == "Sys. "


def test_user_text_containing_the_image_token_does_not_make_an_image_slot() -> None:
    t = ChatTemplate(source=hf_template(), name="gguf", bos_token="<s>", eos_token="</s>")
    pieces = t.render([TemplateMessage("user", "what does <image> mean?", n_images=1)])
    assert [p for p in pieces if isinstance(p, ImageSlot)] == [ImageSlot(0)]
    assert "what does <image> mean?" in "".join(p for p in pieces if isinstance(p, str))


def test_system_prompt_as_string_when_the_template_needs_it() -> None:
    # a parts-style template that concatenates the system content as a string
    source = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n' }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    )
    t = ChatTemplate(source=source, name="x")
    pieces = t.render([TemplateMessage("system", "S"), TemplateMessage("user", "Q", n_images=1)])
    assert pieces == ["S\n", ImageSlot(0), "Q"]


def test_template_errors_are_user_errors() -> None:
    t = ChatTemplate(source="{{ raise_exception('only user and assistant roles') }}", name="x")
    with pytest.raises(TemplateError, match="only user and assistant roles"):
        t.render([TemplateMessage("user", "hi")])
    with pytest.raises(TemplateError, match="not valid Jinja"):
        ChatTemplate(source="{% if %}", name="bad")
    # a template that forgets images
    t = ChatTemplate(source="{% for m in messages %}{{ m.content }}{% endfor %}", name="x")
    assert t.render([TemplateMessage("user", "hi", n_images=1)])  # string style: marker kept
    t = ChatTemplate(
        source="{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }}"
        "{% endfor %}{% endfor %}",
        name="forgetful",
    )
    with pytest.raises(TemplateError, match="placed 0 image"):
        t.render([TemplateMessage("user", "hi", n_images=1)])
    assert issubclass(TemplateError, UserError)


def test_sandbox_and_transformers_extensions() -> None:
    t = ChatTemplate(
        source="{% for m in messages %}{% generation %}{{ m.content | tojson }}"
        "{% endgeneration %}{% endfor %}{{ ''.__class__.__mro__ }}",
        name="x",
    )
    with pytest.raises(TemplateError):  # the sandbox refuses attribute games
        t.render([TemplateMessage("user", "é")])
    t = ChatTemplate(
        source="{% for m in messages %}{% generation %}{{ m.content | tojson }}"
        "{% endgeneration %}{% endfor %}",
        name="x",
    )
    assert t.render_text([TemplateMessage("user", "é")]) == '"é"'


def test_template_selection_order() -> None:
    gguf = "{% for m in messages %}{{ m.content }}{% endfor %}"
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    t = select_template(explicit="llava-1.6-mistral", gguf_template=gguf, model_names=[], **kw)
    assert (t.name, t.origin) == ("llava-1.6-mistral", "builtin")
    t = select_template(explicit="{{ 'x' }}", gguf_template=gguf, model_names=[], **kw)
    assert (t.name, t.origin) == ("custom", "explicit")
    t = select_template(explicit=None, gguf_template=gguf, model_names=["bakllava"], **kw)
    assert t.origin == "gguf"
    t = select_template(explicit=None, gguf_template=None, model_names=["BakLLaVA-1"], **kw)
    assert t.name == "bakllava"
    assert guess_format("something else").name == "llava-1.5"
    assert guess_format(None, "llava-v1.6-mistral-7b").name == "llava-1.6-mistral"


def test_mistral_format() -> None:
    t = builtin("llava-1.6-mistral")
    text = t.render_text(
        [
            TemplateMessage("system", "Sys"),
            TemplateMessage("user", "Q1", n_images=1),
            TemplateMessage("assistant", "A1"),
            TemplateMessage("user", "Q2"),
        ]
    )
    assert text == "<s>[INST] Sys\n\n<|mmchat-image-0|>\nQ1 [/INST] A1</s>[INST] Q2 [/INST]"


# --- streamed text --------------------------------------------------------------------------


def test_reply_text_waits_for_whole_utf8_characters() -> None:
    r = ReplyText()
    data = "café 🙂".encode()
    shown = [r.feed(data[i : i + 1]) for i in range(len(data))]
    shown.append(r.finish())
    assert "".join(shown) == "café 🙂"
    assert all("\ufffd" not in s for s in shown)
    assert r.text == "café 🙂"


def test_reply_text_drops_leading_whitespace_and_flushes_invalid_bytes() -> None:
    r = ReplyText()
    assert r.feed(b" ") == ""
    assert r.feed(b"\n") == ""
    assert r.feed(b" Hi") == "Hi"
    assert r.feed(b"\xe2\x82") == ""  # an incomplete character...
    assert r.finish() == "\ufffd"  # ...that never completes


def test_reply_text_stop_strings_are_held_back_and_cut() -> None:
    r = ReplyText(["</answer>", "STOP"])
    out = [r.feed(b"The answer"), r.feed(b" is 4</"), r.feed(b"ans"), r.feed(b"wer> more")]
    assert r.stopped
    assert "".join(out) == "The answer is 4"
    assert r.text == "The answer is 4"
    assert out[1] == " is 4"  # "</" held back until it is decided
    # a false alarm is released
    r = ReplyText(["STOP"])
    assert r.feed(b"ST") == ""
    assert r.feed(b"ART") == "START"
    assert r.finish() == ""
    assert holdback("abcST", ["STOP"]) == 2


# --- lock, params, stats --------------------------------------------------------------------


def test_fair_lock_serves_waiters_in_arrival_order() -> None:
    lock = FairLock()
    order: list[int] = []
    lock.acquire()

    def worker(i: int) -> None:
        with lock:
            order.append(i)

    threads = []
    for i in range(5):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        while lock.waiting < i + 1:  # make sure they queue in order
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()
    assert lock.acquire(timeout=0.01)
    assert not lock.acquire(blocking=False)
    assert not lock.acquire(timeout=0.01)
    lock.release()


def test_sampling_params_validation_and_ollama_options() -> None:
    p = SamplingParams().with_ollama_options(
        {"temperature": 0, "num_predict": -1, "stop": "###", "seed": 7, "num_ctx": 99}
    )
    assert (p.temperature, p.max_tokens, p.stop, p.seed) == (0, None, ["###"], 7)
    assert p.greedy
    assert SamplingParams().with_ollama_options({"num_predict": 12}).max_tokens == 12
    with pytest.raises(UserError, match="top_p"):
        SamplingParams(top_p=0).validate()
    with pytest.raises(UserError, match="unknown sampling parameter"):
        SamplingParams().updated(temprature=1)
    with pytest.raises(UserError, match="format"):
        SamplingParams().updated(format="xml")


def test_stats_in_ollama_units() -> None:
    s = Stats(
        prompt_tokens=30,
        prompt_eval_tokens=10,
        cached_tokens=20,
        prompt_eval_ms=2.5,
        generated_tokens=4,
        eval_ms=8.0,
        image_encode_ms=1.0,
        load_ms=100.0,
        total_ms=12.0,
    )
    o = s.ollama()
    assert o == {
        "total_duration": 112_000_000,
        "load_duration": 100_000_000,
        "prompt_eval_count": 10,
        "prompt_eval_duration": 3_500_000,
        "eval_count": 4,
        "eval_duration": 8_000_000,
    }
    assert s.ollama(include_load=False)["load_duration"] == 0
    assert s.eval_tokens_per_s == pytest.approx(500.0)
    assert s.prompt_tokens_per_s == pytest.approx(4000.0)
