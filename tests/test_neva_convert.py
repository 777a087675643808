"""NeVA ``.nemo`` conversion (issue 17): tiny archives in NeMo 1.x's layouts
(tests/fixtures/make_neva_fixtures.py) against goldens from transformers' Llama / Nemotron +
CLIPVisionModel and a port of NeMo's projector: the image rows entering the LLM (libmmvision)
and the last-position logits (llama.cpp, flash attention off, f32 KV), the prompt NeMo's
neva_process_prompts builds, and bad archives.

Reading model_weights.ckpt needs torch (torch.load(weights_only=True)): those tests skip
without it; the archive checks that fail before the weights run everywhere.
"""

from __future__ import annotations

import io
import json
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.vision.synthetic import rel_l2

FX = Path(__file__).parent / "fixtures" / "neva"
NAMES = [
    "neva_llama_linear",
    "neva_llama_tp2",
    "neva_nemotron_tp2",
    "neva_llama_down",
    "neva_llama3",
    "neva_nvgpt",
]

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="reading a .nemo's model_weights.ckpt needs torch (weights_only)"
)


def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FX / "manifest.json").read_text(encoding="utf-8"))
    return data


@cache
def converted(name: str, root: str) -> tuple[Path, Path]:
    from mmchat.converters import convert

    r = convert(
        FX / f"{name}.nemo",
        outdir=Path(root) / name,
        quant="f32",
        vision_quant="f32",
        vision_tower=FX / "clip_tower",
    )
    return r.model_path, r.mmproj_path


@pytest.fixture(scope="module")
def outroot(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("neva"))


def decode_with_image(model: Path, ids: list[int], first: int, rows: np.ndarray) -> np.ndarray:
    """Last-position logits of ``ids`` with rows[k] in place of position first + k."""
    import llama_cpp as L

    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False
    lm = L.llama_model_load_from_file(str(model).encode(), mp)
    assert lm
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 512
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = 0
    cp.n_threads = cp.n_threads_batch = 2
    ctx = L.llama_init_from_model(lm, cp)
    try:
        n = rows.shape[0]
        segs: list[tuple[int, Any]] = [
            (0, ids[:first]),
            (first, rows),
            (first + n, ids[first + n :]),
        ]
        for pos, seg in segs:
            k = len(seg)
            is_emb = isinstance(seg, np.ndarray)
            batch = L.llama_batch_init(k, seg.shape[1] if is_emb else 0, 1)
            try:
                batch.n_tokens = k
                flat = np.ascontiguousarray(seg, dtype=np.float32).ravel() if is_emb else None
                for j in range(k):
                    if is_emb:
                        assert flat is not None
                        w = seg.shape[1]
                        for e in range(w):
                            batch.embd[j * w + e] = float(flat[j * w + e])
                    else:
                        batch.token[j] = int(seg[j])
                    batch.pos[j] = pos + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = pos + j == len(ids) - 1
                assert L.llama_decode(ctx, batch) == 0
            finally:
                L.llama_batch_free(batch)
        n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(lm)))
        p = L.llama_get_logits_ith(ctx, -1)
        return np.ctypeslib.as_array(p, shape=(n_vocab,)).astype(np.float64)
    finally:
        L.llama_free(ctx)
        L.llama_model_free(lm)


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_image_rows_and_logits_match_neva(name: str, outroot: str) -> None:
    from mmchat.vision import open_vision
    from mmchat.vision.image import load_image

    gold = np.load(FX / f"{name}.goldens.npz")
    model, mmproj = converted(name, outroot)
    with open_vision(mmproj, text_n_embd=64, device="cpu") as eng:
        img = load_image(FX / "image.png")
        px = eng.pixels(img)  # type: ignore[attr-defined]
        assert rel_l2(px, gold["pixels"]) < 1e-5
        rows = eng.encode(img).embeddings
        # a non-square image: resize + centre crop ('square'), or pad first ('pad')
        wide = load_image(FX / "wide.png")
        assert rel_l2(eng.pixels(wide), gold["pixels_wide"]) < 1e-5  # type: ignore[attr-defined]
        assert rel_l2(eng.encode(wide).embeddings, gold["rows_wide"]) < 2e-3
    assert rows.shape == gold["rows"].shape
    assert rel_l2(rows, gold["rows"]) < 2e-3
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(model, ids, int(gold["first"]), rows)  # our rows, end to end
    assert rel_l2(got, gold["logits"]) < 2e-3
    assert int(np.argmax(got)) == int(np.argmax(gold["logits"]))


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_chat_template_prompts_as_neva(name: str, outroot: str) -> None:
    """The GGUF's template, rendered and tokenized by mmchat's runtime, gives NeMo's ids
    (the image span as rows at the same place)."""
    from mmchat.runtime import _llama
    from mmchat.runtime.template import ImageSlot, TemplateMessage, select_template
    from mmchat.runtime.tokenizing import PromptTokenizer

    gold = np.load(FX / f"{name}.goldens.npz")
    meta = manifest()[name]
    model, _ = converted(name, outroot)
    from mmchat.gguf_meta import read_gguf

    info = read_gguf(model, role="model")
    tmpl = select_template(
        explicit=None,
        gguf_template=str(info.get("tokenizer.chat_template")),
        model_names=[name],
        bos_token="<s>",
        eos_token="</s>",
    )
    pieces = tmpl.render([TemplateMessage(role="user", content="Describe the image.", n_images=1)])
    text = _llama.TextModel(str(model), n_gpu_layers=0)
    tok = PromptTokenizer(
        text, tmpl, legacy_spaces=bool(info.get("mmchat.tokenizer.legacy_spaces"))
    )
    out = tok.tokenize_pieces(pieces)
    ids: list[int] = []
    first = -1
    for part in out:
        if isinstance(part, ImageSlot):
            first = len(ids)
            ids += [-1] * int(meta["n_rows"])
        else:
            ids += part
    want = [int(x) for x in gold["ids"]]
    g0 = int(gold["first"])
    n = int(meta["n_rows"])
    assert first == g0
    assert ids[:g0] == want[:g0]
    assert ids[g0 + n :] == want[g0 + n :]


# --- bad archives (no torch needed: they fail before the weights) -------------------------


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _convert_fails(src: Path, out: Path, match: str) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match=match):
        convert(src, outdir=out, quant="f32", vision_tower=FX / "clip_tower")
    assert not out.exists() or not any(out.iterdir())


def test_path_traversal_member_is_refused(tmp_path: Path) -> None:
    bad = _tar(tmp_path / "evil.nemo", {"model_config.yaml": b"a: 1\n", "../../escape.txt": b"x"})
    _convert_fails(bad, tmp_path / "out", "outside the archive")
    assert not (tmp_path.parent / "escape.txt").exists()
    absolute = _tar(tmp_path / "abs.nemo", {"/etc/evil": b"x", "model_config.yaml": b"a: 1\n"})
    _convert_fails(absolute, tmp_path / "out", "absolute path")
    link = _tar(tmp_path / "link.nemo", {"model_config.yaml": b"a: 1\n"}, {"x": "/etc/passwd"})
    _convert_fails(link, tmp_path / "out", "link or special file")


def test_missing_config_and_not_a_tar(tmp_path: Path) -> None:
    _convert_fails(
        _tar(tmp_path / "m.nemo", {"model_weights.ckpt": b"x"}), tmp_path / "o", "model_config.yaml"
    )
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"this is not a tar archive" * 100)
    _convert_fails(junk, tmp_path / "o", "not a readable .nemo")


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    evil = b"!!python/object/apply:os.system ['touch pwned']\n"
    _convert_fails(_tar(tmp_path / "y.nemo", {"model_config.yaml": evil}), tmp_path / "o", "YAML")
    assert not Path("pwned").exists()


def test_nemo2_folder_gets_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "context").mkdir(parents=True)
    (tmp_path / "ckpt" / "weights").mkdir()
    _convert_fails(tmp_path / "ckpt", tmp_path / "o", "NeMo 2.0 checkpoint folder")


def test_truncated_archive(tmp_path: Path) -> None:
    data = (FX / "neva_llama_linear.nemo").read_bytes()
    cut = tmp_path / "cut.nemo"
    cut.write_bytes(data[: len(data) // 2])
    from mmchat.converters import convert

    with pytest.raises(UserError, match=r"truncated|not a readable"):
        convert(cut, outdir=tmp_path / "o", quant="f32", vision_tower=FX / "clip_tower")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@needs_torch
def test_damaged_weights_member(tmp_path: Path) -> None:
    """A complete tar whose model_weights.ckpt bytes are cut: torch.load(weights_only) fails
    and that is one clear error."""
    with tarfile.open(FX / "neva_llama_linear.nemo") as tar:
        members = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    ck = members["./model_weights.ckpt"]
    members["./model_weights.ckpt"] = ck[: len(ck) // 2]
    _convert_fails(_tar(tmp_path / "d.nemo", members), tmp_path / "o", "cannot be loaded safely")


@needs_torch
def test_unknown_projector_and_non_neva(tmp_path: Path) -> None:
    import yaml

    src = FX / "neva_llama_linear.nemo"
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    cfg = yaml.safe_load(members["./model_config.yaml"])
    cfg["mm_cfg"]["mm_mlp_adapter_type"] = "qformer_magic"
    members["./model_config.yaml"] = yaml.safe_dump(cfg).encode()
    _convert_fails(_tar(tmp_path / "p.nemo", members), tmp_path / "o", "projector 'qformer_magic'")
    cfg["mm_cfg"]["mm_mlp_adapter_type"] = "linear"
    cfg["transformer_block_type"] = "post_ln"
    members["./model_config.yaml"] = yaml.safe_dump(cfg).encode()
    _convert_fails(_tar(tmp_path / "b.nemo", members), tmp_path / "o", "post_ln")
    del cfg["mm_cfg"]
    members["./model_config.yaml"] = yaml.safe_dump(cfg).encode()
    _convert_fails(_tar(tmp_path / "g.nemo", members), tmp_path / "o", "not a NeVA")


@needs_torch
def test_missing_vision_tower(tmp_path: Path) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match="vision-tower"):
        convert(
            FX / "neva_llama_linear.nemo", outdir=tmp_path / "o", vision_tower=tmp_path / "nope"
        )
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@needs_torch
@pytest.mark.parametrize("name", NAMES)
def test_q8_0_keeps_top1(name: str, tmp_path: Path) -> None:
    from mmchat.converters import convert

    gold = np.load(FX / f"{name}.goldens.npz")
    r = convert(FX / f"{name}.nemo", outdir=tmp_path, quant="q8_0", vision_tower=FX / "clip_tower")
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(r.model_path, ids, int(gold["first"]), gold["rows"])
    assert int(np.argmax(got)) == int(np.argmax(gold["logits"]))
    assert rel_l2(got, gold["logits"]) < 0.05  # as the LLaVA fixtures at q8_0


@needs_torch
def test_cli_convert_then_run_with_an_image(tmp_path: Path) -> None:
    """``mmchat convert model.nemo`` registers the model; ``mmchat run`` answers about an
    image through the NeVA template and the linear projector on libmmvision."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copy(FX / "image.png", tmp_path / "image.png")
    env = dict(os.environ, MMCHAT_HOME=str(tmp_path / "home"), COLUMNS="200")
    conv = subprocess.run(
        [sys.executable, "-m", "mmchat", "convert", str(FX / "neva_llama_linear.nemo"),
         "--vision-tower", str(FX / "clip_tower"), "-o", str(tmp_path / "out"),
         "--name", "neva-tiny", "-q", "q8_0"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    assert "neva-tiny" in conv.stdout
    run = subprocess.run(
        [sys.executable, "-m", "mmchat", "run", "neva-tiny", "--max-tokens", "3",
         "--temperature", "0", "Describe ./image.png"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Added image './image.png'" in run.stderr


# --- the same weights in the other layouts NeMo writes (rewritten from the fixtures) ------


def _load_ckpt(data: bytes) -> dict[str, Any]:
    import torch

    with torch.serialization.safe_globals([io.BytesIO, bytes]):
        sd: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    return sd


def _save_ckpt(sd: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


def _pp2(cfg: dict[str, Any], shards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pipeline-parallel 2: layer 0 + embeddings + projector, then layer 1 (numbered 0 in
    its stage, as Megatron does) + final norm + output layer."""
    (sd,) = shards.values()
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    for k, v in sd.items():
        if ".layers.1." in k:
            second[k.replace(".layers.1.", ".layers.0.")] = v
        elif "final_layernorm" in k or "output_layer" in k:
            second[k] = v
        else:
            first[k] = v
    cfg["pipeline_model_parallel_size"] = 2
    return {"tp_rank_00_pp_rank_000": first, "tp_rank_00_pp_rank_001": second}


def _o2(cfg: dict[str, Any], shards: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """megatron_amp_O2: every key under model.module."""
    cfg["megatron_amp_O2"] = True
    return {d: {"model.module." + k[6:]: v for k, v in sd.items()} for d, sd in shards.items()}


def _local_norms(
    cfg: dict[str, Any], shards: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Megatron-core's local spec: layer norms as their own modules."""
    ren = {
        "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    }
    out = {}
    for d, sd in shards.items():
        new = {}
        for k, v in sd.items():
            for a, b in ren.items():
                k = k.replace(a, b)
            new[k] = v
        out[d] = new
    return out


def _fast_swiglu(
    cfg: dict[str, Any], shards: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The older layout with 'fast-swiglu': dense_h_to_4h holds [gate_r; up_r] per shard."""
    import torch

    cfg["activation"] = "fast-swiglu"
    out = {}
    for d, sd in shards.items():
        new = dict(sd)
        for k in [k for k in sd if k.endswith("dense_h_to_4h_2.weight")]:
            gate = k.replace("dense_h_to_4h_2", "dense_h_to_4h")
            new[gate] = torch.cat([sd[gate], sd[k]])
            del new[k]
        out[d] = new
    return out


VARIANTS = {
    "pp2": ("neva_llama_linear", _pp2),
    "o2": ("neva_llama_linear", _o2),
    "local_norms": ("neva_llama_down", _local_norms),
    "fast_swiglu": ("neva_llama_tp2", _fast_swiglu),
}


@needs_torch
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_layouts_convert_to_the_same_model(variant: str, tmp_path: Path) -> None:
    from mmchat.converters import convert

    name, edit = VARIANTS[variant]
    src = _rewrite(name, edit, tmp_path / f"{variant}.nemo")
    r = convert(src, outdir=tmp_path / "o", quant="f32", vision_tower=FX / "clip_tower")
    gold = np.load(FX / f"{name}.goldens.npz")
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(r.model_path, ids, int(gold["first"]), gold["rows"])
    assert rel_l2(got, gold["logits"]) < 2e-3


@needs_torch
def test_unknown_tensors_are_refused_not_dropped(tmp_path: Path) -> None:
    """A qk-norm (or anything else this converter does not map) is an error, not a silently
    different model."""
    import torch

    def add_qk_norm(
        cfg: dict[str, Any], shards: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        for sd in shards.values():
            sd["model.decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(16)
        return shards

    src = _rewrite("neva_llama_linear", add_qk_norm, tmp_path / "qk.nemo")
    _convert_fails(src, tmp_path / "o", "does not know how to convert")


def _rewrite(name: str, edit: Any, dst: Path) -> Path:
    """A fixture archive with its config and weight shards passed through ``edit``."""
    import yaml

    with tarfile.open(FX / f"{name}.nemo") as tar:
        members = {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }
    cfg = yaml.safe_load(members.pop("model_config.yaml"))
    shards = {
        k.rpartition("/")[0]: _load_ckpt(members.pop(k))
        for k in [k for k in members if k.endswith("model_weights.ckpt")]
    }
    for d, sd in edit(cfg, shards).items():
        members[f"{d}/model_weights.ckpt" if d else "model_weights.ckpt"] = _save_ckpt(sd)
    members = {"model_config.yaml": yaml.safe_dump(cfg).encode(), **members}
    return _tar(dst, members)


@needs_torch
def test_code_in_the_weights_pickle_is_refused(tmp_path: Path) -> None:
    import os

    import torch

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    buf = io.BytesIO()
    torch.save({"model.embedding.word_embeddings.weight": torch.ones(2, 2), "x": Evil()}, buf)
    members = {"model_config.yaml": b"mm_cfg: {}\n", "model_weights.ckpt": buf.getvalue()}
    _convert_fails(_tar(tmp_path / "e.nemo", members), tmp_path / "o", "cannot be loaded safely")
    assert not (tmp_path / "pwned").exists()


@needs_torch
def test_unpacked_folder_and_no_temporaries_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unpacked .nemo converts the same; the private temp folder is gone afterwards, after
    a success and after a failure."""
    import gc
    import tempfile

    from mmchat.converters import convert

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    folder = tmp_path / "unpacked"
    with tarfile.open(FX / "neva_llama_tp2.nemo") as tar:
        for m in tar.getmembers():
            if m.isfile():
                dest = folder / m.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
    r = convert(folder, outdir=tmp_path / "o", quant="f32", vision_tower=FX / "clip_tower")
    assert r.name == "unpacked"
    gold = np.load(FX / "neva_llama_tp2.goldens.npz")
    ids = [int(x) for x in gold["ids"]]
    got = decode_with_image(r.model_path, ids, int(gold["first"]), gold["rows"])
    assert rel_l2(got, gold["logits"]) < 2e-3
    gc.collect()
    assert list(scratch.iterdir()) == []
    convert(FX / "neva_llama_linear.nemo", outdir=tmp_path / "o2", vision_tower=FX / "clip_tower")
    assert list(scratch.iterdir()) == []  # no cycle: released as soon as the plan is gone
    with pytest.raises(UserError):
        convert(FX / "neva_llama_linear.nemo", outdir=tmp_path / "o3", vision_tower=tmp_path)
    gc.collect()
    assert list(scratch.iterdir()) == []
