"""``mmchat run MODEL "PROMPT"``: answer once and exit.

The prompt comes from the command line, from stdin when it is piped, or both (the piped
text first, then the prompt). Image paths are looked for in the command-line prompt (or in
the piped text when there is no prompt), plus any ``--image`` files. Attach notices go to
stderr, so stdout holds only the answer. The return value is the exit status.
"""

from __future__ import annotations

import os

from mmchat.repl.chat import Chat, Outcome
from mmchat.repl.imagepaths import ImageMention, find_images

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def compose(prompt: str | None, piped: str | None) -> tuple[str, str]:
    """(text in which to look for image paths, text sent as it is before it)."""
    prompt = (prompt or "").strip()
    piped = (piped or "").strip()
    if prompt:
        return prompt, piped
    return piped, ""


def run_once(
    chat: Chat,
    prompt: str | None,
    *,
    piped: str | None,
    images: list[str],
    audio: list[str] | None = None,
) -> int:
    scan, prefix = compose(prompt, piped)
    parsed = find_images(scan, exists=chat.exists)
    if not parsed.ok:
        for m in parsed.missing:
            chat.error(f"No such file: {m.display}")
        for m in parsed.urls:
            chat.error(f"mmchat does not download images: {m.display}")
        return EXIT_ERROR
    mentions = list(parsed.images)
    given = [(v, False) for v in images] + [(v, True) for v in audio or ()]
    for value, is_audio in given:
        path = os.path.expanduser(value)
        if not chat.exists(path):
            chat.error(f"No such file: {value}")
            return EXIT_ERROR
        mentions.append(ImageMention(value, path, 0, 0, is_audio))
    attached = chat.attach(mentions)
    if attached is None:
        return EXIT_ERROR
    text = "\n\n".join(t for t in (prefix, parsed.text) if t)
    if not text and not attached:
        chat.error('nothing to send: give a prompt, e.g. mmchat run MODEL "Describe ./a.png"')
        return EXIT_ERROR
    try:
        outcome = chat.send(text, attached)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if outcome is Outcome.KEEP or chat.last_error:
        return EXIT_ERROR
    return EXIT_INTERRUPTED if chat.interrupted else 0
