"""Slash commands: ``/help``, ``/set``, ``/show``, ``/image``, ``/clear``, ``/load``,
``/save``, ``/open``, ``/bye``.

Each handler takes the ``Chat`` and the rest of the line and returns an ``Outcome``; a
``UserError`` raised by a handler is printed as one red line and the typed command is given
back for editing.
"""

from __future__ import annotations

import difflib
import json
import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mmchat.errors import UserError
from mmchat.repl.chat import Chat, Outcome
from mmchat.repl.imagepaths import ImageMention, find_images

Handler = Callable[[Chat, str], Outcome]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    usage: str
    help: str
    aliases: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {}


def command(
    name: str, usage: str, help: str, aliases: tuple[str, ...] = ()
) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        cmd = Command(name, fn, usage, help, aliases)
        for key in (name, *aliases):
            COMMANDS[key] = cmd
        return fn

    return register


def command_names() -> list[str]:
    """Every spelling, for completion and suggestions."""
    return sorted(COMMANDS)


def run_command(chat: Chat, line: str) -> Outcome:
    head, _, rest = line.partition(" ")
    name = head.lower()
    cmd = COMMANDS.get(name)
    if cmd is None:
        close = difflib.get_close_matches(name, command_names(), n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]}?" if close else ""
        chat.error(f"Unknown command '{head}'.{hint} Type /? for help.")
        return Outcome.KEEP
    try:
        return cmd.handler(chat, rest.strip())
    except UserError as exc:
        chat.error(str(exc))
        return Outcome.KEEP


# --- /help ------------------------------------------------------------------------------

SET_HELP = [
    ("/set parameter NAME VALUE", "set a sampling parameter (see /show parameters)"),
    ("/set system TEXT", "set the system prompt (/set system with no text clears it)"),
    ("/set verbose | quiet", "show | hide timings after each reply"),
    ("/set markdown | plain", "render replies as Markdown | plain text"),
    ("/set wordwrap | nowordwrap", "wrap plain text at word boundaries | don't"),
    ("/set format json | noformat", "constrain replies to JSON | don't"),
]

SHORTCUTS = [
    ('"""', "start and end a multi-line message (or paste several lines)"),
    ("Alt+Enter", "new line without sending"),
    ("Tab", "complete a file path or a command"),
    ("Up / Down", "earlier messages (kept across sessions)"),
    ("Ctrl+C", "stop the reply (at the prompt: clear the line)"),
    ("Ctrl+D", "exit (on an empty line)"),
]


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(a) for a, _ in rows) + 2
    return "\n".join(f"  {a.ljust(width)}{b}" for a, b in rows)


@command("/help", "/help [set|shortcuts]", "show this help", aliases=("/?",))
def _help(chat: Chat, arg: str) -> Outcome:
    if arg in ("set", "/set"):
        chat.say(_table(SET_HELP))
        return Outcome.OK
    if arg in ("shortcuts", "keys"):
        chat.say(_table(SHORTCUTS))
        return Outcome.OK
    seen: list[Command] = []
    for cmd in COMMANDS.values():
        if cmd not in seen:
            seen.append(cmd)
    rows = [(c.usage, c.help) for c in seen]
    chat.say("Available commands:\n" + _table(rows))
    chat.say(
        "\nType a message to chat. Name image files anywhere in it to attach them, e.g.\n"
        "  What is in this picture? ./photo.jpg\n"
        "Paths may be quoted, use ~, contain escaped spaces (as dragged in) or be file:// "
        "URIs.\nUse /help shortcuts for keys and /help set for settings."
    )
    return Outcome.OK


# --- /set ---------------------------------------------------------------------------------

# Ollama's names for the sampling parameters, plus mmchat's own.
PARAM_ALIASES = {
    "num_predict": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "seed": "seed",
    "stop": "stop",
}
_INT_PARAMS = {"top_k", "repeat_last_n", "seed", "max_tokens"}


def _parse_param(name: str, values: list[str]) -> tuple[str, Any]:
    field_name = PARAM_ALIASES.get(name.lower())
    if field_name is None:
        if name.lower() in ("num_ctx", "ctx"):
            raise UserError(
                "the context size is fixed when the model is loaded; "
                "start again with `mmchat run MODEL --ctx N`"
            )
        close = difflib.get_close_matches(name.lower(), list(PARAM_ALIASES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"unknown parameter {name!r}{hint}; see /show parameters")
    if not values:
        raise UserError(f"usage: /set parameter {name} VALUE")
    if field_name == "stop":
        return field_name, values
    raw = " ".join(values)
    if field_name in ("seed", "max_tokens") and raw.lower() in ("none", "random", "-1"):
        return field_name, None
    try:
        value: Any = int(raw) if field_name in _INT_PARAMS else float(raw)
    except ValueError:
        kind = "an integer" if field_name in _INT_PARAMS else "a number"
        raise UserError(f"{name} must be {kind}, got {raw!r}") from None
    return field_name, value


def _split_args(arg: str) -> list[str]:
    try:
        return shlex.split(arg)
    except ValueError:
        return arg.split()


@command("/set", "/set SETTING [VALUE]", "change a setting (/help set)")
def _set(chat: Chat, arg: str) -> Outcome:
    what, _, rest = arg.partition(" ")
    what = what.lower()
    rest = rest.strip()
    d = chat.display
    toggles: dict[str, tuple[str, bool, str]] = {
        "verbose": ("verbose", True, "Set 'verbose' mode."),
        "quiet": ("verbose", False, "Set 'quiet' mode."),
        "markdown": ("markdown", True, "Replies are rendered as Markdown."),
        "plain": ("markdown", False, "Replies are shown as plain text."),
        "wordwrap": ("wordwrap", True, "Set 'wordwrap' mode."),
        "nowordwrap": ("wordwrap", False, "Set 'nowordwrap' mode."),
    }
    if what in toggles:
        attr, value, msg = toggles[what]
        setattr(d, attr, value)
        chat.note(msg)
        return Outcome.OK
    if what == "parameter":
        parts = _split_args(rest)
        if not parts:
            raise UserError("usage: /set parameter NAME VALUE (see /show parameters)")
        field_name, value = _parse_param(parts[0], parts[1:])
        chat.session.set_params(**{field_name: value})
        chat.note(f"Set parameter '{parts[0]}' to '{_fmt(value, field_name)}'")
        return Outcome.OK
    if what == "system":
        text = rest
        if text.startswith('"""'):
            from mmchat.repl.chat import strip_triple_quotes

            text = strip_triple_quotes(text)
        elif len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        chat.session.set_system(text or None)
        chat.note("Set system message." if text else "Cleared the system message.")
        return Outcome.OK
    if what == "format":
        if rest.lower() != "json":
            raise UserError("usage: /set format json (or /set noformat)")
        chat.session.set_params(format="json")
        chat.note("Set format to 'json' mode.")
        return Outcome.OK
    if what == "noformat":
        chat.session.set_params(format=None)
        chat.note("Disabled format.")
        return Outcome.OK
    options = [*toggles, "parameter", "system", "format", "noformat"]
    close = difflib.get_close_matches(what, options, n=1)
    hint = f" Did you mean /set {close[0]}?" if close else ""
    raise UserError(f"unknown setting {what!r}.{hint} See /help set")


def _fmt(value: Any, name: str = "") -> str:
    if isinstance(value, list):
        return ", ".join(map(repr, value)) if value else "none"
    if value is None:
        return {"seed": "random", "max_tokens": "no limit"}.get(name, "none")
    return str(value)


# --- /show --------------------------------------------------------------------------------


@command("/show", "/show info|parameters|system|template", "show facts about the model/session")
def _show(chat: Chat, arg: str) -> Outcome:
    what = arg.lower().strip()
    if what in ("info", ""):
        facts = chat.model.describe()
        rows = [
            ("name", chat.name),
            ("model", facts.get("model")),
            ("projector", facts.get("mmproj") or "none (this model cannot see images)"),
            ("architecture", facts.get("architecture")),
            ("vision", facts.get("projector_type") or "-"),
            ("context", f"{facts.get('n_ctx')} tokens (trained with {facts.get('n_ctx_train')})"),
            ("in use", f"{chat.model.kv_tokens} tokens, {len(chat.session.messages)} messages"),
            ("embedding", facts.get("n_embd")),
            ("vocabulary", facts.get("n_vocab")),
            ("threads", facts.get("n_threads")),
            ("template", f"{facts.get('template')} (from {facts.get('template_origin')})"),
        ]
        chat.say(_table([(k, str(v)) for k, v in rows]))
        return Outcome.OK
    if what in ("parameters", "params", "parameter"):
        params = chat.session.params
        chat.say(_table([(f.name, _fmt(getattr(params, f.name), f.name)) for f in fields(params)]))
        return Outcome.OK
    if what == "system":
        chat.say(chat.session.system or "(no system message)")
        return Outcome.OK
    if what == "template":
        chat.say(chat.model.template.source)
        return Outcome.OK
    raise UserError(f"unknown /show topic {what!r}: use info, parameters, system or template")


# --- images -------------------------------------------------------------------------------


@command("/image", "/image PATH", "attach an image to your next message")
def _image(chat: Chat, arg: str) -> Outcome:
    return _attach_command(chat, arg, audio=False)


@command("/audio", "/audio PATH", "attach an audio clip (.wav, .mp3, .flac) to your next message")
def _audio(chat: Chat, arg: str) -> Outcome:
    return _attach_command(chat, arg, audio=True)


def _attach_command(chat: Chat, arg: str, *, audio: bool) -> Outcome:
    what = "audio" if audio else "image"
    if not arg:
        if chat.pending:
            names = ", ".join(f"'{a.display}'" for a in chat.pending)
            chat.say(f"Attached for the next message: {names}")
        else:
            raise UserError(f"usage: /{what} PATH")
        return Outcome.OK
    parsed = find_images(arg, exists=chat.exists)
    mentions = list(parsed.images)
    if not mentions:
        # an explicit path need not end in an image extension
        value = _one_path(arg)
        path = os.path.expanduser(value)
        if not chat.exists(path):
            raise UserError(f"No such file: {value}")
        mentions = [ImageMention(value, path, 0, len(arg), audio)]
    elif not parsed.ok:
        raise UserError(f"No such file: {parsed.missing[0].display}")
    attached = chat.attach(mentions)
    if attached is None:
        return Outcome.KEEP
    chat.pending.extend(attached)
    return Outcome.OK


def _one_path(arg: str) -> str:
    parts = _split_args(arg)
    return parts[0] if len(parts) == 1 else arg


# --- session ------------------------------------------------------------------------------


@command("/clear", "/clear", "forget the conversation (keeps the system message)")
def _clear(chat: Chat, arg: str) -> Outcome:
    chat.session.clear()
    chat.pending.clear()
    chat.note("Cleared session context")
    return Outcome.OK


@command("/load", "/load MODEL [MMPROJ]", "switch to another model, keeping the conversation")
def _load(chat: Chat, arg: str) -> Outcome:
    parts = _split_args(arg)
    if not parts or len(parts) > 2:
        raise UserError("usage: /load MODEL [MMPROJ] (a store name, or a .gguf path)")
    chat.switch_model(parts[0], parts[1] if len(parts) > 1 else None)
    return Outcome.OK


@command("/save", "/save FILE", "save the conversation as JSON (images by sha256 and path)")
def _save(chat: Chat, arg: str) -> Outcome:
    if not arg:
        raise UserError("usage: /save FILE")
    path = Path(_one_path(arg)).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder; give a file name")
    data = chat.session.export()
    data["mmchat"] = "conversation"
    data["model_name"] = chat.name
    body = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"No such folder: {folder}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    n = len(data.get("messages", []))
    chat.note(f"Saved the conversation ({n} messages) to {path}")
    return Outcome.OK


@command("/open", "/open FILE", "continue a conversation saved with /save")
def _open(chat: Chat, arg: str) -> Outcome:
    if not arg:
        raise UserError("usage: /open FILE")
    shown = _one_path(arg)
    path = Path(shown).expanduser()
    if not path.is_file():
        raise UserError(f"No such file: {shown}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{shown} is not a saved mmchat conversation ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise UserError(f"{shown} is not a saved mmchat conversation")
    chat.session.load(data, load_image=chat._reload_image, base_dir=path.parent.resolve())
    chat.pending.clear()
    messages = chat.session.messages
    for m in messages:
        images = "".join(f" [image {getattr(i, 'source', '?')}]" for i in m.images)
        prefix = ">>> " if m.role == "user" else ""
        chat.note(f"{prefix}{_one_line(m.content)}{images}")
    chat.note(f"Opened {shown}: {len(messages)} messages. Continue the conversation.")
    return Outcome.OK


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@command("/bye", "/bye", "exit", aliases=("/exit", "/quit"))
def _bye(chat: Chat, arg: str) -> Outcome:
    return Outcome.EXIT
