"""OpenFlamingo (issue 18) end to end: the tiny fixture (tests/fixtures/openflamingo, built
from open_flamingo's own classes) converted from its release layout (checkpoint.pt + base
GPT-NeoX folder + open_clip tower), run on libmmvision's cross-attention decoder against
open_flamingo's goldens: pixels, Perceiver rows per image, last-position logits with 0, 1 and
2 images (and text before the first image), 8 greedy tokens, q8_0 top-1, the tokenizer,
``mmchat convert`` + ``mmchat run`` with an image; bad files -> one clear error.

checkpoint.pt is a PyTorch file (read with ``torch.load(weights_only=True)``): the tests
that convert need torch and skip without it. Without torch, the runtime tests run on the f32
files committed under tests/fixtures/openflamingo/gguf (GPT-NeoX and MPT; made by
convert_openflamingo_fixtures.py), and with torch a fresh conversion must equal them."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.decoder import needs_decoder

from mmchat.errors import UserError
from mmchat.vision.image import load_image
from mmchat.vision.synthetic import rel_l2

ROOT = Path(__file__).parent / "fixtures" / "openflamingo"
RELEASE = ROOT / "of_tiny"
TOWER = RELEASE / "clip"
# base LLM -> (release folder, goldens stem): GPT-NeoX (OpenFlamingo-4B's RedPajama-INCITE,
# gated blocks every 2 layers) and MPT (OpenFlamingo-9B's, every 4; its tower via --vision-tower)
VARIANTS = {
    "neox": (RELEASE, "goldens"),
    "mpt": (ROOT / "of_mpt", "goldens_mpt"),
    # OpenFlamingo-3B's MosaicGPT (MPT-1B): qk LayerNorms, biases, a block before every layer
    "mpt1b": (ROOT / "of_mpt1b", "goldens_mpt1b"),
    # of_tiny with use_parallel_residual (Pythia's GPT-NeoX; RedPajama-INCITE has it off):
    # same weights, its own goldens; the release is of_tiny with a patched config.json
    "neox_parallel": (RELEASE, "goldens_parallel"),
}
PROMPTS = ["text_only", "one_image", "two_images", "text_before_image", "after_eoc"]
# f32 conversions committed for the default suite (no torch): variant -> folder
COMMITTED = {"neox": ROOT / "gguf" / "neox", "mpt": ROOT / "gguf" / "mpt"}
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not HAS_TORCH, reason="checkpoint.pt is a PyTorch file: converting it needs torch"
)


pytestmark = needs_decoder


@cache
def goldens(variant: str = "neox") -> tuple[dict[str, Any], Any]:
    stem = VARIANTS[variant][1]
    return json.loads((ROOT / f"{stem}.json").read_text()), np.load(ROOT / f"{stem}.npz")


_files: dict[tuple[str, str], tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openflamingo")


def release(outdir: Path, variant: str) -> Path:
    """The release folder of a variant (neox_parallel: a patched copy of of_tiny)."""
    folder = VARIANTS[variant][0]
    if variant != "neox_parallel":
        return folder
    copy = outdir / "release-parallel"
    if not copy.exists():
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("clip*"))
        cfg_path = copy / "neox_base" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["use_parallel_residual"] = True
        cfg_path.write_text(json.dumps(cfg))
    return copy


def files(outdir: Path, quant: str = "f32", variant: str = "neox") -> tuple[Path, Path]:
    """The variant's files: converted here with torch, else the committed f32 pair."""
    if not HAS_TORCH:
        if quant != "f32" or variant not in COMMITTED:
            pytest.skip("checkpoint.pt is a PyTorch file: converting it needs torch")
        return COMMITTED[variant] / "text.gguf", COMMITTED[variant] / "mmproj.gguf"
    if (quant, variant) not in _files:
        from mmchat.converters import convert

        r = convert(
            release(outdir, variant),
            outdir=outdir / variant / quant,
            quant=quant,
            vision_quant="f32",
            vision_tower=TOWER,
        )
        _files[quant, variant] = (r.model_path, r.mmproj_path)
    return _files[quant, variant]


def open_runtime(text: Path, mmproj: Path) -> Any:
    from mmchat.runtime.flamingo import IdeficsRuntime

    return IdeficsRuntime.open(text, mmproj, n_ctx=64, n_batch=8, n_threads=2, device="cpu")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def runtime(outdir: Path, variant: str) -> Any:
    rt = open_runtime(*files(outdir, variant=variant))
    rt.variant = variant
    yield rt
    rt.close()


def rows_of(rt: Any, names: list[str]) -> list[np.ndarray]:
    out = []
    for n in names:
        img = load_image(ROOT / "images" / f"{n}.png")
        out.append(rt.engine.model.encode(rt.engine.pixels(img)[None])[0])
    return out


def test_pixels_and_perceiver_rows(runtime: Any) -> None:
    _, g = goldens(runtime.variant)
    for name in ("landscape", "portrait"):
        img = load_image(ROOT / "images" / f"{name}.png")
        px = runtime.engine.pixels(img)
        assert np.abs(px - g[f"pixels_{name}"]).max() < 2e-5
        rows = runtime.engine.model.encode(g[f"pixels_{name}"][None])[0]
        ref = g[f"perceiver_{name}"]
        assert rows.shape == ref.shape == (64, 32)
        assert np.abs(rows - ref).max() < 2e-3, name


@pytest.mark.parametrize("name", PROMPTS)
def test_final_logits_match_open_flamingo(runtime: Any, name: str) -> None:
    meta, g = goldens(runtime.variant)
    p = meta["prompts"][name]
    logits = runtime.evaluate_ids(p["ids"], rows_of(runtime, p["images"]))
    ref = g[f"logits_{name}"]
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() < 2e-3, (name, float(np.abs(logits - ref).max()))


def test_images_change_the_answer(runtime: Any) -> None:
    """The gated cross-attention is live: another image (same prompt) moves the logits."""
    meta, _ = goldens(runtime.variant)
    p = meta["prompts"]["one_image"]
    a = runtime.evaluate_ids(p["ids"], rows_of(runtime, ["landscape"])).copy()
    b = runtime.evaluate_ids(p["ids"], rows_of(runtime, ["portrait"])).copy()
    assert rel_l2(a, b) > 1e-3  # 0 when the gated path is dead


@pytest.mark.parametrize("name", ["one_image", "two_images"])
def test_greedy_tokens_match(runtime: Any, name: str) -> None:
    from support.sampling import greedy_chain

    meta, _ = goldens(runtime.variant)
    p = meta["prompts"][name]
    chain = greedy_chain(runtime.vocab)
    try:
        got = runtime.generate(p["ids"], rows_of(runtime, p["images"]), 8, chain)
    finally:
        chain.close()
    want = p["greedy"]
    if meta["eoc_token"] in want:  # generation stops at <|endofchunk|>
        want = want[: want.index(meta["eoc_token"]) + 1]
    assert got == want


def test_tokenizer_matches(runtime: Any) -> None:
    meta, _ = goldens(runtime.variant)
    for name in PROMPTS:
        p = meta["prompts"][name]
        assert runtime.vocab.tokenize(p["text"], add_special=False, parse_special=True) == p["ids"]
    assert runtime.vocab.is_eog(meta["eoc_token"])
    assert runtime.vocab.is_eog(runtime.vocab.tokenize("<|endoftext|>", add_special=False)[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_q8_0_keeps_top1(outdir: Path, variant: str) -> None:
    """q8_0 weights: logits close to open_flamingo's and the same top-1 wherever the golden's
    top two are not a near tie (a random tiny model has some: text_only's margin is 0.009)."""
    meta, g = goldens(variant)
    rt = open_runtime(*files(outdir, "q8_0", variant))
    checked = 0
    try:
        for name in PROMPTS:
            p = meta["prompts"][name]
            logits = rt.evaluate_ids(p["ids"], rows_of(rt, p["images"]))
            ref = g[f"logits_{name}"]
            assert rel_l2(logits, ref) < 0.05, name
            top2 = np.sort(ref)[-2:]
            if top2[1] - top2[0] > 0.05:
                assert int(np.argmax(logits)) == int(np.argmax(ref)), name
                checked += 1
    finally:
        rt.close()
    assert checked >= 3


@needs_torch
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_convert_and_run_cli(tmp_path: Path, variant: str) -> None:
    """What a user does: mmchat convert on the release folder (the MPT one names its tower
    with --vision-tower and its base with --llm), mmchat run with an image."""
    from typer.testing import CliRunner

    from mmchat.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    folder = release(tmp_path, variant)
    args = ["convert", str(folder), "--outdir", str(out), "--quant", "f32"]
    if variant != "neox":
        base = "neox_base" if variant == "neox_parallel" else f"{variant}_base"
        args += ["--vision-tower", str(TOWER), "--llm", str(folder / base)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    text = next(out.glob(f"{folder.name}-*.gguf"))
    mmproj = next(out.glob("mmproj-*.gguf"))
    img = tmp_path / "img.png"
    shutil.copy(ROOT / "images" / "landscape.png", img)
    args = ["run", str(text), "--mmproj", str(mmproj), f"An image of a cat {img}"]
    res = runner.invoke(app, [*args, "--max-tokens", "4", "--temperature", "0"])
    assert res.exit_code == 0, res.output


def test_template_writes_completion_chunks(outdir: Path) -> None:
    """A conversation renders as open_flamingo's interleaved chunks: few-shot examples are
    user + assistant turns, the query a last user turn (no generation prompt)."""
    from mmchat.runtime.loader import load_model

    text, mmproj = files(outdir)
    m = load_model(text, mmproj=mmproj)
    try:
        img = ROOT / "images" / "landscape.png"
        msgs: list[dict[str, Any]] = [
            {"role": "user", "content": "An image of", "images": [img]},
            {"role": "assistant", "content": "two cats."},
            {"role": "user", "content": "An image of", "images": [img]},
        ]
        assert m.render(msgs) == (
            "<|mmchat-image-0|>An image of two cats.<|endofchunk|><|mmchat-image-1|>An image of"
        )
        meta, _ = goldens()
        segs = m.prompt_segments(msgs[2:])
        assert [type(s).__name__ for s in segs] == ["ImageSlot", "list"]
        assert segs[1] == meta["prompts"]["one_image"]["ids"][1:5]  # "An image of"
    finally:
        m.close()


@needs_torch
def test_hugging_face_clip_folder_gives_the_same_tower(outdir: Path, tmp_path: Path) -> None:
    """--vision-tower may name a Hugging Face CLIP folder (openai/clip-vit-large-patch14's
    layout) instead of open_clip's weights: the vision file holds the same tensors."""
    from gguf import GGUFReader
    from mmchat.converters import convert

    _, ref_path = files(outdir)
    r = convert(
        RELEASE,
        outdir=tmp_path,
        quant="f32",
        vision_quant="f32",
        vision_tower=RELEASE / "clip_hf",
    )
    ref = {t.name: np.array(t.data) for t in GGUFReader(ref_path).tensors}
    got = {t.name: np.array(t.data) for t in GGUFReader(r.mmproj_path).tensors}
    assert sorted(got) == sorted(ref)
    for name, arr in ref.items():
        assert np.array_equal(got[name], arr), name


OPTS_KW: dict[str, Any] = {"n_ctx": 512, "n_threads": 2, "kv_cache_type": "f32"}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_chat_path_matches_open_flamingo(outdir: Path, variant: str) -> None:
    """load_model picks the cross-attention decoder; a user message with an image is the
    one-image golden prompt ("<image>An image of a cat") and gives its logits."""
    from mmchat.runtime import LoadOptions, Message
    from mmchat.runtime.loader import load_model

    meta, g = goldens(variant)
    p = meta["prompts"]["one_image"]
    with load_model(*files(outdir, variant=variant), LoadOptions(**OPTS_KW)) as lm:
        assert lm.describe()["description"].startswith("openflamingo")
        img = load_image(ROOT / "images" / "landscape.png")
        ev = lm.evaluate([Message("user", "An image of a cat", [img])])
        assert ev.token_ids == [t for t in p["ids"] if t != meta["image_token"]]
        assert rel_l2(ev.logits, g["logits_one_image"]) < 1e-4


def test_two_turns_reuse_the_prefix(outdir: Path) -> None:
    """A second turn reuses the first one's cells (image rows not encoded again) and gives
    what a fresh evaluation of the same conversation gives."""
    from mmchat.runtime import LoadOptions, SamplingParams
    from mmchat.runtime.loader import load_model

    with load_model(*files(outdir), LoadOptions(**OPTS_KW)) as lm:
        chat = lm.session(params=SamplingParams(temperature=0, max_tokens=4, seed=1))
        chat.ask("An image of", [load_image(ROOT / "images" / "landscape.png")])
        encodes = lm.vision.encode_count
        chat.ask("And another", [load_image(ROOT / "images" / "portrait.png")])
        st = chat.last_stats
        assert st is not None and lm.vision.encode_count == encodes + 1
        assert st.cached_tokens > 0 and st.prompt_eval_tokens < st.prompt_tokens
        msgs = chat.messages[:-1]
        with lm.lock:
            lm.run_prompt(lm.build_prompt(msgs))
            reused = lm.logits()
        fresh = lm.evaluate(msgs)
        assert rel_l2(reused, fresh.logits) < 1e-4


def test_server_answers_one_and_two_at_once(outdir: Path, tmp_path: Path) -> None:
    from test_serve import start_server

    from mmchat.runtime import LoadOptions
    from mmchat.store import Store

    model, mmproj = files(outdir)
    store = Store(tmp_path)
    store.register("openflamingo", model=model, mmproj=mmproj)
    image = str(ROOT / "images" / "landscape.png")
    prompts = ["An image of", "A photo of", "It shows", "Look at this:"]
    opts = LoadOptions(**OPTS_KW)

    def ask(srv: Any, text: str) -> str:
        msg = {"role": "user", "content": text, "images": [image]}
        o = {"temperature": 0, "num_predict": 6, "seed": 1}
        return srv.ollama().chat("openflamingo", [msg], options=o).message.content or ""

    one = start_server(store, parallel=1, load_options=opts)
    try:
        alone = [ask(one, p) for p in prompts]
    finally:
        one.stop()
    two = start_server(store, parallel=2, load_options=opts)
    try:
        got: dict[int, str] = {}
        threads = [
            threading.Thread(target=lambda i=i: got.__setitem__(i, ask(two, prompts[i])))
            for i in range(len(prompts))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got.get(i) for i in range(len(prompts))] == alone
    finally:
        two.stop()


@needs_torch
def test_bad_files_give_one_clear_error(tmp_path: Path) -> None:
    from mmchat.converters import convert

    # no base LLM folder
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(RELEASE / "checkpoint.pt", bare / "checkpoint.pt")
    shutil.copytree(RELEASE / "clip", bare / "clip")
    with pytest.raises(UserError, match="base language model folder"):
        convert(bare, outdir=tmp_path / "o1", quant="f32")
    # no CLIP tower
    shutil.rmtree(bare / "clip")
    shutil.copytree(RELEASE / "neox_base", bare / "neox_base")
    with pytest.raises(UserError, match="no CLIP vision tower"):
        convert(bare, outdir=tmp_path / "o2", quant="f32")
    # a checkpoint.pt that is not OpenFlamingo's
    import torch

    shutil.copytree(RELEASE / "clip", bare / "clip")
    torch.save({"something.weight": torch.zeros(2, 2)}, bare / "checkpoint.pt")
    with pytest.raises(UserError, match="not an OpenFlamingo checkpoint"):
        convert(bare, outdir=tmp_path / "o3", quant="f32")
    # a gated block that lost a tensor
    sd = torch.load(RELEASE / "checkpoint.pt", weights_only=True)
    sd.pop("lang_encoder.gpt_neox.layers.1.gated_cross_attn_layer.attn.to_kv.weight")
    torch.save(sd, bare / "checkpoint.pt")
    with pytest.raises(UserError, match="to_kv"):
        convert(bare, outdir=tmp_path / "o4", quant="f32")
    assert not list((tmp_path / "o4").glob("*.gguf"))


@needs_torch
@pytest.mark.parametrize("variant", sorted(COMMITTED))
def test_committed_files_equal_a_fresh_conversion(tmp_path: Path, variant: str) -> None:
    """The default suite's committed GGUFs are what the converter writes today."""
    from support.gguf_compare import assert_same_gguf

    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    from convert_openflamingo_fixtures import convert_variant

    fresh = convert_variant(variant, tmp_path)
    for got_path, name in zip(fresh, ("text.gguf", "mmproj.gguf"), strict=True):
        assert_same_gguf(got_path, COMMITTED[variant] / name)


@pytest.mark.parametrize("variant", sorted(COMMITTED))
def test_mmchat_run_answers_with_the_greedy_reply(tmp_path: Path, variant: str) -> None:
    """`mmchat run text.gguf --mmproj mmproj.gguf "An image of ./img.png"` prints what a
    greedy in-process session answers (on the committed files: no torch needed)."""
    from mmchat.runtime import LoadOptions, SamplingParams
    from mmchat.runtime.loader import load_model

    text, mmproj = COMMITTED[variant] / "text.gguf", COMMITTED[variant] / "mmproj.gguf"
    shutil.copy(ROOT / "images" / "portrait.png", tmp_path / "img.png")
    run = subprocess.run(
        [
            *(sys.executable, "-m", "mmchat", "run", str(text), "--mmproj", str(mmproj)),
            *("--max-tokens", "6", "--temperature", "0", "An image of ./img.png"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**__import__("os").environ, "MMCHAT_HOME": str(tmp_path / "home")},
    )
    assert run.returncode == 0, run.stderr
    assert "Added image './img.png'" in run.stderr
    with load_model(text, mmproj, LoadOptions(n_threads=2)) as lm:
        chat = lm.session(params=SamplingParams(temperature=0, max_tokens=6, seed=1))
        reply = chat.ask("An image of", [load_image(tmp_path / "img.png")])
    assert run.stdout.strip() == reply.text.strip()
