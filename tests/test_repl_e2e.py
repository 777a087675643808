"""``mmchat run`` as a person uses it: a real process in a pseudo-terminal (pexpect), and
one-shot runs with pipes. Assertions are on what appears on the screen and exit codes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.models import FIXTURES, converted

pexpect = pytest.importorskip("pexpect")

IMAGES = FIXTURES / "images"
PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]")


@pytest.fixture(scope="module")
def files() -> tuple[Path, Path]:
    return converted("llava15_hf")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(IMAGES / "landscape.png", tmp_path / "smile.png")
    shutil.copy(IMAGES / "large.png", tmp_path / "big.png")
    (tmp_path / "notes.png").write_text("I am a text file\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes((IMAGES / "landscape.png").read_bytes()[:800])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # pexpect does not answer cursor-position requests: without this prompt_toolkit waits
    # for the answers (2 s) after each line, and keys typed meanwhile go to the prompt
    env.update(
        {"TERM": "xterm", "COLUMNS": "120", "LINES": "40", "PROMPT_TOOLKIT_NO_CPR": "1", **extra}
    )
    return env


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Terminal:
    """A spawned ``mmchat run`` in a pseudo-terminal."""

    def __init__(self, args: list[str], *, ignore_sigint: bool = False, **env: str) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "mmchat", "run", *args],
            env=_env(**env),
            encoding="utf-8",
            dimensions=(40, 120),
            timeout=30,
            # as when started from a non-interactive shell's background job: SIG_IGN
            preexec_fn=_ignore_sigint if ignore_sigint else None,
        )
        self.seen = ""
        log = os.environ.get("MMCHAT_TEST_PTY_LOG")
        if log:
            self.child.logfile_read = open(log, "a")  # noqa: SIM115

    def expect(self, pattern: str) -> str:
        """Wait for ``pattern`` (a literal) and return the screen text before it."""
        self.child.expect_exact(pattern)
        before = ANSI.sub("", self.child.before or "")
        self.seen += before + pattern
        return before

    def prompt(self) -> None:
        self.expect(PROMPT)

    def send(self, line: str) -> None:
        self.child.send(line + "\r")

    def clear_line(self) -> None:
        self.child.send("\x03")

    def close(self) -> int:
        self.child.expect(pexpect.EOF)
        self.child.close()
        return int(self.child.exitstatus or 0)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    spawned: list[Terminal] = []
    yield spawned
    for t in spawned:
        if t.child.isalive():
            t.child.terminate(force=True)


def _model_args(files: tuple[Path, Path], *extra: str, vision: bool = True) -> list[str]:
    args = [str(files[0])]
    if vision:
        args += ["--mmproj", str(files[1])]
    # one thread: llama.cpp's worker threads spin, which is slow on a busy 2-core machine
    return [*args, "--ctx", "2048", "--threads", "1", "--gpu-layers", "0", *extra]


def test_interactive_session(
    files: tuple[Path, Path], workdir: Path, terminals: list[Terminal]
) -> None:
    term = Terminal(
        _model_args(files, "--plain", "--seed", "1", "--max-tokens", "8"),
        MMCHAT_MAX_IMAGE_PIXELS="100000",
    )
    terminals.append(term)
    term.prompt()

    # an image inline: attached, the question sent without the path, the reply streamed
    term.send("What is in this image? ./smile.png")
    term.child.expect(r"Added image '\./smile\.png' \(64×40, (\d+) tokens\)")
    term.prompt()

    # the same image again: no second encode (the verbose report says so)
    term.send("/set verbose")
    term.prompt()
    term.send("What colours are in it?")
    term.expect("time to first token")
    assert "(0 of 1 image(s) encoded" in term.seen
    term.prompt()
    term.send("/set quiet")
    term.prompt()

    # errors: one line each, nothing sent, the text is given back for editing
    cases = [
        ("I like image.png files", "No such file: image.png"),
        ("what is notes.png", "notes.png is not an image"),
        ("what is empty.png", "empty.png is empty"),
        ("what is cut.png", "cut.png is truncated"),
        ("what is big.png", "more than the limit of 100,000"),
        ("what is https://example.com/a.png", "does not download images"),
        ("/sav", "Did you mean /save?"),
    ]
    for typed, message in cases:
        term.send(typed)
        term.expect(message)
        term.expect(typed)  # back on the prompt line, editable
        term.clear_line()

    # /save then /open in a fresh conversation
    term.send("/save talk.json")
    term.expect("Saved the conversation (4 messages)")
    term.prompt()
    term.send("/clear")
    term.expect("Cleared session context")
    term.send("/open talk.json")
    term.expect("Opened talk.json: 4 messages")
    term.prompt()
    term.send("and the shapes?")
    term.prompt()
    term.send("/bye")
    assert term.close() == 0
    saved = (workdir / "talk.json").read_text()
    assert "smile.png" in saved and "What is in this image?" in saved


@pytest.mark.parametrize("inherited", [False, True], ids=["sigint-default", "sigint-ignored"])
def test_ctrl_c_stops_a_reply_and_the_session_goes_on(
    files: tuple[Path, Path], workdir: Path, terminals: list[Terminal], inherited: bool
) -> None:
    """Also when mmchat inherits SIGINT ignored (a background job of a non-interactive
    shell, some launchers): Ctrl-C was then echoed and ignored while a reply streamed."""
    # Seed 2 never emits end-of-sequence: the reply runs until the 8192-token context is
    # full (~7 s), so the Ctrl-C below always lands mid-reply, however fast the machine.
    term = Terminal(
        _model_args(files, "--plain", "--seed", "2", "--ctx", "8192"), ignore_sigint=inherited
    )
    terminals.append(term)
    term.prompt()
    term.send("tell me a long story")
    term.expect("tell me a long story")
    term.expect("\n")
    time.sleep(0.5)  # the reply is streaming (it lasts seconds)
    term.child.sendintr()
    term.expect("(stopped)")
    term.prompt()
    term.send("/set parameter num_predict 4")
    term.prompt()
    term.send("and then?")
    term.prompt()
    term.child.sendcontrol("d")  # Ctrl-D exits
    assert term.close() == 0


def test_markdown_on_the_terminal(
    files: tuple[Path, Path], workdir: Path, terminals: list[Terminal]
) -> None:
    term = Terminal(_model_args(files, "--seed", "1", "--max-tokens", "6"))
    terminals.append(term)
    term.prompt()
    term.send("hello")
    term.prompt()
    term.send("/bye")
    assert term.close() == 0


def test_text_only_model_cannot_see_images(
    files: tuple[Path, Path], workdir: Path, terminals: list[Terminal]
) -> None:
    term = Terminal(_model_args(files, "--plain", "--max-tokens", "4", vision=False))
    terminals.append(term)
    term.prompt()
    term.send("what is smile.png")
    term.expect("this model cannot see images")
    term.clear_line()
    term.send("hello")
    term.prompt()
    # switch to the same model with its projector: the conversation is kept
    term.send(f"/load {files[0]} {files[1]}")
    term.expect(f"Loaded {files[0].name} (with vision, 2 messages kept)")
    term.send("what is smile.png")
    term.expect("Added image 'smile.png' (64×40")
    term.prompt()
    term.send("/exit")
    assert term.close() == 0


# --- one-shot -----------------------------------------------------------------------------


def run_cli(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmchat", "run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=120,
    )


def test_one_shot_with_an_image(files: tuple[Path, Path], workdir: Path) -> None:
    args = _model_args(files, "--seed", "4", "--max-tokens", "6")
    proc = run_cli(*args, "Describe ./smile.png")
    assert proc.returncode == 0, proc.stderr
    assert "Added image './smile.png' (64×40" in proc.stderr
    assert proc.stdout.strip()
    assert "\x1b" not in proc.stdout  # not a terminal: plain text only
    again = run_cli(*args, "Describe", "./smile.png")  # words need no quotes; same seed
    assert again.stdout == proc.stdout


def test_one_shot_errors_exit_non_zero(files: tuple[Path, Path], workdir: Path) -> None:
    proc = run_cli(*_model_args(files), "Describe ./nope.png")
    assert proc.returncode == 2
    assert "No such file: ./nope.png" in proc.stderr
    assert proc.stdout == ""
    proc = run_cli(*_model_args(files), "--image", "notes.png", "what is it")
    assert proc.returncode == 2
    assert "notes.png is not an image" in proc.stderr
    proc = run_cli(*_model_args(files, vision=False), "--image", "smile.png", "what is it")
    assert proc.returncode == 2
    assert "this model cannot see images" in proc.stderr
    proc = run_cli(str(workdir / "missing.gguf"), "hi")
    assert proc.returncode == 2
    assert "No such file" in proc.stderr


def test_one_shot_reads_piped_stdin_and_repeated_images(
    files: tuple[Path, Path], workdir: Path
) -> None:
    shutil.copy(IMAGES / "portrait.png", workdir / "tall.png")
    proc = run_cli(
        *_model_args(files, "--max-tokens", "4", "--verbose"),
        "--image",
        "smile.png",
        "--image",
        "tall.png",
        "summarise",
        stdin="some notes\npiped in\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Added image") == 2
    assert "load duration" in proc.stderr and "prompt eval" in proc.stderr
    proc = run_cli(*_model_args(files, "--max-tokens", "4"), stdin="describe smile.png\n")
    assert proc.returncode == 0, proc.stderr
    assert "Added image 'smile.png'" in proc.stderr


def test_one_shot_by_store_name(files: tuple[Path, Path], workdir: Path) -> None:
    from mmchat.store import open_store

    open_store().register("tiny-llava", model=files[0], mmproj=files[1])
    proc = run_cli("tiny-llava", "--max-tokens", "4", "--threads", "1", "what is smile.png")
    assert proc.returncode == 0, proc.stderr
    assert "Added image 'smile.png'" in proc.stderr
    proc = run_cli("no-such-model-here", "hi")
    assert proc.returncode != 0
    assert "no-such-model-here" in proc.stderr
