"""Every mtmd family through mmchat, as a user runs it, against llama.cpp's own path.

The fixtures (tests/fixtures/mtmd/, made by make_mtmd_fixtures.py) are tiny random
checkpoints of each family built with transformers' own classes and converted by the
llama.cpp converter of the pinned llama-cpp-python. For each family:

- last-position logits of ``LoadedModel.evaluate`` (the chat path: the GGUF's own template,
  the image where the template puts it) equal llama.cpp's own ``mtmd_tokenize`` +
  ``mtmd_helper_eval_chunks`` on the same prompt text (f32 KV cache, no flash attention):
  rel L2 <= 1e-5 and the same top-1, with one image and with two; transformers' logits are
  printed beside them (how faithful mtmd itself is; not judged);
- ``Evaluation.segments`` replay to the same logits (non-M-RoPE families);
- a two-turn conversation reuses the KV prefix, encodes no image twice, and lands on the same
  logits as evaluating the whole conversation from scratch (M-RoPE positions continue right);
- bad input: a projector of another family, a truncated projector, audio given to a vision
  model and a non-audio file given as audio: one clear error each.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.runtime import LoadOptions, Message, SamplingParams
from mmchat.runtime.loader import load_model
from mmchat.vision import load_image
from mmchat.vision.audio import load_audio

FIX = Path(__file__).resolve().parent / "fixtures" / "mtmd"
MANIFEST: dict[str, Any] = (
    json.loads((FIX / "manifest.json").read_text()) if (FIX / "manifest.json").exists() else {}
)
FAMILIES: dict[str, Any] = {
    name: fam
    for name, fam in MANIFEST.get("families", {}).items()
    if (FIX / fam["files"]["model"]).exists() and (FIX / fam["files"]["mmproj"]).exists()
}
VISION = sorted(n for n, f in FAMILIES.items() if f.get("kind", "vision") in ("vision", "both"))
AUDIO = sorted(n for n, f in FAMILIES.items() if f.get("kind") in ("audio", "both"))
MEDIA = {k: FIX / v for k, v in MANIFEST.get("media", {}).items()}
SQUARE = MEDIA.get("square", FIX / "images" / "square.png")
WIDE = MEDIA.get("wide", FIX / "images" / "wide.png")
TONE = MEDIA.get("tone", FIX / "images" / "tone.wav")
MARKER_RE = re.compile(r"<\|mmchat-image-\d+\|>")
PARITY = LoadOptions(n_ctx=4096, n_batch=512, n_threads=2, kv_cache_type="f32", flash_attn=False)


def files(family: str) -> tuple[Path, Path]:
    f = FAMILIES[family]["files"]
    return FIX / f["model"], FIX / f["mmproj"]


@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, Any]]:
    cache: dict[str, Any] = {}
    yield cache
    for lm in cache.values():
        lm.close()


def model_of(models: dict[str, Any], family: str) -> Any:
    if family not in models:
        models[family] = load_model(*files(family), PARITY)
    return models[family]


def reference(lm: Any, family: str, messages: list[Message], media: list[Path]) -> Any:
    """llama.cpp's own path on the prompt text mmchat rendered (mtmd's marker per item)."""
    from support.mtmd_ref import MARKER, mtmd_reference

    text = MARKER_RE.sub(MARKER, lm.render(messages))
    bos = lm.template.bos_token
    starts_with_bos = bool(bos) and text.startswith(bos)
    return mtmd_reference(
        *files(family), text, media, add_special=not starts_with_bos, n_batch=lm.ctx.n_batch
    )


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def transformers_note(family: str, logits: np.ndarray) -> str:
    golden = FIX / family / "golden.npz"
    if not golden.exists():
        return "no transformers golden"
    with np.load(golden) as z:
        want = z["logits"].reshape(-1)
    if want.shape != logits.shape:
        return f"transformers golden has {want.shape[0]} logits"
    return f"transformers vs mmchat (prompt may differ in wrappers): {rel_l2(logits, want):.2e}"


def check_parity(ours: np.ndarray, ref: np.ndarray, family: str, what: str) -> None:
    err = rel_l2(ours, ref)
    print(
        f"{family} {what}: mmchat vs llama.cpp mtmd rel L2 {err:.2e}; "
        f"{transformers_note(family, ours)}"
    )
    assert err <= 1e-5, f"{family} {what}: rel L2 {err}"
    assert int(ours.argmax()) == int(ref.argmax())


# ------------------------------------------------------------------------------ parity
pytestmark = pytest.mark.skipif(not FAMILIES, reason="no mtmd fixtures (make_mtmd_fixtures.py)")


@pytest.mark.parametrize("family", VISION)
def test_one_image_matches_llama_cpp(models: dict[str, Any], family: str) -> None:
    lm = model_of(models, family)
    msgs = [Message("user", "What is in this image?", [load_image(SQUARE)])]
    ev = lm.evaluate(msgs)
    ref = reference(lm, family, msgs, [SQUARE])
    check_parity(ev.logits, ref.logits, family, "one image")
    # the sequence as decoded: the same tokens and rows, in the same chunks
    ours = [("text", len(s)) if isinstance(s, list) else ("media", s.shape[0]) for s in ev.segments]
    theirs = [("text" if c.kind == "text" else "media", c.n_tokens) for c in ref.chunks]
    assert ours == theirs
    assert ev.token_ids == [t for c in ref.chunks if c.kind == "text" for t in c.tokens]
    assert lm.kv_tokens == sum(c.n_tokens for c in ref.chunks)
    assert lm.next_pos == sum(c.n_pos for c in ref.chunks)
    if not FAMILIES[family].get("mrope"):
        replay = lm.evaluate_ids(ev.segments, non_causal=lm.vision.projector_type == "gemma3")
        assert rel_l2(replay.logits, ev.logits) <= 1e-6


@pytest.mark.parametrize("family", VISION)
def test_two_images_match_llama_cpp(models: dict[str, Any], family: str) -> None:
    lm = model_of(models, family)
    msgs = [Message("user", "Compare these.", [load_image(SQUARE), load_image(WIDE)])]
    ev = lm.evaluate(msgs)
    ref = reference(lm, family, msgs, [SQUARE, WIDE])
    check_parity(ev.logits, ref.logits, family, "two images")
    assert len(ev.image_embeddings) == 2


@pytest.mark.parametrize("family", AUDIO)
def test_audio_matches_llama_cpp(models: dict[str, Any], family: str) -> None:
    lm = model_of(models, family)
    assert lm.has_audio
    msgs = [Message("user", "What do you hear?", [load_audio(TONE)])]
    ev = lm.evaluate(msgs)
    ref = reference(lm, family, msgs, [TONE])
    check_parity(ev.logits, ref.logits, family, "audio")


@pytest.mark.parametrize("family", VISION + AUDIO)
def test_two_turns_reuse_the_prefix(models: dict[str, Any], family: str) -> None:
    lm = model_of(models, family)
    media = load_audio(TONE) if family in AUDIO else load_image(SQUARE)
    lm.reset()
    chat = lm.session(params=SamplingParams(temperature=0, max_tokens=3, seed=1))
    chat.ask("Describe it.", [media])
    encodes = lm.vision.encode_count
    chat.ask("And then?")
    stats = chat.last_stats
    assert stats is not None
    assert lm.vision.encode_count == encodes  # the image was not encoded again
    assert 0 < stats.prompt_eval_tokens < stats.prompt_tokens
    assert stats.cached_tokens == stats.prompt_tokens - stats.prompt_eval_tokens
    # the reused context holds what a fresh evaluation of the same prompt holds
    msgs = chat.messages[:-1]
    items = lm.build_prompt(msgs)
    with lm.lock:
        lm.run_prompt(items)
        reused = lm.logits()
    fresh = lm.evaluate(msgs)
    assert rel_l2(reused, fresh.logits) <= 1e-4
    assert int(reused.argmax()) == int(fresh.logits.argmax())


# ------------------------------------------------------------------------------ bad input
def test_projector_of_another_model_is_one_clear_error(tmp_path: Path) -> None:
    """A projector made for a model of another width (all fixtures here share one width, so a
    Gemma 3 projector for a 72-wide model stands in for "another model")."""
    from test_vision_engine import write_gemma3_mmproj

    model, _ = files("gemma3" if "gemma3" in FAMILIES else VISION[0])
    other = write_gemma3_mmproj(tmp_path / "other.gguf", 72)
    with pytest.raises(UserError) as err:
        load_model(model, other, LoadOptions(n_ctx=512, n_threads=1))
    assert "\n" not in str(err.value) and "cannot load projector" in str(err.value)
    print(err.value)


def test_truncated_projector_is_one_clear_error(tmp_path: Path) -> None:
    family = (VISION or AUDIO)[0]
    model, mmproj = files(family)
    cut = tmp_path / "mmproj.gguf"
    cut.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size // 2])
    with pytest.raises(UserError, match=r"truncated|corrupt|cannot"):
        load_model(model, cut, LoadOptions(n_ctx=512, n_threads=1))


def test_non_audio_file_given_as_audio(tmp_path: Path) -> None:
    fake = tmp_path / "song.wav"
    fake.write_bytes(SQUARE.read_bytes())
    with pytest.raises(UserError, match="not an audio file"):
        load_audio(fake)
    with pytest.raises(UserError, match="empty"):
        load_audio(b"")


@pytest.mark.parametrize("family", VISION[:1])
def test_audio_to_a_vision_model_is_refused(models: dict[str, Any], family: str) -> None:
    lm = model_of(models, family)
    with pytest.raises(UserError, match="cannot hear audio"):
        lm.evaluate([Message("user", "Listen.", [load_audio(TONE)])])


@pytest.mark.parametrize("family", AUDIO[:1])
def test_image_to_an_audio_model_is_refused(models: dict[str, Any], family: str) -> None:
    lm = model_of(models, family)
    if lm.has_vision:
        pytest.skip("this audio family also sees")
    with pytest.raises(UserError, match="cannot see images"):
        lm.evaluate([Message("user", "Look.", [load_image(SQUARE)])])


@pytest.mark.parametrize("family", VISION[:1])
def test_image_over_the_pixel_limit(models: dict[str, Any], family: str) -> None:
    with pytest.raises(UserError, match="pixels"):
        load_image(WIDE, max_pixels=100)


@pytest.mark.parametrize("family", VISION)
def test_tiny_and_extreme_images_work_or_fail_cleanly(
    models: dict[str, Any], family: str, tmp_path: Path
) -> None:
    """A 1×1 image and a 1×300 strip: mtmd resizes them for the family, or refuses with one
    line; either way the model answers the next message."""
    from PIL import Image

    lm = model_of(models, family)
    for size in ((1, 1), (1, 300)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        Image.new("RGB", size, (200, 30, 30)).save(path)
        try:
            ev = lm.evaluate([Message("user", "What is it?", [load_image(path)])])
            assert np.isfinite(ev.logits).all()
        except UserError as exc:
            assert "\n" not in str(exc)
    ok = lm.evaluate([Message("user", "What is it?", [load_image(SQUARE)])])
    assert np.isfinite(ok.logits).all()


def test_pixtral_break_rows_left_nan_by_llama_cpp_are_repaired() -> None:
    """mtmd's Pixtral graph computes [IMG_BREAK] rows as 0 * (uninitialised memory) +
    img_break, which is NaN when that memory holds one; mmchat puts img_break back."""
    from mmchat.vision.mtmd import repair_image_breaks

    rng = np.random.default_rng(0)
    brk = rng.normal(size=8).astype(np.float32)
    rows = rng.normal(size=(19, 8)).astype(np.float32)  # 4 rows of 4 patches + 3 breaks
    breaks = [4, 9, 14]
    rows[breaks] = brk
    good = rows.copy()
    rows[9] = np.nan
    assert np.array_equal(repair_image_breaks(rows, brk), good)
    elsewhere = good.copy()
    elsewhere[3] = np.nan  # a patch row: not ours to guess
    assert np.isnan(repair_image_breaks(elsewhere, brk)[3]).all()
    assert repair_image_breaks(good, brk) is good
