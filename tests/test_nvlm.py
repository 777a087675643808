"""NVLM-D (projector type ``internvit``): convert the tiny NVLM-D-layout fixture
(tests/fixtures/nvlm, made by tests/fixtures/make_nvlm_fixtures.py with a torch port of the
published modeling code) and check tiling, tile tags, the rows entering the LLM and the final
logits against its goldens; bad input -> one clear error, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.vision.image import load_image
from mmchat.vision.internvit import target_grid, tile_tags
from mmchat.vision.layout import EmbedSpan, TextSpan, layout_cells, layout_rows
from mmchat.vision.synthetic import rel_l2

ROOT = Path(__file__).parent / "fixtures" / "nvlm"
SRC = ROOT / "nvlm_d"
N_EMBD = 64
ROWS_PER_TILE = 256


@cache
def goldens() -> tuple[dict[str, Any], Any]:
    return json.loads((ROOT / "goldens.json").read_text()), np.load(ROOT / "goldens.npz")


_converted: dict[tuple[str, str], tuple[Path, Path]] = {}


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nvlm")


def converted(outdir: Path, quant: str = "f32", vq: str = "f32") -> tuple[Path, Path]:
    key = (quant, vq)
    if key not in _converted or not _converted[key][0].is_file():
        from mmchat.converters import convert

        r = convert(SRC, outdir=outdir / f"{quant}-{vq}", quant=quant, vision_quant=vq)
        _converted[key] = (r.model_path, r.mmproj_path)
    return _converted[key]


def engine(mmproj: Path, **kw: Any) -> Any:
    """An engine with its own (empty) embedding cache."""
    from mmchat.vision.cache import EmbeddingCache
    from mmchat.vision.internvit import InternVitEngine

    return InternVitEngine(
        mmproj, text_n_embd=N_EMBD, n_threads=2, device="cpu", cache=EmbeddingCache(), **kw
    )


# --- tiling (no native library needed) -------------------------------------------------------


def test_tile_grids_equal_the_reference_dynamic_preprocess() -> None:
    meta, _ = goldens()
    for case in meta["grids"]:
        w, h = case["size"]
        assert list(target_grid(w, h, 1, 6, 448)) == case["grid"], case
    for name, info in meta["images"].items():
        w, h = info["size"]
        cols, rows = target_grid(w, h, 1, 6, 448)
        assert [cols, rows] == info["grid"], name
        n = cols * rows
        assert info["n_tiles"] == (n + 1 if n > 1 else 1)
        assert len(info["tag_ids"]) == info["n_tiles"] + 1  # one piece per tile + </Image>


def test_tile_tags() -> None:
    assert tile_tags(1) == ["<tile_global_thumbnail>"]
    assert tile_tags(3) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]


# --- conversion ------------------------------------------------------------------------------


def test_conversion_writes_qwen2_and_the_documented_vision_layout(outdir: Path) -> None:
    from mmchat.gguf_meta import read_gguf

    text, mmproj = converted(outdir)
    t = read_gguf(text)
    assert t.architecture == "qwen2"
    assert t.get("tokenizer.ggml.model") == "gpt2" and t.get("tokenizer.ggml.pre") == "qwen2"
    assert t.get("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in t.get("tokenizer.chat_template")
    assert t.tensor("blk.0.attn_q.bias") is not None
    v = read_gguf(mmproj)
    assert v.get("clip.projector_type") == "internvit"
    assert v.get("internvit.norm_type") == "rms_norm" and v.get("internvit.qk_norm") is True
    assert v.get("internvit.dummy_heads_stripped") == 5
    assert v.get("internvit.pixel_shuffle.version") == "v2"
    assert v.get("internvit.pixel_shuffle.scale") == pytest.approx(0.5)
    assert v.get("internvit.tiling.max_tiles") == 6
    assert v.get("internvit.tiling.use_thumbnail") is True
    # the 3 real heads of 16 only: dummy rows/columns dropped
    for name, shape in (
        ("v.blk.0.attn_q.weight", [48, 48]),
        ("v.blk.1.attn_out.weight", [48, 48]),
        ("v.blk.0.attn_k_norm.weight", [48]),
    ):
        ts = v.tensor(name)
        assert ts is not None and [int(x) for x in ts.shape] == shape, name
    assert v.tensor("mm.model.mlp.1.bias") is None and v.tensor("mm.model.mlp.0.bias") is not None


def test_text_gguf_tokenizes_as_transformers(outdir: Path) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, _ = goldens()
    text, _ = converted(outdir)
    with load_model(text, None, LoadOptions.parity(n_threads=2)) as lm:
        prompt = (
            "<|im_start|>user\n<Image><tile_1><|vision_pad|></Image>\n"
            f"{meta['question']}<|im_end|>\n"
        )
        ids = lm.text.tokenize(prompt, add_special=False, parse_special=True)
        assert ids == meta["prompt_ids_transformers"]


# --- rows and logits against the reference ----------------------------------------------------


def test_rows_match_the_reference(outdir: Path) -> None:
    meta, g = goldens()
    _, mmproj = converted(outdir)
    with engine(mmproj) as eng:
        print("\nNVLM-D f32: rows entering the LLM, rel L2 vs the torch reference")
        for name, info in meta["images"].items():
            img = load_image(ROOT / "images" / f"{name}.png")
            px = eng.tile_pixels(img)
            assert px.shape[0] == info["n_tiles"]
            assert rel_l2(px[:, :, ::7, ::7], g[f"{name}/pixels"]) < 1e-6
            rows = eng.encode(img).embeddings
            err = rel_l2(rows, g[f"{name}/rows"])
            print(f"  {name:9s} {img.width}x{img.height} {eng.describe(img)}: {err:.2e}")
            assert rows.shape == (info["n_tiles"] * ROWS_PER_TILE, N_EMBD)
            assert err <= 2e-3, f"{name}: {err:.2e}"


def test_all_tiles_of_all_images_in_one_encoder_call(outdir: Path) -> None:
    meta, g = goldens()
    _, mmproj = converted(outdir)
    with engine(mmproj) as eng:
        calls: list[int] = []
        real = eng.model.encode

        def counting(px: np.ndarray, *a: Any, **kw: Any) -> np.ndarray:
            calls.append(int(px.shape[0]))
            return real(px, *a, **kw)

        eng.model.encode = counting
        imgs = [load_image(ROOT / "images" / f"{n}.png") for n in ("wide", "portrait")]
        out = eng.encode_many(imgs)
        assert calls == [meta["images"]["wide"]["n_tiles"] + meta["images"]["portrait"]["n_tiles"]]
        assert rel_l2(out[0].embeddings, g["wide/rows"]) <= 2e-3
        assert rel_l2(out[1].embeddings, g["portrait/rows"]) <= 2e-3


def test_layout_is_tags_and_one_block_per_tile(outdir: Path) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, _ = goldens()
    text, mmproj = converted(outdir)
    with load_model(text, mmproj, LoadOptions.parity(n_threads=2)) as lm:
        eng = lm.vision
        for name, info in meta["images"].items():
            img = load_image(ROOT / "images" / f"{name}.png")
            lay = eng.layout(img)
            # "</Image>" is tokenized by the runtime together with the text after it (as
            # NVLM-D's processor does): the last span carries the text, no tokens
            closing = lay[-1]
            assert isinstance(closing, TextSpan) and closing.text == "</Image>"
            assert not closing.tokens
            texts = [s.tokens for s in lay[:-1] if isinstance(s, TextSpan)]
            blocks = [s for s in lay if isinstance(s, EmbedSpan)]
            closing_ids = lm.tokenize("</Image>", parse_special=False)
            assert [*map(list, texts), closing_ids] == info["tag_ids"]
            assert [b.n_tokens for b in blocks] == [ROWS_PER_TILE] * info["n_tiles"]
            assert layout_rows(lay) == eng.tokens_for(img) == info["n_tiles"] * ROWS_PER_TILE
            assert layout_cells(lay) == layout_rows(lay) + sum(len(t) for t in texts)


def test_final_logits_with_an_image(outdir: Path) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    text, mmproj = converted(outdir)
    with load_model(text, mmproj, LoadOptions.parity(n_threads=2)) as lm:
        print("\nNVLM-D f32: final-position logits with an image, rel L2 vs the reference")
        for name, info in meta["images"].items():
            img = load_image(ROOT / "images" / f"{name}.png")
            ev = lm.evaluate([{"role": "user", "content": meta["question"], "images": [img]}])
            assert ev.token_ids == info["text_ids"]
            want = g[f"{name}/logits"]
            err = rel_l2(ev.logits, want)
            print(f"  {name:9s} {err:.2e}")
            assert err <= 2e-3, f"{name}: {err:.2e}"
            assert int(np.argmax(ev.logits)) == int(np.argmax(want))


def test_two_images_in_one_message(outdir: Path) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    text, mmproj = converted(outdir)
    imgs = [load_image(ROOT / "images" / f"{n}.png") for n in meta["two"]["images"]]
    with load_model(text, mmproj, LoadOptions.parity(n_threads=2)) as lm:
        ev = lm.evaluate([{"role": "user", "content": meta["question"], "images": imgs}])
        assert ev.token_ids == meta["two"]["text_ids"]
        err = rel_l2(ev.logits, g["two/logits"])
        print(f"\nNVLM-D two images in one message: {err:.2e}")
        assert err <= 2e-3


def test_top1_at_q8_0(outdir: Path) -> None:
    from mmchat.runtime import LoadOptions, load_model

    meta, g = goldens()
    text, mmproj = converted(outdir, "q8_0", "q8_0")
    with load_model(text, mmproj, LoadOptions.parity(n_threads=2)) as lm:
        for name in meta["images"]:
            img = load_image(ROOT / "images" / f"{name}.png")
            ev = lm.evaluate([{"role": "user", "content": meta["question"], "images": [img]}])
            assert int(np.argmax(ev.logits)) == int(np.argmax(g[f"{name}/logits"])), name


def test_mmchat_run_end_to_end(outdir: Path, tmp_path: Path) -> None:
    text, mmproj = converted(outdir)
    shutil.copy(ROOT / "images" / "landscape.png", tmp_path / "landscape.png")
    env = dict(os.environ, MMCHAT_HOME=str(tmp_path / "home"), COLUMNS="200")
    r = subprocess.run(
        [sys.executable, "-m", "mmchat", "run", str(text), "--mmproj", str(mmproj),
         "--max-tokens", "3", "--temperature", "0", "What is this? ./landscape.png"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # the tile grid, and the KV cells: 3 tiles of 256 rows + the tag tokens
    meta, _ = goldens()
    cells = 3 * ROWS_PER_TILE + sum(len(t) for t in meta["images"]["landscape"]["tag_ids"])
    assert f"Added image './landscape.png' (640×360, 2×1 tiles + thumbnail, {cells} tokens)" in (
        r.stderr
    )


# --- the dummy heads -------------------------------------------------------------------------


def _patch_safetensors(src: Path, dst: Path, edits: dict[str, Any]) -> None:
    """Copy a float32 safetensors file, applying ``edits[name](array) -> array``."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw)
    for name, fn in edits.items():
        info = header[name]
        assert info["dtype"] == "F32"
        lo, hi = (8 + n + o for o in info["data_offsets"])
        arr = np.frombuffer(bytes(data[lo:hi]), dtype=np.float32).reshape(info["shape"]).copy()
        data[lo:hi] = np.ascontiguousarray(fn(arr), dtype=np.float32).tobytes()
    dst.write_bytes(bytes(data))


def _copy_with(tmp: Path, edits: dict[str, Any]) -> Path:
    src = tmp / "src"
    shutil.copytree(SRC, src)
    _patch_safetensors(SRC / "model.safetensors", src / "model.safetensors", edits)
    return src


def _nonzero_rows(lo: int, hi: int) -> Any:
    def fn(a: np.ndarray) -> np.ndarray:
        a[lo:hi] = 0.05
        return a

    return fn


def test_dummy_heads_that_contribute_are_refused(tmp_path: Path) -> None:
    from mmchat.converters import convert

    # padded width 8 heads x 16 = 128; v's dummy rows are 128*2 + 48 .. 384
    qkv = "vision_model.encoder.layers.1.attn.qkv.weight"
    proj = "vision_model.encoder.layers.1.attn.proj.weight"

    def proj_cols(a: np.ndarray) -> np.ndarray:
        a[:, 48:] = 0.05
        return a

    src = _copy_with(tmp_path, {qkv: _nonzero_rows(304, 384), proj: proj_cols})
    out = tmp_path / "out"
    with pytest.raises(UserError, match="dummy") as exc:
        convert(src, outdir=out, quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.iterdir())


def test_stripping_is_exact_when_only_proj_zeroes_the_dummy_heads(tmp_path: Path) -> None:
    """Dummy v rows that are not zero change nothing while their proj columns are zero:
    the stripped file still matches the reference computed with the padded tower."""
    from mmchat.converters import convert

    _, g = goldens()

    def dummy_q_and_v(a: np.ndarray) -> np.ndarray:
        return _nonzero_rows(304, 384)(_nonzero_rows(48, 128)(a))

    src = _copy_with(tmp_path, {"vision_model.encoder.layers.0.attn.qkv.weight": dummy_q_and_v})
    r = convert(src, outdir=tmp_path / "out", quant="f32", vision_quant="f32")
    with engine(r.mmproj_path) as eng:
        img = load_image(ROOT / "images" / "landscape.png")
        assert rel_l2(eng.encode(img).embeddings, g["landscape/rows"]) <= 2e-3


# --- bad input -------------------------------------------------------------------------------


def _config_edit(tmp: Path, edit: Any) -> Path:
    src = tmp / "src"
    shutil.copytree(SRC, src)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c.update(ps_version="v1"), "pixel shuffle v1"),
        (lambda c: c["vision_config"].update(norm_type="batch_norm"), "norm_type"),
        (lambda c: c["vision_config"].update(hidden_act="relu"), "activation"),
        (lambda c: c.update(select_layer=-2), "select_layer"),
        (lambda c: c["llm_config"].update(architectures=["LlamaForCausalLM"], model_type="llama"),
         "Qwen2"),
    ],
)  # fmt: skip
def test_unsupported_config_is_one_clear_error(tmp_path: Path, edit: Any, match: str) -> None:
    from mmchat.converters import convert

    src = _config_edit(tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as exc:
        convert(src, outdir=out, quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.iterdir())


def test_truncated_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    from mmchat.converters import convert

    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="truncated") as exc:
        convert(src, outdir=out, quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.iterdir())


def test_truncated_mmproj_is_one_clear_error(outdir: Path, tmp_path: Path) -> None:
    from mmchat.vision import open_vision

    _, mmproj = converted(outdir)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mmproj.read_bytes()[: mmproj.stat().st_size // 3])
    with pytest.raises(UserError) as exc:
        open_vision(bad, text_n_embd=N_EMBD, device="cpu")
    assert "\n" not in str(exc.value)


def test_slow_tokenizer_files_give_the_same_vocabulary(outdir: Path, tmp_path: Path) -> None:
    """A checkpoint with vocab.json + merges.txt (+ added_tokens_decoder) and no
    tokenizer.json converts to the same GGUF vocabulary."""
    from gguf import GGUFReader
    from mmchat.converters import convert

    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    tj = json.loads((src / "tokenizer.json").read_text())
    (src / "tokenizer.json").unlink()
    (src / "vocab.json").write_text(json.dumps(tj["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    tcfg["added_tokens_decoder"] = {
        str(a["id"]): {"content": a["content"], "special": a["special"]} for a in tj["added_tokens"]
    }
    (src / "tokenizer_config.json").write_text(json.dumps(tcfg))
    slow = convert(src, outdir=tmp_path / "out", quant="f32", vision_quant="f32").model_path
    fast, _ = converted(outdir)

    def vocab(path: Path) -> list[list[Any]]:
        r = GGUFReader(path)
        keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
        return [list(r.fields[k].contents()) for k in keys]

    assert vocab(slow) == vocab(fast)


def test_closing_tag_is_tokenized_with_the_text_after_it(outdir: Path) -> None:
    """NVLM-D's processor tokenizes "...</Image>" and the following text in one pass (with
    Qwen2's real vocabulary ">\\n" is one token there): the prompt's text after an image is
    the tokenization of "</Image>" + that text, not of the two apart."""
    from mmchat.runtime import LoadOptions, Message, load_model
    from mmchat.runtime.pieces import PromptMedia

    text, mmproj = converted(outdir)
    with load_model(text, mmproj, LoadOptions.parity(n_threads=2)) as lm:
        msgs = [Message("user", "What is this?", [load_image(ROOT / "images" / "portrait.png")])]
        items = lm.build_prompt(msgs)
        at = next(i for i, it in enumerate(items) if isinstance(it, PromptMedia))
        after_marker = lm.render(msgs).split("<|mmchat-image-0|>", 1)[1]
        assert items[at + 1] == lm.tokenize("</Image>" + after_marker)
