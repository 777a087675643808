"""Model families ``mmchat convert`` understands, detected from config.json."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmchat.errors import UserError

from .base import Family, FamilyPlan, TensorJob, TextHParams, VisionSpec
from .clip import VisionHParams
from .idefics import FAMILIES as IDEFICS
from .internvl_hf import FAMILIES as INTERNVL_HF
from .llava_hf import LlavaHF
from .llava_next import FAMILIES as LLAVA_NEXT
from .llava_original import LlavaLlama, LlavaMistral
from .nvlm import FAMILIES as NVLM
from .openflamingo import FOLDER_FAMILIES as OPENFLAMINGO
from .original_files import OriginalFiles
from .qformer import FAMILIES as QFORMER
from .qformer_original import FOLDER_FAMILIES

# LLaVA 1.6 first: its original layout shares the LLaVA 1.5 architecture names
FAMILIES: tuple[type[Family], ...] = (
    *LLAVA_NEXT,
    LlavaHF,
    LlavaLlama,
    LlavaMistral,
    *QFORMER,
    *IDEFICS,
    *NVLM,
    *INTERNVL_HF,
)


def supported_architectures() -> list[str]:
    return [a for fam in FAMILIES for a in fam.architectures]


def detect_folder_family(folder: Path, overrides: Mapping[str, Path] | None = None) -> Family:
    """A family whose original release has no config.json (LAVIS, MiniGPT-4), by its files;
    ``overrides``: parts that are elsewhere (``OriginalFiles``)."""
    files = OriginalFiles(folder, dict(overrides or {}))
    families: tuple[type[Any], ...] = (*FOLDER_FAMILIES, *OPENFLAMINGO)
    for fam in families:
        if fam.detect_folder(files):
            return fam(files)
    raise UserError(
        f"{folder} has no config.json; it is not a Hugging Face checkpoint (nor a LAVIS / "
        "MiniGPT-4 folder with eva_vit_g.pth, nor an OpenFlamingo folder with checkpoint.pt)"
    )


def detect_family(config: dict[str, Any]) -> Family:
    for fam in FAMILIES:
        if fam.detect(config):
            return fam()
    archs = config.get("architectures") or [config.get("model_type") or "unknown"]
    raise UserError(
        f"Unsupported architecture {', '.join(map(str, archs))}; mmchat convert supports "
        f"{', '.join(supported_architectures())}"
    )


__all__ = [
    "FAMILIES",
    "Family",
    "FamilyPlan",
    "TensorJob",
    "TextHParams",
    "VisionHParams",
    "VisionSpec",
    "detect_family",
    "detect_folder_family",
    "supported_architectures",
]
