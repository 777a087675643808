"""Inline image-path detection, table-driven (issue 5). No real files: ``exists`` is a set."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from mmchat.repl.imagepaths import IMAGE_EXTENSIONS, find_images, has_image_extension

HOME = "/home/me"


def _expand(path: str) -> str:
    return HOME + path[1:] if path.startswith("~") else path


@dataclass(frozen=True)
class Case:
    id: str
    message: str
    files: tuple[str, ...]  # paths that exist
    text: str  # what is sent
    images: tuple[str, ...] = ()  # paths opened, in order
    missing: tuple[str, ...] = ()  # displayed as "No such file: ..."
    urls: tuple[str, ...] = ()
    windows: bool = False


CASES = [
    Case(
        "relative-bare",
        "What's in this image? smile.png",
        ("smile.png",),
        "What's in this image?",
        ("smile.png",),
    ),
    Case(
        "relative-dot",
        "What's in this image? ./smile.png",
        ("./smile.png",),
        "What's in this image?",
        ("./smile.png",),
    ),
    Case("relative-nested", "describe ./a/b.png", ("./a/b.png",), "describe", ("./a/b.png",)),
    Case("relative-parent", "../x.jpg what is it", ("../x.jpg",), "what is it", ("../x.jpg",)),
    Case(
        "absolute",
        "look at /tmp/pics/cat.jpeg please",
        ("/tmp/pics/cat.jpeg",),
        "look at please",
        ("/tmp/pics/cat.jpeg",),
    ),
    Case("tilde", "what is ~/x.png", (f"{HOME}/x.png",), "what is", (f"{HOME}/x.png",)),
    Case(
        "single-quoted",
        "what is 'quoted path.png'",
        ("quoted path.png",),
        "what is",
        ("quoted path.png",),
    ),
    Case(
        "double-quoted",
        'what is "quoted path.png"',
        ("quoted path.png",),
        "what is",
        ("quoted path.png",),
    ),
    Case(
        "quoted-tilde",
        "see '~/My Pics/a b.png'",
        (f"{HOME}/My Pics/a b.png",),
        "see",
        (f"{HOME}/My Pics/a b.png",),
    ),
    Case(
        "drag-drop-escapes",
        r"what is my\ photo\ \(1\).png",
        ("my photo (1).png",),
        "what is",
        ("my photo (1).png",),
    ),
    Case(
        "drag-drop-absolute",
        r"/Users/me/Desktop/Screen\ Shot\ 2024.png compare",
        ("/Users/me/Desktop/Screen Shot 2024.png",),
        "compare",
        ("/Users/me/Desktop/Screen Shot 2024.png",),
    ),
    Case(
        "drag-drop-ampersand",
        r"/tmp/tom\&jerry\'s.png",
        ("/tmp/tom&jerry's.png",),
        "",
        ("/tmp/tom&jerry's.png",),
    ),
    Case(
        "file-uri",
        "file:///home/me/my%20photo.png what",
        ("/home/me/my photo.png",),
        "what",
        ("/home/me/my photo.png",),
    ),
    Case(
        "file-uri-localhost",
        "file://localhost/tmp/a%28b%29.jpg",
        ("/tmp/a(b).jpg",),
        "",
        ("/tmp/a(b).jpg",),
    ),
    Case(
        "file-uri-windows",
        "file:///C:/Users/me/a%20b.png hi",
        ("C:/Users/me/a b.png",),
        "hi",
        ("C:/Users/me/a b.png",),
    ),
    Case(
        "windows-drive",
        r"what is C:\Users\me\pic.png",
        (r"C:\Users\me\pic.png",),
        "what is",
        (r"C:\Users\me\pic.png",),
    ),
    Case(
        "windows-drive-slashes",
        "what is D:/photos/pic.JPG",
        ("D:/photos/pic.JPG",),
        "what is",
        ("D:/photos/pic.JPG",),
    ),
    Case(
        "windows-quoted-spaces",
        r'what is "C:\My Pictures\a.png"',
        (r"C:\My Pictures\a.png",),
        "what is",
        (r"C:\My Pictures\a.png",),
    ),
    Case(
        "windows-relative-on-windows",
        r"what is pics\a.png",
        (r"pics\a.png",),
        "what is",
        (r"pics\a.png",),
        windows=True,
    ),
    *[
        Case(f"ext-{ext[1:]}-{case}", f"x {name}", (name,), "x", (name,))
        for ext in IMAGE_EXTENSIONS
        for case, name in (("lower", "a" + ext), ("upper", "a" + ext.upper()))
    ],
    Case("ext-mixed-case", "x a.JpEg", ("a.JpEg",), "x", ("a.JpEg",)),
    Case(
        "several",
        "compare ./a.png and ./b.jpg",
        ("./a.png", "./b.jpg"),
        "compare and",
        ("./a.png", "./b.jpg"),
    ),
    Case(
        "several-adjacent",
        "./a.png ./b.png which is brighter?",
        ("./a.png", "./b.png"),
        "which is brighter?",
        ("./a.png", "./b.png"),
    ),
    Case(
        "trailing-question-mark",
        "what is in ./smile.png?",
        ("./smile.png",),
        "what is in?",
        ("./smile.png",),
    ),
    Case("trailing-period", "Describe ./a.png.", ("./a.png",), "Describe.", ("./a.png",)),
    Case(
        "parenthesised",
        "the photo (./a.png) shows",
        ("./a.png",),
        "the photo () shows",
        ("./a.png",),
    ),
    Case("brackets-in-name", "see (1).png", ("(1).png",), "see", ("(1).png",)),
    Case(
        "prose-word-missing",
        "I like image.png files",
        (),
        "I like image.png files",
        missing=("image.png",),
    ),
    Case(
        "missing-relative", "what is ./nope.png", (), "what is ./nope.png", missing=("./nope.png",)
    ),
    Case("missing-with-punct", "is it nope.png?", (), "is it nope.png?", missing=("nope.png",)),
    Case(
        "one-missing-one-found",
        "a.png and b.png",
        ("a.png",),
        "and b.png",
        ("a.png",),
        missing=("b.png",),
    ),
    Case("backticks-are-prose", "rename `image.png` please", (), "rename `image.png` please"),
    Case("extension-alone-is-prose", "I prefer .png over .jpg", (), "I prefer .png over .jpg"),
    Case("glob-is-prose", "convert *.png to webp", (), "convert *.png to webp"),
    Case("no-extension", "what is ./photo and /tmp/x", (), "what is ./photo and /tmp/x"),
    Case(
        "apostrophes-stay-prose",
        "it's Bob's ./a.png isn't it",
        ("./a.png",),
        "it's Bob's isn't it",
        ("./a.png",),
    ),
    Case(
        "quoted-prose-untouched",
        'he said "hello there" to ./a.png',
        ("./a.png",),
        'he said "hello there" to',
        ("./a.png",),
    ),
    Case(
        "multiline",
        "first line\n./a.png\nsecond line",
        ("./a.png",),
        "first line\n\nsecond line",
        ("./a.png",),
    ),
    Case(
        "web-url",
        "what is https://example.com/cat.png",
        (),
        "what is https://example.com/cat.png",
        urls=("https://example.com/cat.png",),
    ),
    Case("duplicate-path", "./a.png vs ./a.png", ("./a.png",), "vs", ("./a.png", "./a.png")),
    Case("only-image", "./a.png", ("./a.png",), "", ("./a.png",)),
    Case("not-a-path-text", "hello world", (), "hello world"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_find_images(case: Case) -> None:
    files = set(case.files)
    parsed = find_images(
        case.message, exists=files.__contains__, expanduser=_expand, windows=case.windows
    )
    assert [m.path for m in parsed.images] == list(case.images)
    assert [m.display for m in parsed.missing] == list(case.missing)
    assert [m.display for m in parsed.urls] == list(case.urls)
    if parsed.ok:
        assert parsed.text == case.text
    assert parsed.ok == (not case.missing and not case.urls)


def test_enough_cases() -> None:
    assert len(CASES) >= 30


def test_display_keeps_what_the_user_typed() -> None:
    parsed = find_images("see ~/x.png", exists=lambda p: p == f"{HOME}/x.png", expanduser=_expand)
    (img,) = parsed.images
    assert img.display == "~/x.png"
    assert img.path == f"{HOME}/x.png"
    parsed = find_images(r"my\ photo.png", exists=lambda p: True)
    assert parsed.images[0].display == "my photo.png"


def test_spans_point_at_the_typed_path() -> None:
    msg = "look 'a b.png' now"
    parsed = find_images(msg, exists=lambda p: True)
    (img,) = parsed.images
    assert msg[img.start : img.end] == "'a b.png'"


def test_extension_helper() -> None:
    assert has_image_extension("x.PNG")
    assert not has_image_extension(".png")
    assert not has_image_extension("png")
    assert not has_image_extension("x.pngs")


def test_real_filesystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my photo (1).png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    parsed = find_images(r"what is my\ photo\ \(1\).png", windows=False)
    assert [m.path for m in parsed.images] == ["my photo (1).png"]
    assert parsed.text == "what is"
