"""The interactive prompt: prompt_toolkit line editing around ``Chat.handle``.

- Enter sends; a message that starts with ``\"\"\"`` goes on over several lines until a line
  ends with ``\"\"\"``; Alt+Enter always inserts a new line; pasted text (bracketed paste)
  is inserted as it is, newlines included, and sent only on Enter.
- History is kept in ``MMCHAT_HOME/history`` across sessions.
- Tab completes file paths (with spaces escaped as a terminal's drag-and-drop does) and
  slash commands.
- Ctrl-C at the prompt clears the line (on an empty line it says how to exit); during a
  reply it stops the reply (see ``Chat.send``). Ctrl-D on an empty line exits.
- After an error nothing is sent and the typed text comes back for editing.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

from mmchat.repl.chat import Chat, Outcome

PROMPT = ">>> "
CONTINUATION = "... "
PLACEHOLDER = "Send a message (/? for help)"

_SET_WORDS = [
    "parameter",
    "system",
    "verbose",
    "quiet",
    "markdown",
    "plain",
    "wordwrap",
    "nowordwrap",
    "format",
    "noformat",
]
_SHOW_WORDS = ["info", "parameters", "system", "template"]
_PATH_COMMANDS = {"/image", "/save", "/open", "/load"}


def in_open_block(text: str) -> bool:
    """True while a ``\"\"\"`` message has not been closed."""
    s = text.lstrip()
    if not s.startswith('"""'):
        return False
    body = s[3:]
    return not body.rstrip().endswith('"""')


def _escape(name: str) -> str:
    out = []
    for ch in name:
        if ch in " \t'\"()&;|<>$`!*?[]{}\\#":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def _unescape(word: str) -> str:
    out: list[str] = []
    it = iter(word)
    for ch in it:
        if ch == "\\":
            out.append(next(it, ""))
        else:
            out.append(ch)
    return "".join(out)


def _current_word(before: str) -> str:
    """The word before the cursor; escaped spaces do not end a word."""
    i = len(before)
    while i > 0:
        ch = before[i - 1]
        if ch.isspace() and not (i >= 2 and before[i - 2] == "\\"):
            break
        i -= 1
    return before[i:]


class ChatCompleter(Completer):
    """Slash commands at the start of the input, file paths anywhere else."""

    def __init__(self, commands: Iterable[str]) -> None:
        self.commands = sorted(commands)

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        before = document.text_before_cursor
        stripped = before.lstrip()
        if stripped.startswith("/") and " " not in stripped and "/" not in stripped[1:]:
            for name in self.commands:
                if name.startswith(stripped.lower()):
                    yield Completion(name, start_position=-len(stripped))
            return
        head, _, rest = stripped.partition(" ")
        if head in ("/set", "/show") and " " not in rest:
            words = _SET_WORDS if head == "/set" else _SHOW_WORDS
            for w in words:
                if w.startswith(rest.lower()):
                    yield Completion(w, start_position=-len(rest))
            return
        if head.startswith("/") and head not in _PATH_COMMANDS and head.count("/") == 1:
            return
        yield from self._paths(_current_word(before))

    def _paths(self, word: str) -> Iterable[Completion]:
        raw = _unescape(word)
        if raw.startswith(("'", '"')):
            raw = raw[1:]
        if raw.startswith("file://"):
            return
        expanded = os.path.expanduser(raw)
        folder, prefix = os.path.split(expanded)
        try:
            entries = sorted(os.scandir(folder or "."), key=lambda e: e.name.lower())
        except OSError:
            return
        shown_folder = raw[: len(raw) - len(prefix)]
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            if entry.name.startswith(".") and not prefix.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            suffix = "/" if is_dir else ""
            text = _escape(shown_folder + entry.name) + suffix
            yield Completion(text, start_position=-len(word), display=entry.name + suffix)


def _history(path: Path | None) -> History:
    if path is None:
        return InMemoryHistory()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buf = event.current_buffer
        if in_open_block(buf.text):
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    @kb.add("c-c")
    def _interrupt(event: KeyPressEvent) -> None:
        buf = event.current_buffer
        if buf.text:
            buf.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt())

    return kb


def make_prompt_session(
    *, history_file: Path | None, input: Any = None, output: Any = None
) -> PromptSession[str]:
    from mmchat.repl.commands import command_names

    return PromptSession(
        history=_history(history_file),
        completer=ChatCompleter(command_names()),
        complete_while_typing=False,
        multiline=True,
        key_bindings=_key_bindings(),
        prompt_continuation=lambda width, line_number, is_soft_wrap: CONTINUATION,
        enable_history_search=False,
        input=input,
        output=output,
    )


def _enable_ctrl_c() -> None:
    """Make Ctrl-C stop a reply even when mmchat was started with SIGINT ignored.

    A process started in the background by a non-interactive shell (or by a launcher that
    ignores SIGINT) inherits SIG_IGN, and Python then installs no KeyboardInterrupt
    handler: Ctrl-C would be echoed and ignored while a reply streams. The interactive
    REPL is the one place where the user's intent is unambiguous, so it takes SIGINT back.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_repl(
    chat: Chat,
    *,
    history_file: Path | None,
    input: Any = None,
    output: Any = None,
) -> None:
    """Read and handle messages until ``/bye`` or Ctrl-D."""
    _enable_ctrl_c()
    session = make_prompt_session(history_file=history_file, input=input, output=output)
    default = ""
    while True:
        try:
            line = session.prompt(PROMPT, default=default, placeholder=PLACEHOLDER)
        except KeyboardInterrupt:  # Ctrl-C on an empty line (with text it clears the line)
            chat.note("Use Ctrl + d or /bye to exit.")
            default = ""
            continue
        except EOFError:
            break
        default = ""
        try:
            outcome = chat.handle(line)
        except KeyboardInterrupt:
            chat.note("(interrupted)")
            outcome = Outcome.KEEP
        if outcome is Outcome.EXIT:
            break
        if outcome is Outcome.KEEP:
            default = line
