"""The prompt itself (prompt_toolkit), driven by keystrokes through a pipe input.

Multi-line input, bracketed paste, editing the text back after an error, Ctrl-C/Ctrl-D,
persistent history and Tab completion; the last test runs the real chat on a fixture model.
"""

from __future__ import annotations

import io
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from support.models import FIXTURES, converted

from mmchat.repl.app import ChatCompleter, in_open_block, run_repl
from mmchat.repl.chat import Chat, Outcome
from mmchat.repl.commands import command_names

ENTER = "\r"
ALT_ENTER = "\x1b\r"
CTRL_C = "\x03"
CTRL_D = "\x04"
UP = "\x1b[A"
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"


class Recorder:
    """Stands in for ``Chat``: records each submitted input and answers as told."""

    def __init__(self, answers: dict[str, Outcome] | None = None) -> None:
        self.lines: list[str] = []
        self.notes: list[str] = []
        self.answers = answers or {}

    def handle(self, line: str) -> Outcome:
        self.lines.append(line)
        if line.strip() == "/bye":
            return Outcome.EXIT
        return self.answers.get(line, Outcome.OK)

    def note(self, message: str) -> None:
        self.notes.append(message)


def drive(chat: object, keys: Iterable[str | float], history: Path | None = None) -> None:
    """Type ``keys`` (a float: pause that many seconds first), then Ctrl-D."""
    items = [*keys, CTRL_D]
    with create_pipe_input() as inp:
        if not any(isinstance(k, float) for k in items):
            for k in items:
                inp.send_text(str(k))
        else:

            def typist() -> None:
                for k in items:
                    if isinstance(k, float):
                        time.sleep(k)
                    else:
                        inp.send_text(k)

            threading.Thread(target=typist, daemon=True).start()
        run_repl(chat, history_file=history, input=inp, output=DummyOutput())  # type: ignore[arg-type]


def test_enter_sends_each_line() -> None:
    rec = Recorder()
    drive(rec, ["hello" + ENTER, "second" + ENTER])
    assert rec.lines == ["hello", "second"]


def test_triple_quotes_span_lines() -> None:
    rec = Recorder()
    drive(rec, ['"""first line' + ENTER, "second line" + ENTER, 'end"""' + ENTER, "after" + ENTER])
    assert rec.lines == ['"""first line\nsecond line\nend"""', "after"]


def test_open_block_detection() -> None:
    assert in_open_block('"""')
    assert in_open_block('"""abc\ndef')
    assert not in_open_block('"""abc"""')
    assert not in_open_block('"""\nabc\n"""')
    assert not in_open_block("plain")


def test_alt_enter_inserts_a_newline() -> None:
    rec = Recorder()
    drive(rec, ["a" + ALT_ENTER + "b" + ENTER])
    assert rec.lines == ["a\nb"]


def test_bracketed_paste_keeps_newlines_until_enter() -> None:
    rec = Recorder()
    drive(rec, [PASTE_START + "line one\nline two\nline three" + PASTE_END, " and more" + ENTER])
    assert rec.lines == ["line one\nline two\nline three and more"]


def test_text_comes_back_for_editing_after_an_error() -> None:
    rec = Recorder({"I like image.png files": Outcome.KEEP})
    drive(rec, ["I like image.png files" + ENTER, " a lot" + ENTER])
    assert rec.lines == ["I like image.png files", "I like image.png files a lot"]


def test_ctrl_c_clears_the_line_then_hints() -> None:
    rec = Recorder()
    drive(rec, ["typed text" + CTRL_C, "other" + ENTER, CTRL_C])
    assert rec.lines == ["other"]
    assert rec.notes == ["Use Ctrl + d or /bye to exit."]


def test_ctrl_c_discards_text_kept_after_an_error() -> None:
    rec = Recorder({"bad": Outcome.KEEP})
    drive(rec, ["bad" + ENTER, CTRL_C, "good" + ENTER])
    assert rec.lines == ["bad", "good"]


def test_bye_and_ctrl_d_exit() -> None:
    rec = Recorder()
    drive(rec, ["/bye" + ENTER, "never" + ENTER])
    assert rec.lines == ["/bye"]
    rec = Recorder()
    drive(rec, [])  # only Ctrl-D
    assert rec.lines == []


def test_history_is_kept_across_sessions(tmp_path: Path) -> None:
    from mmchat.settings import load_settings

    history = load_settings().history_file  # inside the test's MMCHAT_HOME
    drive(Recorder(), ["what is the capital of France" + ENTER], history)
    assert "what is the capital of France" in history.read_text()
    rec = Recorder()
    drive(rec, [UP + ENTER], history)
    assert rec.lines == ["what is the capital of France"]


def _complete(text: str) -> list[str]:
    comp = ChatCompleter(command_names())
    doc = Document(text, len(text))
    return [c.text for c in comp.get_completions(doc, CompleteEvent(completion_requested=True))]


def test_tab_completes_paths_with_escaped_spaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my photo.png").write_bytes(b"x")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat.jpg").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert _complete("what is my") == [r"my\ photo.png"]
    assert _complete("what is pi") == ["pics/"]
    assert _complete("what is pics/c") == ["pics/cat.jpg"]
    assert _complete(r"what is my\ ph") == [r"my\ photo.png"]
    assert _complete("/image my") == [r"my\ photo.png"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _complete("see ~/pics/") == ["~/pics/cat.jpg"]


def test_tab_completes_commands() -> None:
    assert _complete("/se") == ["/set"]
    assert "/show" in _complete("/s")
    assert _complete("/set verb") == ["verbose"]
    assert _complete("/show par") == ["parameters"]
    assert _complete("/clear x") == []


def test_tab_key_in_the_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "smile.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    rec = Recorder()
    drive(rec, ["what is smi\t", 0.5, ENTER])
    assert rec.lines == ["what is smile.png"]


def test_real_chat_through_the_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmchat.runtime import LoadOptions, SamplingParams, load_model

    shutil.copy(FIXTURES / "images" / "landscape.png", tmp_path / "smile.png")
    monkeypatch.chdir(tmp_path)
    model_path, mmproj = converted("llava15_hf")
    out_buf, err_buf = io.StringIO(), io.StringIO()
    with load_model(
        model_path, mmproj, LoadOptions(n_ctx=512, n_threads=2, n_gpu_layers=0)
    ) as model:
        chat = Chat(
            model=model,
            session=model.session(params=SamplingParams(seed=1, max_tokens=5)),
            out=Console(file=out_buf, width=100),
            err=Console(file=err_buf, width=100),
        )
        drive(
            chat,
            [
                "What is in this image? ./smile.png" + ENTER,
                "I like image.png files" + ENTER,
                CTRL_C,
                "/bye" + ENTER,
            ],
        )
        messages = chat.session.messages
    assert "Added image './smile.png' (64×40" in out_buf.getvalue()
    assert "No such file: image.png" in err_buf.getvalue()
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == "What is in this image?"
