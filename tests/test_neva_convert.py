"""NeVA ``.nemo`` conversion (issue 17): tiny archives in NeMo 1.x's layouts
(tests/fixtures/make_neva_fixtures.py) against goldens from transformers' Llama / Nemotron +
CLIPVisionModel and a port of NeMo's projector: the image rows entering the LLM (libmmvision)
and the last-position logits (llama.cpp, flash attention off, f32 KV), the prompt NeMo's
neva_process_prompts builds, and bad archives.

Reading model_weights.ckpt needs torch (torch.load(weights_only=True)): those tests skip
without it; the archive checks that fail before the weights run everywhere.
"""

from __future__ import annotations

import json
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.neva import FX, convert_fails, decode_with_image, needs_torch, write_tar

from mmchat.errors import UserError
from mmchat.vision.synthetic import rel_l2

NAMES = [
    "neva_llama_linear",
    "neva_llama_tp2",
    "neva_nemotron_tp2",
    "neva_llama_down",
    "neva_llama3",
    "neva_nvgpt",
]


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


def test_path_traversal_member_is_refused(tmp_path: Path) -> None:
    bad = write_tar(
        tmp_path / "evil.nemo", {"model_config.yaml": b"a: 1\n", "../../escape.txt": b"x"}
    )
    convert_fails(bad, tmp_path / "out", "outside the archive")
    assert not (tmp_path.parent / "escape.txt").exists()
    absolute = write_tar(tmp_path / "abs.nemo", {"/etc/evil": b"x", "model_config.yaml": b"a: 1\n"})
    convert_fails(absolute, tmp_path / "out", "absolute path")
    link = write_tar(tmp_path / "link.nemo", {"model_config.yaml": b"a: 1\n"}, {"x": "/etc/passwd"})
    convert_fails(link, tmp_path / "out", "link or special file")


def test_missing_config_and_not_awrite_tar(tmp_path: Path) -> None:
    convert_fails(
        write_tar(tmp_path / "m.nemo", {"model_weights.ckpt": b"x"}),
        tmp_path / "o",
        "model_config.yaml",
    )
    junk = tmp_path / "junk.nemo"
    junk.write_bytes(b"this is not a tar archive" * 100)
    convert_fails(junk, tmp_path / "o", "not a readable .nemo")


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    evil = b"!!python/object/apply:os.system ['touch pwned']\n"
    convert_fails(
        write_tar(tmp_path / "y.nemo", {"model_config.yaml": evil}), tmp_path / "o", "YAML"
    )
    assert not Path("pwned").exists()


def test_nemo2_folder_gets_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "context").mkdir(parents=True)
    (tmp_path / "ckpt" / "weights").mkdir()
    convert_fails(tmp_path / "ckpt", tmp_path / "o", "NeMo 2.0 checkpoint folder")


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
    convert_fails(
        write_tar(tmp_path / "d.nemo", members), tmp_path / "o", "cannot be loaded safely"
    )


@needs_torch
def test_unknown_projector_and_non_neva(tmp_path: Path) -> None:
    import yaml

    src = FX / "neva_llama_linear.nemo"
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    cfg = yaml.safe_load(members["./model_config.yaml"])
    cfg["mm_cfg"]["mm_mlp_adapter_type"] = "qformer_magic"
    members["./model_config.yaml"] = yaml.safe_dump(cfg).encode()
    convert_fails(
        write_tar(tmp_path / "p.nemo", members), tmp_path / "o", "projector 'qformer_magic'"
    )
    cfg["mm_cfg"]["mm_mlp_adapter_type"] = "linear"
    cfg["transformer_block_type"] = "post_ln"
    members["./model_config.yaml"] = yaml.safe_dump(cfg).encode()
    convert_fails(write_tar(tmp_path / "b.nemo", members), tmp_path / "o", "post_ln")
    del cfg["mm_cfg"]
    members["./model_config.yaml"] = yaml.safe_dump(cfg).encode()
    convert_fails(write_tar(tmp_path / "g.nemo", members), tmp_path / "o", "not a NeVA")


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
