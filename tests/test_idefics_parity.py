"""IDEFICS v1 on libmmvision (issue 18): the converted tiny fixture through mmchat's own
cross-attention decoder against transformers' goldens (tests/fixtures/idefics): pixels,
Perceiver rows, logits at every position of prompts with 0, 1, 2 (and adjacent) images and
text after </s>, greedy tokens through llama.cpp's sampler chain, q8_0 top-1, the tokenizer
(libllama vocab-only) against transformers' ids, KV reuse after truncation; bad files -> one
clear error."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.decoder import needs_decoder

from mmchat.errors import UserError
from mmchat.vision.image import load_image
from mmchat.vision.synthetic import rel_l2

ROOT = Path(__file__).parent / "fixtures" / "idefics"
PROMPTS = ["text_only", "one_image", "two_images", "adjacent_images", "after_eos"]


pytestmark = needs_decoder


@cache
def goldens() -> tuple[dict[str, Any], Any]:
    return json.loads((ROOT / "goldens.json").read_text()), np.load(ROOT / "goldens.npz")


_files: dict[str, tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idefics-parity")


def files(outdir: Path, quant: str = "f32") -> tuple[Path, Path]:
    if quant not in _files:
        from mmchat.converters import convert

        r = convert(ROOT / "idefics_tiny", outdir=outdir / quant, quant=quant, vision_quant="f32")
        _files[quant] = (r.model_path, r.mmproj_path)
    return _files[quant]


@pytest.fixture(scope="module")
def runtime(outdir: Path) -> Any:
    from mmchat.runtime.flamingo import IdeficsRuntime

    text, mmproj = files(outdir)
    rt = IdeficsRuntime.open(text, mmproj, n_ctx=128, n_batch=16, n_threads=2, device="cpu")
    yield rt
    rt.close()


def latents(names: list[str]) -> list[np.ndarray]:
    _, g = goldens()
    return [g[f"image/{n}/latents"] for n in names]


def test_pixels_and_perceiver_rows(runtime: Any) -> None:
    meta, g = goldens()
    for name in meta["images"]:
        img = load_image(ROOT / "images" / f"{name}.png")
        px = runtime.engine.pixels(img)
        assert rel_l2(px, g[f"image/{name}/pixels"]) < 1e-6, name
        rows = runtime.engine.encode(img).embeddings
        assert rows.shape == (6, 48)
        assert rel_l2(rows, g[f"image/{name}/latents"]) < 1e-5, name


@pytest.mark.parametrize("prompt", PROMPTS)
def test_final_logits_match_transformers(runtime: Any, prompt: str) -> None:
    meta, g = goldens()
    p = meta["prompts"][prompt]
    logits = runtime.evaluate_ids(p["input_ids"], latents(p["images"]))
    gold = g[f"prompt/{prompt}/logits"][-1]
    assert rel_l2(logits, gold) < 1e-4
    assert int(np.argmax(logits)) == int(np.argmax(gold))


@pytest.mark.parametrize("prompt", ["two_images", "after_eos"])
def test_every_position_token_by_token(runtime: Any, prompt: str) -> None:
    """One token per decode: the KV cache and the media mask (latest image; none after
    </s>) at every position."""
    meta, g = goldens()
    p = meta["prompts"][prompt]
    be = runtime.backend
    be.clear()
    rows = latents(p["images"])
    k = 0
    worst = 0.0
    for i, t in enumerate(p["input_ids"]):
        if t == meta["image_token_id"]:
            be.decode_embeddings(rows[k], i, logits_last=True)
            k += 1
        else:
            be.decode_one(t, i)
        worst = max(worst, rel_l2(be.last_logits(), g[f"prompt/{prompt}/logits"][i]))
    assert worst < 1e-4


def test_images_from_files_end_to_end(runtime: Any) -> None:
    meta, g = goldens()
    p = meta["prompts"]["two_images"]
    rows = [
        runtime.engine.encode(load_image(ROOT / "images" / f"{n}.png")).embeddings
        for n in p["images"]
    ]
    logits = runtime.evaluate_ids(p["input_ids"], rows)
    assert rel_l2(logits, g["prompt/two_images/logits"][-1]) < 1e-4


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_transformers(runtime: Any, prompt: str) -> None:
    from support.sampling import greedy_chain

    meta, _ = goldens()
    p = meta["prompts"][prompt]
    chain = greedy_chain(runtime.vocab)
    try:
        out = runtime.generate(p["input_ids"], latents(p["images"]), 8, chain)
    finally:
        chain.close()
    assert out == p["greedy"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_transformers(runtime: Any, prompt: str) -> None:
    meta, _ = goldens()
    p = meta["prompts"][prompt]
    ids = runtime.vocab.tokenize(p["text"], add_special=False, parse_special=True)
    assert ids == p["input_ids"]


def test_truncate_keeps_the_prefix_and_drops_later_images(runtime: Any) -> None:
    meta, g = goldens()
    p = meta["prompts"]["two_images"]
    ids = p["input_ids"]
    rows = latents(p["images"])
    runtime.prefill(ids, rows)
    be = runtime.backend
    assert be.ctx.n_images() == 2 and be.pos_max() == len(ids) - 1
    second = [i for i, t in enumerate(ids) if t == meta["image_token_id"]][1]
    be.truncate(second)
    assert be.ctx.n_images() == 1 and be.pos_max() == second - 1
    be.decode_embeddings(rows[1], second, logits_last=False)
    be.decode_tokens(np.asarray(ids[second + 1 :]), second + 1, logits_last=True)
    assert rel_l2(be.last_logits(), g["prompt/two_images/logits"][-1]) < 1e-4


def test_q8_0_keeps_the_top_token(outdir: Path) -> None:
    from mmchat.runtime.flamingo import IdeficsRuntime

    meta, g = goldens()
    text, mmproj = files(outdir, "q8_0")
    rt = IdeficsRuntime.open(text, mmproj, n_ctx=128, n_threads=2, device="cpu")
    try:
        for name in PROMPTS:
            p = meta["prompts"][name]
            logits = rt.evaluate_ids(p["input_ids"], latents(p["images"]))
            gold = g[f"prompt/{name}/logits"][-1]
            assert int(np.argmax(logits)) == int(np.argmax(gold)), name
            assert rel_l2(logits, gold) < 5e-2, name
    finally:
        rt.close()


def test_bad_files_give_one_clear_error(outdir: Path, tmp_path: Path) -> None:
    from mmchat.errors import CorruptFileError
    from mmchat.runtime.flamingo import FlamingoBackend

    text, mmproj = files(outdir)
    kw: dict[str, Any] = {"n_ctx": 64, "image_token": 513, "eos_token": 2, "n_image_rows": 6}
    with pytest.raises(CorruptFileError, match="IDEFICS: 'llama'"):
        FlamingoBackend(mmproj, **kw)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(text.read_bytes()[: text.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        FlamingoBackend(cut, **kw)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(CorruptFileError, match="not a GGUF"):
        FlamingoBackend(junk, **kw)


def test_image_misuse_is_refused(runtime: Any) -> None:
    be = runtime.backend
    be.clear()
    rows = latents(["landscape"])[0]
    be.add_image(rows, 3)
    with pytest.raises(UserError, match="already registered"):
        be.add_image(rows, 3)
    with pytest.raises(ValueError, match="neither image rows"):
        be.decode_embeddings(np.zeros((2, 7), np.float32), 4, logits_last=True)
    with pytest.raises(UserError, match="image rows"):
        be.add_image(np.zeros((7, 48), np.float32), 5)  # more rows than an image has
    be.clear()
    assert be.ctx.n_images() == 0


def test_two_sequences_in_one_context(outdir: Path) -> None:
    """Parallel serving: each sequence has its own cache cells and images; one mixed batch
    decodes the last token of both."""
    from mmchat.runtime.flamingo import FlamingoBackend

    meta, g = goldens()
    text, _ = files(outdir)
    be = FlamingoBackend(
        text,
        n_ctx=64,
        n_seq=2,
        n_threads=2,
        device="cpu",
        image_token=513,
        eos_token=2,
        n_image_rows=6,
    )
    try:
        names = ["one_image", "two_images"]
        last, pos = [], []
        for s, name in enumerate(names):
            p = meta["prompts"][name]
            ids, rows, k = p["input_ids"], latents(p["images"]), 0
            for i, t in enumerate(ids[:-1]):
                if t == meta["image_token_id"]:
                    be.decode_embeddings(rows[k], i, logits_last=False, seq_id=s)
                    k += 1
                else:
                    be.decode_tokens(np.asarray([t]), i, logits_last=False, seq_id=s)
            last.append(ids[-1])
            pos.append(len(ids) - 1)
        be.decode_mixed(
            np.asarray(last), np.asarray(pos), np.asarray([0, 1]), np.asarray([True, True])
        )
        for s, name in enumerate(names):
            assert rel_l2(be.logits_at(s), g[f"prompt/{name}/logits"][-1]) < 1e-4, name
        assert be.ctx.n_images(0) == 1 and be.ctx.n_images(1) == 2
    finally:
        be.close()


def test_vocab_only_tokenizer(runtime: Any) -> None:
    v = runtime.vocab
    assert (v.n_vocab, v.n_embd, v.bos, v.eos) == (514, 64, 1, 2)
    assert v.special_tokens()["<image>"] == 513
    assert "User:" in (v.chat_template() or "")
    assert v.meta("mmchat.tokenizer.legacy_spaces") == "true"
    assert v.is_eog(2) and not v.is_eog(513)


def test_float_gates_no_qk_norms_no_perceiver(tmp_path: Path) -> None:
    """The published configuration's other paths: scalar tanh gates, no qk norms,
    use_resampler False (all 1 + n_patches ViT rows reach the cross-attention), and an
    instruct tokenizer with <end_of_utterance>."""
    from mmchat.converters import convert
    from support.sampling import greedy_chain

    from mmchat.runtime.flamingo import IdeficsRuntime

    meta, g = goldens()
    r = convert(ROOT / "idefics_float", outdir=tmp_path, quant="f32", vision_quant="f32")
    rt = IdeficsRuntime.open(r.model_path, r.mmproj_path, n_ctx=96, n_threads=2, device="cpu")
    try:
        assert rt.engine.info.n_tokens == 10 and rt.backend.info.n_cross == 1
        # an instruct tokenizer: <end_of_utterance> ends turns and generation
        assert rt.vocab.n_vocab == 515 and rt.vocab.is_eog(514)
        assert "<end_of_utterance>\\n" in (rt.vocab.chat_template() or "")
        for name in meta["images"]:
            rows = rt.engine.encode(load_image(ROOT / "images" / f"{name}.png")).embeddings
            assert rel_l2(rows, g[f"float/image/{name}/rows"]) < 1e-5, name
        for name, p in meta["float_prompts"].items():
            img_rows = [g[f"float/image/{n}/rows"] for n in p["images"]]
            logits = rt.evaluate_ids(p["input_ids"], img_rows)
            assert rel_l2(logits, g[f"float/prompt/{name}/logits"][-1]) < 1e-4, name
            chain = greedy_chain(rt.vocab)
            try:
                assert rt.generate(p["input_ids"], img_rows, 8, chain) == p["greedy"], name
            finally:
                chain.close()
    finally:
        rt.close()


def test_open_vision_routes_idefics_and_caches_rows(outdir: Path) -> None:
    from mmchat.runtime.flamingo import IdeficsEngine
    from mmchat.vision import open_vision
    from mmchat.vision.cache import EmbeddingCache
    from mmchat.vision.layout import EmbedSpan, TextSpan

    _, mmproj = files(outdir)
    eng = open_vision(mmproj, text_n_embd=64, n_threads=2, device="cpu", cache=EmbeddingCache())
    try:
        assert isinstance(eng, IdeficsEngine)
        img = load_image(ROOT / "images" / "portrait.png")
        first, again = eng.encode(img), eng.encode(img)
        assert not first.cached and again.cached and eng.encode_count == 1
        np.testing.assert_array_equal(first.embeddings, again.embeddings)
        # the <image> token (one position, 6 rows) then <fake_token_around_image>
        assert tuple(first.layout) == (EmbedSpan(6, 1), TextSpan((512,)))
    finally:
        eng.close()
    with pytest.raises(UserError, match="mmvision only"):
        open_vision(mmproj, text_n_embd=64, engine="mtmd")


def test_open_parts_for_the_loader(outdir: Path) -> None:
    """The loader's entry point: f16 KV (close to f32), timings, and its checks."""
    from mmchat.gguf_meta import read_gguf
    from mmchat.runtime.flamingo import is_flamingo, open_parts

    meta, g = goldens()
    text, mmproj = files(outdir)
    assert is_flamingo(read_gguf(mmproj, role="projector"))
    with pytest.raises(UserError, match="f32 or f16"):
        open_parts(text, mmproj, n_ctx=64, kv_cache_type="q8_0")
    vocab, be, eng = open_parts(
        text, mmproj, n_ctx=64, n_seq=2, n_threads=2, device="cpu", kv_cache_type="f16"
    )
    try:
        p = meta["prompts"]["one_image"]
        ids = p["input_ids"]
        k = ids.index(meta["image_token_id"])
        be.decode_tokens(np.asarray(ids[:k]), 0, logits_last=False, seq_id=1)
        be.decode_embeddings(latents(p["images"])[0], k, logits_last=False, seq_id=1)
        be.decode_tokens(np.asarray(ids[k + 1 :]), k + 1, logits_last=True, seq_id=1)
        assert rel_l2(be.last_logits(), g["prompt/one_image/logits"][-1]) < 2e-3
        perf = be.perf()
        assert perf["n_prompt_eval"] == len(ids) and perf["n_eval"] == 0
        assert be.pos_max(1) == len(ids) - 1 and be.pos_max(0) == -1
    finally:
        be.close()
        vocab.close()
        eng.close()


def test_bad_projector_files(outdir: Path, tmp_path: Path) -> None:
    from mmchat.errors import CorruptFileError
    from mmchat.runtime.flamingo import IdeficsEngine

    text, mmproj = files(outdir)
    with pytest.raises(CorruptFileError, match="not a projector"):
        IdeficsEngine(text, device="cpu")
    cut = tmp_path / "mmproj-cut.gguf"
    cut.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size * 2 // 3])
    with pytest.raises(CorruptFileError):
        IdeficsEngine(cut, device="cpu")
