"""The runtime on real tiny models: parity with the transformers goldens, tokenization around
images, sampling, KV-cache prefix reuse, context overflow, cancellation, bad files.

Models are the committed fixture checkpoints converted by mmchat's converter
(``support.models.converted``) and loaded with exact arithmetic (flash attention off, f32 KV).
"""

from __future__ import annotations

import gc
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.models import converted

from mmchat.errors import UserError
from mmchat.runtime import (
    ContextTrimmed,
    Done,
    LoadedModel,
    LoadOptions,
    Message,
    SamplingParams,
    Token,
    load_model,
)
from mmchat.runtime.template import ImageSlot
from mmchat.vision.synthetic import rel_l2

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = FIXTURES / "images"
SYSTEM_V1 = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# fixtures the converter reads without torch (bakllava_orig ships a pytorch_model.bin)
PARITY_FIXTURES = ["llava15_hf", "bakllava_hf", "llava15_orig"]


def goldens(fixture: str) -> tuple[Any, dict[str, Any]]:
    arrays = np.load(FIXTURES / fixture / "goldens.npz")
    meta = json.loads((FIXTURES / fixture / "goldens.json").read_text())
    return arrays, meta


def parity_options(**kw: Any) -> LoadOptions:
    return LoadOptions.parity(n_threads=2, **kw)


_models: dict[tuple[str, bool], LoadedModel] = {}


def model_for(fixture: str, *, vision: bool = False) -> LoadedModel:
    """One loaded model per (fixture, with vision) for the whole module."""
    key = (fixture, vision)
    if key not in _models:
        text, mmproj = converted(fixture)
        _models[key] = load_model(text, mmproj if vision else None, parity_options(n_ctx=512))
    return _models[key]


@pytest.fixture(scope="module", autouse=True)
def _close_models() -> Any:
    yield
    for m in _models.values():
        m.close()
    _models.clear()


@pytest.fixture
def text_model() -> LoadedModel:
    return model_for("llava15_hf")


@pytest.fixture
def vision_model() -> LoadedModel:
    return model_for("llava15_hf", vision=True)


def image(name: str) -> Any:
    from mmchat.vision import load_image

    return load_image(IMAGES / name)


def mm_messages(prompt: str, image_input: Any) -> tuple[list[Message], str | None]:
    """A golden multimodal prompt "{system} USER: <image>\\n{text} ASSISTANT:" as messages."""
    head, _, rest = prompt.partition("USER: <image>\n")
    text = rest.removesuffix(" ASSISTANT:")
    return [Message("user", text, [image_input])], head.strip() or None


# --- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", PARITY_FIXTURES)
def test_text_logits_match_transformers(fixture: str) -> None:
    arrays, meta = goldens(fixture)
    model = model_for(fixture)
    for entry in meta["text"]:
        ids = arrays[f"{entry['key']}.ids"]
        ref = arrays[f"{entry['key']}.logits"]
        ev = model.evaluate_ids([ids])
        assert ev.logits.shape == ref.shape
        err = rel_l2(ev.logits, ref)
        assert err <= 1e-3, f"{fixture} {entry['key']}: rel L2 {err:.2e}"
        assert int(np.argmax(ev.logits)) == entry["top1"]


@pytest.mark.parametrize("fixture", PARITY_FIXTURES)
def test_image_logits_match_transformers_with_golden_embeddings(fixture: str) -> None:
    arrays, meta = goldens(fixture)
    model = model_for(fixture)
    for entry in meta["multimodal"]:
        k = entry["key"]
        embeds = arrays[entry["image_embeds"]]
        ev = model.evaluate_ids([arrays[f"{k}.ids_before"], embeds, arrays[f"{k}.ids_after"]])
        err = rel_l2(ev.logits, arrays[f"{k}.logits"])
        assert err <= 2e-3, f"{fixture} {k}: rel L2 {err:.2e}"
        assert int(np.argmax(ev.logits)) == entry["top1"]
        np.testing.assert_array_equal(ev.image_embeddings[0], embeds)


# (fixture, golden key, legacy_spaces): the original-layout template adds LLaVA's default
# system prompt when there is none, so only its prompt with that system prompt is compared.
TOKENIZATION_CASES = [
    ("llava15_hf", "mm.0", False),
    ("llava15_hf", "mm.1", False),
    ("bakllava_hf", "mm.0", False),
    ("bakllava_hf", "mm.1", False),
    ("llava15_orig", "mm.1", True),
]


@pytest.mark.parametrize(("fixture", "key", "legacy"), TOKENIZATION_CASES)
def test_image_prompt_tokenization_equals_golden_ids(fixture: str, key: str, legacy: bool) -> None:
    arrays, meta = goldens(fixture)
    entry = next(e for e in meta["multimodal"] if e["key"] == key)
    model = model_for(fixture)
    # llava-hf: the HF tokenizer (legacy=False) gives the text after <image> no "▁";
    # original LLaVA tokenized the chunk after the image on its own, with "▁".
    assert model.tokenizer.space_after_media is legacy
    messages, system = mm_messages(entry["prompt"], arrays[entry["image_embeds"]])
    assert model.render(messages, system=system) == entry["prompt"].replace(
        "<image>", "<|mmchat-image-0|>"
    )
    segments = model.prompt_segments(messages, system=system)
    assert segments == [
        arrays[f"{key}.ids_before"].tolist(),
        ImageSlot(0),
        arrays[f"{key}.ids_after"].tolist(),
    ]
    # and the whole documented path: template → tokens → injected embeddings → logits
    ev = model.evaluate(messages, system=system)
    assert rel_l2(ev.logits, arrays[f"{key}.logits"]) <= 2e-3


def test_whole_prompt_tokenization_follows_the_hf_tokenizer() -> None:
    arrays, meta = goldens("llava15_hf")
    model = model_for("llava15_hf")
    checked = 0
    for entry in meta["tokenizer"]["strings"]:
        if "<image>" in entry["text"] or entry["hf_equals_sp"]:
            hf_ids = arrays[f"{entry['key']}.hf_ids"].tolist()
            assert model.tokenize_prompt(entry["text"]) == hf_ids, entry["text"]
            checked += 1
    assert checked >= 5


def test_evaluate_encodes_images_with_the_vision_engine(vision_model: LoadedModel) -> None:
    arrays, meta = goldens("llava15_hf")
    entry = meta["multimodal"][0]
    messages, system = mm_messages(entry["prompt"], image(f"{entry['image']}.png"))
    ev = vision_model.evaluate(messages, system=system)
    assert rel_l2(ev.image_embeddings[0], arrays[entry["image_embeds"]]) <= 1e-3
    assert rel_l2(ev.logits, arrays["mm.0.logits"]) <= 2e-3


# --- sampling -------------------------------------------------------------------------------


def test_same_seed_same_reply(text_model: LoadedModel) -> None:
    def reply(seed: int | None, temperature: float = 0.8) -> str:
        params = SamplingParams(seed=seed, temperature=temperature, max_tokens=24)
        return text_model.session(params=params).ask("Tell me a story.").text

    a, b = reply(123), reply(123)
    assert a == b and a
    assert reply(124) != a
    assert reply(None, temperature=0) == reply(None, temperature=0)


def test_max_tokens(text_model: LoadedModel) -> None:
    chat = text_model.session(params=SamplingParams(seed=3, max_tokens=5))
    done = chat.ask("Hello")
    assert done.stats.generated_tokens == 5
    assert done.done_reason == "length"
    chat.set_params(max_tokens=0)
    done = chat.ask("Hello again")
    assert (done.text, done.stats.generated_tokens) == ("", 0)


def test_stop_strings(text_model: LoadedModel) -> None:
    params = SamplingParams(seed=11, temperature=1.0, max_tokens=40)
    full = text_model.session(params=params).ask("Hello").text
    assert len(full) > 12
    stop = full[6:9]
    expected = full[: full.find(stop)]
    chat = text_model.session(params=params.updated(stop=[stop]))
    events = list(chat.send("Hello"))
    streamed = "".join(e.text for e in events if isinstance(e, Token))
    done = events[-1]
    assert isinstance(done, Done)
    assert done.text == expected == streamed
    assert done.done_reason == "stop"
    assert chat.messages[-1].content == expected


def test_json_format_gives_parseable_json(text_model: LoadedModel) -> None:
    # A random tiny model writes endless strings; every reply must still follow the JSON
    # grammar, and those that finish must parse.
    finished = 0
    for seed in range(8):
        chat = text_model.session(params=SamplingParams(seed=seed, format="json", max_tokens=48))
        done = chat.ask("Answer in JSON.")
        assert done.text.startswith("{"), done.text
        if done.done_reason == "stop":
            assert isinstance(json.loads(done.text), dict)
            finished += 1
    assert finished >= 2
    # the same prompt without the grammar does not produce JSON
    free = text_model.session(params=SamplingParams(seed=4, max_tokens=48)).ask("Answer in JSON.")
    assert not free.text.startswith("{")


def test_json_schema_format(text_model: LoadedModel) -> None:
    schema = {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["count", "ok"],
    }
    params = SamplingParams(seed=0, format=schema, max_tokens=64)
    done = text_model.session(params=params).ask("Count them.")
    value = json.loads(done.text)
    assert isinstance(value["count"], int) and isinstance(value["ok"], bool)


def test_a_bad_grammar_is_a_user_error_and_changes_nothing(text_model: LoadedModel) -> None:
    chat = text_model.session(params=SamplingParams(seed=0, max_tokens=3))
    chat.ask("Hi")
    before = [m.to_dict() for m in chat.messages]
    with pytest.raises(UserError, match="not valid GBNF"):
        list(chat.send("Hello", params=SamplingParams(grammar='root ::= "unterminated')))
    assert [m.to_dict() for m in chat.messages] == before
    assert not text_model.lock.locked()
    assert isinstance(chat.ask("Still fine?"), Done)


def test_reply_to_a_history_brought_by_a_request(text_model: LoadedModel) -> None:
    # what the HTTP API does: a fresh session per request, with the request's messages
    history = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello."),
        Message("user", "How are you?"),
    ]
    chat = text_model.session(params=SamplingParams(seed=1, max_tokens=4))
    chat.messages = list(history)
    done = [e for e in chat.reply() if isinstance(e, Done)].pop()
    assert text_model.render(history) == (
        "Be brief. USER: Hi ASSISTANT: Hello.</s>USER: How are you? ASSISTANT:"
    )
    # the next request repeats the history plus one turn: only the new part is evaluated
    nxt = text_model.session(params=SamplingParams(seed=1, max_tokens=4))
    nxt.messages = [*history, Message("assistant", done.text), Message("user", "Why?")]
    stats = [e for e in nxt.reply() if isinstance(e, Done)].pop().stats
    assert stats.cached_tokens >= done.stats.prompt_tokens
    with pytest.raises(UserError, match="must end with a user message"):
        text_model.session().reply()


# --- KV-cache prefix reuse ------------------------------------------------------------------


def test_follow_up_about_an_image_costs_only_the_new_tokens(vision_model: LoadedModel) -> None:
    engine = vision_model.vision
    vision_model.reset()  # the context is shared by every session of the model
    chat = vision_model.session(params=SamplingParams(seed=0, max_tokens=0))
    first = chat.ask("What is this?", [image("portrait.png")]).stats
    assert first.images == 1 and first.images_encoded == 1
    assert first.cached_tokens == 0 and first.prompt_eval_tokens == first.prompt_tokens
    encodes = engine.encode_count
    second = chat.ask("What colour is it?").stats
    assert second.images == 1
    assert second.images_encoded == 0
    assert engine.encode_count == encodes
    # the whole first prompt (with its 16 image tokens) is reused, only the new text is run
    assert second.cached_tokens == first.prompt_tokens
    assert second.prompt_eval_tokens == second.prompt_tokens - first.prompt_tokens
    assert second.prompt_eval_tokens < 20


def test_prefix_reuse_with_real_replies(vision_model: LoadedModel) -> None:
    chat = vision_model.session(params=SamplingParams(seed=5, max_tokens=8))
    first = chat.ask("Describe it.", [image("landscape.png")]).stats
    second = chat.ask("Is it dark?").stats
    assert second.images_encoded == 0
    assert second.cached_tokens >= first.prompt_tokens
    assert second.prompt_eval_tokens <= second.prompt_tokens - first.prompt_tokens
    assert vision_model.kv_tokens == vision_model.ctx.pos_max() + 1


def test_reused_prefix_gives_the_same_logits(vision_model: LoadedModel) -> None:
    pic = image("landscape.png")
    turn1 = [Message("user", "What is this?", [pic])]
    turn2 = [*turn1, Message("assistant", "A landscape."), Message("user", "Any people?")]
    fresh = vision_model.evaluate(turn2)
    vision_model.evaluate(turn1)
    reused = vision_model.evaluate(turn2, reuse_cache=True)
    run = vision_model.last_run
    assert run is not None and run.images_encoded == 0
    assert run.cached > 16 and run.evaluated < run.prompt_tokens - 16
    assert rel_l2(reused.logits, fresh.logits) <= 1e-5


# --- context overflow -----------------------------------------------------------------------


def test_context_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt() -> None:
    text, _ = converted("llava15_hf")
    with load_model(text, None, parity_options(n_ctx=256)) as model:
        assert model.n_ctx == 256
        chat = model.session(system="You are terse.", params=SamplingParams(seed=1, max_tokens=8))
        question = "Please tell me about the small robot and the river boats today."
        trimmed: list[ContextTrimmed] = []
        for _ in range(8):
            events = list(chat.send(question))
            trimmed += [e for e in events if isinstance(e, ContextTrimmed)]
            assert isinstance(events[-1], Done)
            assert events[-1].stats.prompt_tokens + 8 <= model.n_ctx
        assert trimmed, "the conversation never overflowed"
        assert trimmed[0].dropped_messages == 2
        assert "dropped the oldest 2 messages" in trimmed[0].message
        assert len(chat.messages) == 16  # the history keeps everything...
        assert chat.window_start > 0  # ...the model sees the newest turns
        prompt = model.render(chat.visible_messages, system=chat.system)
        assert prompt.startswith("You are terse. USER: ")

        # an image that alone does not fit: clear error, nothing added, session alive
        n = len(chat.messages)
        big = np.zeros((300, model.n_embd), dtype=np.float32)
        with pytest.raises(UserError, match="image needs 300 tokens"):
            list(chat.send("What is this?", [big]))
        assert len(chat.messages) == n
        assert isinstance(chat.ask("Still there?"), Done)


# --- cancellation ---------------------------------------------------------------------------


def test_stopping_the_stream_keeps_a_usable_session(text_model: LoadedModel) -> None:
    chat = text_model.session(params=SamplingParams(seed=2, max_tokens=40))
    stream = chat.send("Write a long story.")
    shown = ""
    for event in stream:
        if isinstance(event, Token):
            shown += event.text
            if len(shown) >= 5:
                break
    stream.close()  # what a REPL does on Ctrl-C, or a server on disconnect
    assert not text_model.lock.locked()
    last = chat.messages[-1]
    assert (last.role, last.content, last.interrupted) == ("assistant", shown, True)
    assert chat.last_stats is not None and chat.last_stats.done_reason == "cancelled"
    assert text_model.kv_tokens == text_model.ctx.pos_max() + 1

    done = chat.ask("Go on.")
    assert done.stats.cached_tokens > 0
    assert [m.role for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    stream = chat.send("One more.")
    for event in stream:
        if isinstance(event, Done):
            break
    assert not text_model.lock.locked()  # released before Done, although not closed

    # a consumer that stops at Done but keeps the stream object does not hold the model
    kept = chat.send("Short.")
    assert isinstance([e for e in kept if isinstance(e, Done)].pop(), Done)
    assert not text_model.lock.locked()

    # KeyboardInterrupt raised inside the generator (Ctrl-C while it runs)
    stream = chat.send("Again.")
    next(stream)
    with pytest.raises(KeyboardInterrupt):
        stream.throw(KeyboardInterrupt)
    assert chat.messages[-1].interrupted
    assert not text_model.lock.locked()
    assert isinstance(chat.ask("Fine."), Done)


def test_requests_are_served_one_at_a_time(text_model: LoadedModel) -> None:
    def run(seed: int) -> str:
        params = SamplingParams(seed=seed, max_tokens=12)
        return text_model.session(params=params).ask(f"Question {seed}").text

    expected = {seed: run(seed) for seed in range(4)}
    results: dict[int, str] = {}
    threads = [
        threading.Thread(target=lambda s=seed: results.__setitem__(s, run(s))) for seed in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


# --- history as plain data ------------------------------------------------------------------


def test_export_and_load_a_conversation(vision_model: LoadedModel, tmp_path: Path) -> None:
    src = tmp_path / "pic.png"
    shutil.copy(IMAGES / "landscape.png", src)
    chat = vision_model.session(system="Sys", params=SamplingParams(seed=9, max_tokens=6))
    chat.ask("What is this?", [image(str(src))])
    data = json.loads(json.dumps(chat.export()))
    assert data["messages"][0]["images"][0]["source"] == str(src)

    again = vision_model.session()
    again.load(data)
    assert again.system == "Sys"
    assert [(m.role, m.content) for m in again.messages] == [
        (m.role, m.content) for m in chat.messages
    ]
    assert again.messages[0].images[0].digest == chat.messages[0].images[0].digest
    follow = again.ask("And now?").stats
    assert follow.images_encoded == 0 and follow.cached_tokens > 16

    src.write_bytes((IMAGES / "portrait.png").read_bytes())
    with pytest.raises(UserError, match="has changed"):
        vision_model.session().load(data)


# --- bad files ------------------------------------------------------------------------------


def test_corrupt_and_mismatched_files_are_user_errors(tmp_path: Path) -> None:
    text, mmproj = converted("llava15_hf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(text.read_bytes()[: text.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated|damaged"):
        load_model(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all" * 100)
    with pytest.raises(UserError, match="not a GGUF"):
        load_model(garbage)
    with pytest.raises(UserError, match="No such file"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(UserError, match="projector"):
        load_model(mmproj)  # an mmproj given as the model
    with pytest.raises(UserError, match="not a projector"):
        load_model(text, text)  # a text model given as the mmproj
    _, other_mmproj = converted("bakllava_hf")  # projects to 256, llava15_hf is 64 wide
    with pytest.raises(UserError, match="belong"):
        load_model(text, other_mmproj)
    with pytest.raises(UserError, match="cannot see images"):
        list(model_for("llava15_hf").session().send("hi", [image("pixel.png")]))


def test_close_is_idempotent_and_unreferenced_models_are_freed() -> None:
    text, _ = converted("llava15_hf")
    model = load_model(text, None, parity_options(n_ctx=256))
    model.close()
    model.close()
    assert model.closed
    with pytest.raises(RuntimeError, match="closed"):
        model.evaluate_ids([[1, 2, 3]])
    dropped = load_model(text, None, parity_options(n_ctx=256))
    del dropped
    gc.collect()


def test_original_llava_spaces_after_the_image_but_not_after_eos() -> None:
    """Original LLaVA tokenizes chunk by chunk around the image (so "▁" starts the text after
    it) with its legacy=false slow tokenizer (no "▁" after </s> inside a chunk): two rules,
    written by the converter as mmchat.tokenizer.space_after_image / legacy_spaces."""
    model = model_for("llava15_orig")
    hf = model_for("llava15_hf")
    rows = np.zeros((4, model.n_embd), np.float32)
    msgs = [
        Message("user", "What is it?", [rows]),
        Message("assistant", "A red circle."),
        Message("user", "And the colour?"),
    ]
    after_image = model.prompt_segments(msgs)[2]
    hf_after = hf.prompt_segments(msgs)[2]
    assert model.detokenize(after_image[:1]) == " "  # "▁" then "\n"
    assert after_image[1:] == hf_after  # the rest, after </s> included, as legacy=false
    eos = hf_after.index(model.text.eos)
    assert model.detokenize([hf_after[eos + 1]]) == "US"
