"""The chat logic (``mmchat.repl.chat`` and the slash commands) on a real tiny model.

Replies are gibberish (random weights) but real: the tests check what the user sees (attach
messages, errors, command output) and the counters (encodes, cached tokens), not content.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from support.models import FIXTURES, converted

from mmchat.repl.chat import Chat, Outcome
from mmchat.repl.render import MarkdownStream, PlainStream, WordWrapper, make_stream

IMAGES = FIXTURES / "images"


@pytest.fixture(scope="module")
def files() -> tuple[Path, Path]:
    return converted("llava15_hf")


@pytest.fixture(scope="module")
def model(files: tuple[Path, Path]) -> Iterator[object]:
    from mmchat.runtime import LoadOptions, load_model

    m = load_model(files[0], files[1], LoadOptions(n_ctx=1024, n_threads=2, n_gpu_layers=0))
    yield m
    m.close()


@pytest.fixture(scope="module")
def text_model(files: tuple[Path, Path]) -> Iterator[object]:
    from mmchat.runtime import LoadOptions, load_model

    m = load_model(files[0], None, LoadOptions(n_ctx=512, n_threads=2, n_gpu_layers=0))
    yield m
    m.close()


class Screen:
    """Two string consoles standing for the terminal (stdout and stderr)."""

    def __init__(self) -> None:
        self.out = Console(file=io.StringIO(), width=100, color_system=None)
        self.err = Console(file=io.StringIO(), width=100, color_system=None)

    @property
    def text(self) -> str:
        return self.out.file.getvalue()  # type: ignore[attr-defined]

    @property
    def errors(self) -> str:
        return self.err.file.getvalue()  # type: ignore[attr-defined]

    def clear(self) -> None:
        for c in (self.out, self.err):
            c.file.seek(0)
            c.file.truncate()


@pytest.fixture
def screen() -> Screen:
    return Screen()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A current folder holding smile.png (64×40) and tall.png (40×64)."""
    shutil.copy(IMAGES / "landscape.png", tmp_path / "smile.png")
    shutil.copy(IMAGES / "portrait.png", tmp_path / "tall.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def make_chat(model: object, screen: Screen, **kw: object) -> Chat:
    from mmchat.runtime import SamplingParams

    session = model.session(params=SamplingParams(seed=3, max_tokens=6))  # type: ignore[attr-defined]
    return Chat(model=model, session=session, out=screen.out, err=screen.err, **kw)  # type: ignore[arg-type]


# --- images inline ------------------------------------------------------------------------


def test_inline_image_is_attached_and_the_path_not_sent(
    model: object, screen: Screen, workdir: Path
) -> None:
    chat = make_chat(model, screen)
    tokens = model.vision.tokens_for(chat.load_image("smile.png", "smile.png"))  # type: ignore[attr-defined]
    assert chat.handle("What's in this image? ./smile.png") is Outcome.OK
    assert f"Added image './smile.png' (64×40, {tokens} tokens)" in screen.text
    user = chat.session.messages[0]
    assert user.content == "What's in this image?"
    assert len(user.images) == 1
    assert Path(user.images[0].source) == workdir / "smile.png"
    assert chat.session.messages[1].role == "assistant"
    assert chat.session.last_stats.images_encoded == 1  # type: ignore[union-attr]


def test_second_question_about_the_same_image_does_not_encode_it_again(
    model: object, screen: Screen, workdir: Path
) -> None:
    chat = make_chat(model, screen)
    vision = model.vision  # type: ignore[attr-defined]
    # a picture this test alone uses, so no earlier test has it cached
    shutil.copy(IMAGES / "rgba.png", workdir / "fresh.png")
    before = vision.encode_count
    assert chat.handle("Describe fresh.png") is Outcome.OK
    first = chat.session.last_stats
    assert first.images_encoded == 1  # type: ignore[union-attr]
    assert vision.encode_count == before + 1
    assert chat.handle("What colour is it?") is Outcome.OK
    second = chat.session.last_stats
    assert second.images_encoded == 0  # type: ignore[union-attr]
    assert vision.encode_count == before + 1
    # the image and the first turn come from the KV cache: only new tokens are evaluated
    assert second.cached_tokens >= first.prompt_tokens - 1  # type: ignore[union-attr]
    assert second.prompt_eval_tokens < first.prompt_tokens  # type: ignore[union-attr]


def test_several_images_in_one_message(model: object, screen: Screen, workdir: Path) -> None:
    chat = make_chat(model, screen)
    assert chat.handle("compare smile.png and 'tall.png'") is Outcome.OK
    assert "Added image 'smile.png' (64×40" in screen.text
    assert "Added image 'tall.png' (40×64" in screen.text
    assert chat.session.messages[0].content == "compare and"
    assert len(chat.session.messages[0].images) == 2


def test_drag_and_drop_path(model: object, screen: Screen, workdir: Path) -> None:
    shutil.copy(IMAGES / "landscape.png", workdir / "my photo (1).png")
    chat = make_chat(model, screen)
    assert (
        chat.handle(r"what is this " + str(workdir).replace(" ", "\\ ") + r"/my\ photo\ \(1\).png")
        is Outcome.OK
    )
    assert "Added image '" in screen.text and "my photo (1).png' (64×40" in screen.text


def test_word_ending_in_png_that_is_no_file_is_not_sent(
    model: object, screen: Screen, workdir: Path
) -> None:
    chat = make_chat(model, screen)
    assert chat.handle("I like image.png files") is Outcome.KEEP
    assert "No such file: image.png" in screen.errors
    assert chat.session.messages == []


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("notes.png", b"hello, I am text\n", "not an image"),
        ("empty.png", b"", "empty"),
        ("cut.png", (IMAGES / "large.png").read_bytes()[:3000], "truncated"),
    ],
    ids=["non-image", "empty", "truncated"],
)
def test_bad_image_files(
    model: object, screen: Screen, workdir: Path, name: str, content: bytes, expected: str
) -> None:
    (workdir / name).write_bytes(content)
    chat = make_chat(model, screen)
    assert chat.handle(f"what is {name}") is Outcome.KEEP
    lines = [ln for ln in screen.errors.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1
    assert expected in lines[0] and name in lines[0]
    assert str(workdir) not in lines[0]  # named as typed
    assert chat.session.messages == []
    # the session is alive
    assert chat.handle("hello") is Outcome.OK
    assert len(chat.session.messages) == 2


def test_too_many_pixels(
    model: object, screen: Screen, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(IMAGES / "large.png", workdir / "big.png")
    monkeypatch.setenv("MMCHAT_MAX_IMAGE_PIXELS", "100000")
    chat = make_chat(model, screen)  # max_image_pixels=None: the environment's limit
    assert chat.handle("what is big.png") is Outcome.KEEP
    assert "MMCHAT_MAX_IMAGE_PIXELS" in screen.errors and "big.png" in screen.errors
    assert chat.session.messages == []
    chat = make_chat(model, screen, max_image_pixels=2_000_000)
    assert chat.handle("what is big.png") is Outcome.OK


def test_model_without_vision(text_model: object, screen: Screen, workdir: Path) -> None:
    chat = make_chat(text_model, screen)
    assert chat.handle("what is smile.png") is Outcome.KEEP
    assert "this model cannot see images" in screen.errors
    assert chat.session.messages == []
    assert chat.handle("/image smile.png") is Outcome.KEEP
    assert chat.handle("hello there") is Outcome.OK


def test_image_only_message_waits_for_the_question(
    model: object, screen: Screen, workdir: Path
) -> None:
    chat = make_chat(model, screen)
    assert chat.handle("./smile.png") is Outcome.OK
    assert chat.session.messages == []
    assert "Added image './smile.png'" in screen.text
    assert chat.handle("what is it?") is Outcome.OK
    assert len(chat.session.messages[0].images) == 1
    assert chat.pending == []


def test_slash_image_attaches_to_the_next_message(
    model: object, screen: Screen, workdir: Path
) -> None:
    chat = make_chat(model, screen)
    assert chat.handle("/image smile.png") is Outcome.OK
    assert "Added image 'smile.png' (64×40" in screen.text
    assert chat.handle("/image nope.png") is Outcome.KEEP
    assert "No such file: nope.png" in screen.errors
    assert chat.handle("describe it") is Outcome.OK
    assert len(chat.session.messages[0].images) == 1


def test_absolute_path_message_is_not_a_command(
    model: object, screen: Screen, workdir: Path
) -> None:
    chat = make_chat(model, screen)
    assert chat.handle(f"{workdir}/smile.png what is this") is Outcome.OK
    assert chat.session.messages[0].content == "what is this"


def test_multiline_block(model: object, screen: Screen, workdir: Path) -> None:
    chat = make_chat(model, screen)
    assert chat.handle('"""first line\nsmile.png\nlast line"""') is Outcome.OK
    assert chat.session.messages[0].content == "first line\n\nlast line"


# --- replies ------------------------------------------------------------------------------


def test_ctrl_c_stops_the_reply_and_keeps_the_session(
    model: object, screen: Screen, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmchat.runtime import SamplingParams

    chat = make_chat(model, screen)
    chat.session.params = SamplingParams(seed=5, max_tokens=50)
    fed: list[str] = []

    def feed(self: PlainStream, text: str) -> None:
        fed.append(text)
        if len(fed) == 2:
            raise KeyboardInterrupt

    # monkeypatch.context(): undoing the whole fixture would also undo the autouse
    # isolated-home environment for the rest of the test
    with monkeypatch.context() as patch:
        patch.setattr(PlainStream, "feed", feed)
        assert chat.handle("tell me a long story") is Outcome.OK
        assert "(stopped)" in screen.text
        assert chat.interrupted
        assert chat.session.messages[-1].interrupted
    assert chat.handle("and then?") is Outcome.OK
    assert chat.session.messages[-1].role == "assistant"
    assert not chat.session.messages[-1].interrupted


def test_context_overflow_drops_the_oldest_turns_and_says_so(
    files: tuple[Path, Path], screen: Screen
) -> None:
    from mmchat.runtime import LoadOptions, SamplingParams, load_model

    with load_model(files[0], None, LoadOptions(n_ctx=256, n_threads=1, n_gpu_layers=0)) as m:
        chat = make_chat(m, screen)
        chat.session.params = SamplingParams(seed=1, max_tokens=8)
        chat.handle("/set system be brief")
        for i in range(8):
            assert chat.handle(f"question number {i} about something or other") is Outcome.OK
        assert "The conversation is longer than the context (256 tokens): dropped" in screen.text
        assert chat.session.system == "be brief"
        assert len(chat.session.messages) == 16  # the history keeps every turn


def test_same_seed_same_reply(model: object, screen: Screen) -> None:
    from mmchat.runtime import SamplingParams

    replies = []
    for _ in range(2):
        chat = make_chat(model, screen)
        chat.session.params = SamplingParams(seed=42, temperature=0.9, max_tokens=12)
        chat.handle("hello")
        replies.append(chat.session.messages[-1].content)
    assert replies[0] == replies[1]


def test_verbose_prints_timings(model: object, screen: Screen, workdir: Path) -> None:
    chat = make_chat(model, screen)
    chat.handle("/set verbose")
    chat.handle("what is smile.png")
    for label in ("image encode:", "prompt eval:", "tokens/s", "eval:", "time to first token:"):
        assert label in screen.errors
    screen.clear()
    chat.handle("/set quiet")
    chat.handle("ok")
    assert "prompt eval" not in screen.errors


def test_plain_output_has_no_escape_codes(model: object, workdir: Path) -> None:
    buf = io.StringIO()
    out = Console(file=buf, width=80)  # not a terminal
    chat = make_chat(model, Screen())
    chat.out = out
    chat.handle("hello")
    assert "\x1b" not in buf.getvalue()
    assert buf.getvalue().splitlines()[0] == chat.session.messages[-1].content


# --- commands -----------------------------------------------------------------------------


def test_help_and_unknown_command(model: object, screen: Screen) -> None:
    chat = make_chat(model, screen)
    assert chat.handle("/?") is Outcome.OK
    for name in ("/set", "/show", "/clear", "/load", "/save", "/open", "/image", "/bye"):
        assert name in screen.text
    assert chat.handle("/sav x.json") is Outcome.KEEP
    assert "Unknown command '/sav'. Did you mean /save?" in screen.errors
    assert chat.handle("/help set") is Outcome.OK
    assert "/set parameter NAME VALUE" in screen.text


def test_set_and_show(model: object, screen: Screen) -> None:
    chat = make_chat(model, screen)
    assert chat.handle("/set parameter temperature 0.25") is Outcome.OK
    assert chat.handle("/set parameter num_predict 7") is Outcome.OK
    assert chat.handle('/set parameter stop "###" END') is Outcome.OK
    p = chat.session.params
    assert (p.temperature, p.max_tokens, p.stop) == (0.25, 7, ["###", "END"])
    screen.clear()
    chat.handle("/show parameters")
    assert "temperature" in screen.text and "0.25" in screen.text
    assert chat.handle("/set parameter temperature hot") is Outcome.KEEP
    assert "temperature must be a number" in screen.errors
    assert chat.handle("/set parameter top_p 5") is Outcome.KEEP
    assert "top_p must be in (0, 1]" in screen.errors
    assert chat.handle("/set parameter tempreature 1") is Outcome.KEEP
    assert "did you mean temperature?" in screen.errors
    assert chat.handle("/set system You are a pirate.") is Outcome.OK
    screen.clear()
    chat.handle("/show system")
    assert "You are a pirate." in screen.text
    chat.handle("/show template")
    assert "{%" in screen.text or "{{" in screen.text
    chat.handle("/show info")
    assert "context" in screen.text and "1024 tokens" in screen.text
    for cmd, attr, value in [
        ("/set plain", "markdown", False),
        ("/set markdown", "markdown", True),
        ("/set nowordwrap", "wordwrap", False),
        ("/set wordwrap", "wordwrap", True),
    ]:
        assert chat.handle(cmd) is Outcome.OK
        assert getattr(chat.display, attr) is value
    assert chat.handle("/set frobnicate") is Outcome.KEEP
    assert chat.handle("/bye") is Outcome.EXIT
    assert chat.handle("/exit") is Outcome.EXIT


def test_clear_forgets_the_conversation(model: object, screen: Screen) -> None:
    chat = make_chat(model, screen)
    chat.handle("/set system be brief")
    chat.handle("hello")
    assert chat.session.messages
    chat.handle("/clear")
    assert chat.session.messages == []
    assert chat.session.system == "be brief"


def test_save_then_open_round_trip(model: object, screen: Screen, workdir: Path) -> None:
    chat = make_chat(model, screen)
    chat.handle("/set system be brief")
    chat.handle("what is smile.png")
    chat.handle("and the colours?")
    assert chat.handle("/save talk.json") is Outcome.OK
    data = json.loads((workdir / "talk.json").read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    ref = data["messages"][0]["images"][0]
    assert len(ref["sha256"]) == 64 and ref["source"] == str(workdir / "smile.png")

    fresh = make_chat(model, screen)
    screen.clear()
    assert fresh.handle("/open talk.json") is Outcome.OK
    assert "Opened talk.json: 4 messages" in screen.text
    assert [m.content for m in fresh.session.messages] == [m.content for m in chat.session.messages]
    assert fresh.session.system == "be brief"
    assert fresh.session.messages[0].images[0].digest == chat.session.messages[0].images[0].digest
    assert fresh.handle("one more question") is Outcome.OK
    assert len(fresh.session.messages) == 6

    assert fresh.handle("/open missing.json") is Outcome.KEEP
    assert "No such file: missing.json" in screen.errors
    (workdir / "junk.json").write_text("{not json")
    assert fresh.handle("/open junk.json") is Outcome.KEEP
    assert "not a saved mmchat conversation" in screen.errors
    assert len(fresh.session.messages) == 6  # nothing lost


def test_open_refuses_a_changed_image(model: object, screen: Screen, workdir: Path) -> None:
    chat = make_chat(model, screen)
    chat.handle("what is smile.png")
    chat.handle("/save talk.json")
    shutil.copy(IMAGES / "portrait.png", workdir / "smile.png")
    fresh = make_chat(model, screen)
    assert fresh.handle("/open talk.json") is Outcome.KEEP
    assert "changed since the conversation was saved" in screen.errors


def test_load_switches_model_and_keeps_text_history(
    model: object, text_model: object, screen: Screen, files: tuple[Path, Path]
) -> None:
    from mmchat.repl.loader import ModelSource

    opened: list[str] = []

    class Borrowed:
        """The module-scoped model, which the chat must not close."""

        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def close(self) -> None:
            opened.append("closed")

    def opener(ref: str, mmproj: str | None) -> tuple[ModelSource, object]:
        opened.append(ref)
        assert mmproj is None
        return ModelSource(ref, files[0], None), Borrowed(text_model)

    chat = make_chat(Borrowed(model), screen, opener=opener)
    chat.handle("hello")
    assert chat.handle("/load other") is Outcome.OK
    assert opened == ["other", "closed"]
    assert "Loaded other (text only, 2 messages kept)" in screen.text
    assert chat.handle("and now?") is Outcome.OK
    assert len(chat.session.messages) == 4


# --- rendering ----------------------------------------------------------------------------


def test_word_wrapper_breaks_between_words() -> None:
    w = WordWrapper(20)
    text = "the quick brown fox jumps over the lazy dog again and again"
    out = "".join(w.feed(ch) for ch in text) + w.flush()
    lines = out.split("\n")
    assert all(len(ln) <= 20 for ln in lines)
    assert " ".join(lines) == text


def test_markdown_stream_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=60, height=10, force_terminal=True, color_system="standard")
    stream = make_stream(console, markdown=True, wordwrap=True)
    assert isinstance(stream, MarkdownStream)
    stream.min_interval = 0
    for piece in [
        "# Title\n\n",
        "Some **bold** text",
        "\n\n",
        *[f"- item {i}\n" for i in range(15)],
    ]:
        stream.feed(piece)
    stream.finish()
    plain = Text_plain(buf.getvalue())
    assert "Title" in plain and "bold" in plain and "**" not in plain
    for i in range(15):
        assert plain.count(f"item {i}") >= 1


def Text_plain(ansi: str) -> str:
    from rich.text import Text

    return Text.from_ansi(ansi).plain


def test_plain_stream_when_not_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=60)
    stream = make_stream(console, markdown=True, wordwrap=True)
    assert isinstance(stream, PlainStream)
    stream.feed("**not rendered**")
    stream.finish()
    assert buf.getvalue() == "**not rendered**\n"


def test_control_characters_never_reach_the_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=60, force_terminal=True)
    stream = make_stream(console, markdown=False, wordwrap=False)
    stream.feed("a\x1b[2Jb\x07c\td\n")
    stream.finish()
    assert buf.getvalue() == "a[2Jbc\td\n"
    piped = io.StringIO()
    stream = make_stream(Console(file=piped), markdown=False, wordwrap=False)
    stream.feed("raw\x1b")
    stream.finish()
    assert piped.getvalue() == "raw\x1b\n"  # not a terminal: the reply as it is
