"""OpenFlamingo's parts outside ``checkpoint.pt``: the OpenCLIP ViT tower (an open_clip state
dict such as ``open_clip_pytorch_model.bin`` of ``timm/vit_large_patch14_clip_224.openai``, or
a Hugging Face CLIP folder such as ``openai/clip-vit-large-patch14``) and the tensor views the
family needs (halves of fused weights).

OpenFlamingo feeds the Perceiver ``visual(x)[1]``: the patch tokens of the last block, class
token dropped, and -- with the open_clip releases it was trained with (2.16 .. 2.20, whose
``VisionTransformer`` applied ``ln_post`` to the pooled output only) -- without ``ln_post``.
So ``ln_post`` and ``proj`` are not converted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from .base import CLIP_MEAN, CLIP_STD, TensorJob, image_norm_from, read_json_opt
from .clip import VisionHParams, clip_vision_plan
from .original_files import torch_refs

OPEN_CLIP_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_HEAD_WIDTH = 64  # open_clip CLIPVisionCfg.head_width default


@dataclass
class _Part:
    """Rows ``start:stop`` of a 1-D/2-D tensor (one third of a fused projection)."""

    ref: TensorRef
    start: int
    stop: int

    def read(self, ref: TensorRef) -> np.ndarray:
        arr = self.ref.load()
        return np.ascontiguousarray(arr[self.start : self.stop])


def rows_of(ref: TensorRef, start: int, stop: int, name: str | None = None) -> TensorRef:
    """A view of rows ``start:stop`` of ``ref`` (read when loaded)."""
    if not 0 <= start < stop <= ref.shape[0]:
        raise CorruptFileError(f"{ref.name} has {ref.shape[0]} rows, not {stop}")
    shape = (stop - start, *ref.shape[1:])
    per_row = ref.nbytes // max(1, ref.shape[0])
    return TensorRef(
        name or ref.name, shape, ref.dtype, per_row * (stop - start), _Part(ref, start, stop)
    )


def split_rows(ref: TensorRef, n: int) -> list[TensorRef]:
    """``ref`` cut into ``n`` equal row blocks."""
    if ref.shape[0] % n:
        raise CorruptFileError(f"{ref.name} has {ref.shape[0]} rows: not {n} equal parts")
    step = ref.shape[0] // n
    return [rows_of(ref, i * step, (i + 1) * step) for i in range(n)]


def _open_clip_to_hf(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """open_clip ``visual.*`` names -> transformers' ``vision_model.*`` names."""
    out: dict[str, TensorRef] = {}
    fixed = {
        "conv1.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_pre.weight": "pre_layrnorm.weight",
        "ln_pre.bias": "pre_layrnorm.bias",
    }
    per_layer = {
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "attn.out_proj": "self_attn.out_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    rx = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)")
    for name, ref in refs.items():
        if not name.startswith("visual."):
            continue
        rest = name[len("visual.") :]
        if rest in fixed:
            out["vision_model." + fixed[rest]] = ref
            continue
        m = rx.fullmatch(name)
        if not m:
            continue
        i, mod, kind = m.groups()
        pre = f"vision_model.encoder.layers.{i}."
        if mod == "attn.in_proj" or mod == "attn":
            continue
        if mod in per_layer:
            out[f"{pre}{per_layer[mod]}.{kind}"] = ref
    rx_in = re.compile(r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)")
    for name, ref in refs.items():
        m = rx_in.fullmatch(name)
        if m:
            i, kind = m.groups()
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), split_rows(ref, 3), strict=True):
                out[f"vision_model.encoder.layers.{i}.self_attn.{part}.{kind}"] = piece
    return out


def _open_clip_file(path: Path) -> Path | None:
    if path.is_file():
        return path
    for name in OPEN_CLIP_FILES:
        if (path / name).is_file():
            return path / name
    return None


def find_tower(folder: Path, given: Path | None) -> Path:
    """The CLIP tower: ``--vision-tower`` (an open_clip weights file or a folder holding one,
    or a Hugging Face CLIP folder), else one inside the model folder."""
    if given is not None:
        if not given.exists():
            raise UserError(f"--vision-tower {given}: no such file or folder")
        return given
    if _open_clip_file(folder) is not None:
        return folder
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if _open_clip_file(sub) is not None:
            return sub
        if str(read_json_opt(sub / "config.json").get("model_type", "")).startswith("clip"):
            return sub
    raise UserError(
        f"{folder} holds no CLIP vision tower: give the OpenCLIP ViT-L/14 weights with "
        "--vision-tower (open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_224.openai, "
        "or a Hugging Face openai/clip-vit-large-patch14 folder)"
    )


def tower_plan(tower: Path, notes: list[str]) -> tuple[VisionHParams, list[TensorJob], str]:
    """The ViT's hyper-parameters and tensors (all blocks, no post-LN), and a description of
    where they came from."""
    oc = _open_clip_file(tower)
    if oc is not None:
        return _open_clip_plan(oc, notes)
    cfg = read_json_opt(tower / "config.json")
    if not cfg:
        raise UserError(
            f"{tower} is neither an open_clip weights file ({', '.join(OPEN_CLIP_FILES)}) nor "
            "a Hugging Face CLIP folder"
        )
    vcfg = dict(cfg.get("vision_config") or cfg)
    ckpt = open_checkpoint(tower)
    prefix = "vision_model." if "vision_model.embeddings.class_embedding" in ckpt else ""
    mean, std = image_norm_from([tower], notes)
    vit, jobs = clip_vision_plan(
        ckpt,
        vcfg,
        prefix=prefix,
        select_layer=-1,
        image_mean=mean,
        image_std=std,
        projection_dim=int(vcfg.get("hidden_size", 768)),
    )
    return vit, jobs, f"Hugging Face CLIP folder {tower.name}"


def _open_clip_plan(path: Path, notes: list[str]) -> tuple[VisionHParams, list[TensorJob], str]:
    # a safetensors tower is read through its folder (the only weights file there)
    refs = open_checkpoint(path.parent).refs if path.suffix == ".safetensors" else torch_refs(path)
    view = _open_clip_to_hf(refs)
    if "vision_model.embeddings.class_embedding" not in view:
        raise CorruptFileError(f"{path} holds no open_clip vision tower (visual.* tensors)")
    width = view["vision_model.embeddings.class_embedding"].shape[0]
    conv = view["vision_model.embeddings.patch_embedding.weight"]
    pos = view["vision_model.embeddings.position_embedding.weight"]
    patch = int(conv.shape[-1])
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1:
        raise CorruptFileError(f"{path}: {pos.shape[0]} positions are not a square grid + class")
    fc1 = view.get("vision_model.encoder.layers.0.mlp.fc1.weight")
    if fc1 is None:
        raise CorruptFileError(f"{path} has no transformer blocks")
    ocfg = read_json_opt(path.parent / OPEN_CLIP_CONFIG)
    model_cfg: dict[str, Any] = ocfg.get("model_cfg") or {}
    vis_cfg: dict[str, Any] = model_cfg.get("vision_cfg") or {}
    head_width = int(vis_cfg.get("head_width", OPEN_CLIP_HEAD_WIDTH))
    if width % head_width:
        raise CorruptFileError(
            f"{path}: width {width} is not a multiple of head_width {head_width}"
        )
    # OpenFlamingo loads ViT-L-14 with pretrained="openai": open_clip builds OpenAI weights
    # with QuickGELU; other towers say so in open_clip_config.json
    quick = bool(model_cfg.get("quick_gelu", True))
    pre = ocfg.get("preprocess_cfg") or {}
    mean = tuple(float(x) for x in pre.get("mean", CLIP_MEAN))
    std = tuple(float(x) for x in pre.get("std", CLIP_STD))
    if len(mean) != 3 or len(std) != 3:
        raise CorruptFileError(f"{path.parent / OPEN_CLIP_CONFIG}: mean/std need 3 values")
    vcfg = {
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": sum(1 for n in view if n.endswith(".mlp.fc1.weight")),
        "num_attention_heads": width // head_width,
        "patch_size": patch,
        "image_size": grid * patch,
        "hidden_act": "quick_gelu" if quick else "gelu",
        "layer_norm_eps": 1e-5,
    }
    ckpt = Checkpoint(view, [path])
    vit, jobs = clip_vision_plan(
        ckpt,
        vcfg,
        prefix="vision_model.",
        select_layer=-1,
        image_mean=(mean[0], mean[1], mean[2]),
        image_std=(std[0], std[1], std[2]),
        projection_dim=width,
    )
    if not ocfg:
        notes.append(
            f"no {OPEN_CLIP_CONFIG} next to {path.name}: QuickGELU, heads of 64, CLIP mean/std"
        )
    return vit, jobs, f"open_clip weights {path.name}"
