"""Reading the original (non-Hugging Face) releases: ``.pth`` files through
``torch.load(weights_only=True)``, LAVIS' EVA ViT-g names, the LLM sub-folder. Shared by the
LAVIS / MiniGPT-4 (``qformer_original``) and MiniGPT-v2 (``minigptv2``) families."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mmchat.errors import UserError

from ..checkpoint import TensorRef, _TorchFile
from .base import read_json

EVA_FILE = "eva_vit_g.pth"
EVA_HEAD_DIM = 88


def eva_names(name: str) -> str | None:
    """An EVA ViT (timm/LAVIS) name -> transformers' ``vision_model.*`` name."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    if name in fixed:
        return "vision_model." + fixed[name]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not m:
        return None
    rest = {
        "norm1.weight": "layer_norm1.weight",
        "norm1.bias": "layer_norm1.bias",
        "norm2.weight": "layer_norm2.weight",
        "norm2.bias": "layer_norm2.bias",
        "attn.qkv.weight": "self_attn.qkv.weight",
        "attn.q_bias": "self_attn.q_bias",
        "attn.v_bias": "self_attn.v_bias",
        "attn.proj.weight": "self_attn.projection.weight",
        "attn.proj.bias": "self_attn.projection.bias",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
    }.get(m.group(2))
    return None if rest is None else f"vision_model.encoder.layers.{m.group(1)}.{rest}"


def torch_refs(path: Path) -> dict[str, TensorRef]:
    if not path.is_file():
        raise UserError(f"{path.parent} has no {path.name}")
    return _TorchFile(path).refs


QFORMER_FILE = "blip2_pretrained_flant5xxl.pth"

OVERRIDES = {"eva": EVA_FILE, "qformer": QFORMER_FILE, "llm": "the language model folder"}
"""``mmchat convert --eva/--qformer/--llm``: a published part that is not in the folder."""


@dataclass
class OriginalFiles:
    """Where an original release's parts are: in ``folder`` under their published names,
    except those the user points at elsewhere (``overrides``: ``eva``, ``qformer``, ``llm``)."""

    folder: Path
    overrides: Mapping[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, path in self.overrides.items():
            if key not in OVERRIDES:
                raise UserError(f"unknown part {key!r}: one of {', '.join(OVERRIDES)}")
            want_dir = key == "llm"
            if not (path.is_dir() if want_dir else path.is_file()):
                kind = "folder" if want_dir else "file"
                raise UserError(f"--{key} {path}: no such {kind}")

    def path(self, published: str) -> Path:
        """The file published as ``published`` (EVA_FILE, QFORMER_FILE or the model's own)."""
        for key, name in OVERRIDES.items():
            if name == published and key in self.overrides:
                return self.overrides[key]
        return self.folder / published

    def has(self, published: str) -> bool:
        return self.path(published).is_file()

    def refs(self, published: str) -> dict[str, TensorRef]:
        """The tensors of a published ``.pth`` (read with ``weights_only=True``)."""
        path = self.path(published)
        if not path.is_file():
            flag = next(
                (f" (or give its path with --{k})" for k, n in OVERRIDES.items() if n == published),
                "",
            )
            raise UserError(f"{self.folder} has no {published}{flag}")
        return torch_refs(path)

    def llm(self) -> Path:
        return self.overrides.get("llm") or llm_folder(self.folder)

    def refuse_unused(self, used: Iterable[str], title: str) -> None:
        """One clear error for a flag the family has no part for."""
        extra = sorted(set(self.overrides) - set(used))
        if extra:
            flags = ", ".join(f"--{k}" for k in extra)
            raise UserError(f"{flags} does not apply to {title}")


def llm_folder(folder: Path) -> Path:
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        cfg = sub / "config.json"
        if cfg.is_file() and read_json(cfg).get("model_type") in ("llama", "mistral", "t5"):
            found.append(sub)
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise UserError(
            f"{folder} must hold exactly one language model folder (a Hugging Face Llama/Vicuna "
            f"or Flan-T5 folder with config.json), or name it with --llm; found {what}"
        )
    return found[0]
