"""Reading the original (non-Hugging Face) releases: ``.pth`` files through
``torch.load(weights_only=True)``, LAVIS' EVA ViT-g names, the LLM sub-folder. Shared by the
LAVIS / MiniGPT-4 (``qformer_original``) and MiniGPT-v2 (``minigptv2``) families."""

from __future__ import annotations

import re
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


def llm_folder(folder: Path) -> Path:
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        cfg = sub / "config.json"
        if cfg.is_file() and read_json(cfg).get("model_type") in ("llama", "mistral"):
            found.append(sub)
    if len(found) != 1:
        what = "none" if not found else ", ".join(p.name for p in found)
        raise UserError(
            f"{folder} must hold exactly one language model folder (a Hugging Face Llama/Vicuna "
            f"folder with config.json); found {what}"
        )
    return found[0]
