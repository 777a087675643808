"""Original LLaVA checkpoints: ``LlavaLlamaForCausalLM`` (haotian-liu LLaVA 1.5) and
``LlavaMistralForCausalLM`` (SkunkworksAI BakLLaVA-1).

The language model and ``model.mm_projector.{0,2}`` live in the checkpoint; the CLIP vision
tower usually does not: ``mm_vision_tower`` names it (a Hugging Face repo id or a local
folder), or ``--vision-tower PATH`` gives it. A tower saved inside the checkpoint
(``model.vision_tower.vision_tower.vision_model.*``) is used when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import UserError

from ..checkpoint import Checkpoint, open_checkpoint
from ..tokenizer import LLAVA_V1_TEMPLATE
from .base import (
    FamilyPlan,
    clip_vision_plan,
    image_norm_from,
    llama_text_plan,
    mlp_projector_jobs,
    read_json,
    read_json_opt,
)

_EMBEDDED_TOWER = "model.vision_tower.vision_tower.vision_model."


def resolve_tower(folder: Path, config: dict[str, Any], given: Path | None) -> tuple[Path, str]:
    """(folder, description) of the CLIP tower: --vision-tower, a local mm_vision_tower, or
    the repo it names, downloaded."""
    if given is not None:
        p = Path(given).expanduser()
        if not p.is_dir():
            raise UserError(f"--vision-tower {given}: no such folder")
        return p, str(p.resolve())
    named = config.get("mm_vision_tower") or config.get("vision_tower")
    if not named:
        raise UserError(
            "The checkpoint names no vision tower (mm_vision_tower) and contains none; "
            "give one with --vision-tower PATH"
        )
    named = str(named)
    for cand in (Path(named).expanduser(), folder / named):
        if cand.is_dir():
            return cand, str(cand.resolve())
    from ..source import download_vision_tower

    return download_vision_tower(named), named


class _Original:
    name: ClassVar[str] = "llava-original"
    architectures: ClassVar[tuple[str, ...]] = ()
    mistral: ClassVar[bool] = False
    model_types: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        if any(a in cls.architectures for a in archs):
            return True
        return not archs and config.get("model_type") in cls.model_types

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        kind = config.get("mm_projector_type", "linear")
        if kind != "mlp2x_gelu":
            raise UserError(
                f"mm_projector_type {kind!r} is not supported (LLaVA 1.5 and BakLLaVA use "
                "'mlp2x_gelu')"
            )
        feature = config.get("mm_vision_select_feature", "patch")
        if feature != "patch":
            raise UserError(
                f"mm_vision_select_feature {feature!r} is not supported (LLaVA uses 'patch')"
            )
        ckpt = open_checkpoint(folder)
        text_hp, text_jobs = llama_text_plan(
            ckpt,
            config,
            layer_prefix="model.layers.",
            embed="model.embed_tokens.weight",
            norm="model.norm.weight",
            lm_head="lm_head.weight",
            mistral=self.mistral,
        )
        notes: list[str] = []
        tower_ckpt: Checkpoint
        if _EMBEDDED_TOWER + "embeddings.patch_embedding.weight" in ckpt:
            tower_ckpt, prefix, tower_dir = ckpt, _EMBEDDED_TOWER, None
            vcfg = dict(config.get("vision_config") or {})
            if not vcfg:
                tower_dir, _ = resolve_tower(folder, config, vision_tower)
                vcfg = _tower_config(tower_dir)
            source = "checkpoint"
        else:
            tower_dir, label = resolve_tower(folder, config, vision_tower)
            vcfg = _tower_config(tower_dir)
            tower_ckpt = open_checkpoint(tower_dir)
            if "vision_model.embeddings.patch_embedding.weight" in tower_ckpt:
                prefix = "vision_model."
            elif "embeddings.patch_embedding.weight" in tower_ckpt:
                prefix = ""
            else:
                raise UserError(f"{tower_dir} does not hold a CLIP vision tower")
            source = label
        mean, std = image_norm_from([d for d in (tower_dir, folder) if d is not None], notes)
        vis_hp, vis_jobs = clip_vision_plan(
            tower_ckpt,
            vcfg,
            prefix=prefix,
            select_layer=config.get("mm_vision_select_layer", -2),
            image_mean=mean,
            image_std=std,
            projection_dim=text_hp.n_embd,
        )
        mm_hidden = config.get("mm_hidden_size")
        if mm_hidden is not None and int(mm_hidden) != vis_hp.n_embd:
            raise UserError(
                f"The checkpoint expects a vision tower of width {mm_hidden} (mm_hidden_size) "
                f"but {source} has width {vis_hp.n_embd}"
            )
        vis_jobs += mlp_projector_jobs(
            ckpt,
            first="model.mm_projector.0.",
            second="model.mm_projector.2.",
            vision_width=vis_hp.n_embd,
            text_width=text_hp.n_embd,
        )
        # the slow tokenizer original LLaVA uses (use_fast=False) honours the legacy flag
        # inside a chunk: with legacy=false no "▁" after "</s>" in a later turn
        legacy = read_json_opt(folder / "tokenizer_config.json").get("legacy") is not False
        return FamilyPlan(
            family=self.name,
            architecture=(config.get("architectures") or [self.architectures[0]])[0],
            text=text_hp,
            text_tensors=text_jobs,
            vision=vis_hp,
            vision_tensors=vis_jobs,
            tokenizer_dir=folder,
            default_template=LLAVA_V1_TEMPLATE,
            config_ids={
                "bos_token_id": config.get("bos_token_id"),
                "eos_token_id": config.get("eos_token_id"),
                "pad_token_id": config.get("pad_token_id"),
            },
            notes=notes,
            vision_source=source,
            # LLaVA's tokenizer_image_token tokenizes the text around the image chunk by
            # chunk (each chunk with SentencePiece's dummy prefix, whatever the tokenizer's
            # legacy flag or tokenizer.json say), so the text after an image starts with "▁"
            legacy_spaces=legacy,
            space_after_image=True,
        )


def _tower_config(tower: Path) -> dict[str, Any]:
    cfg_path = tower / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"The vision tower folder {tower} has no config.json")
    cfg = read_json(cfg_path)
    if isinstance(cfg.get("vision_config"), dict):  # a full CLIPModel
        return dict(cfg["vision_config"])
    if cfg.get("model_type") in ("clip_vision_model", None):
        return cfg
    raise UserError(f"{tower} is a {cfg.get('model_type')!r} model, not a CLIP vision tower")


class LlavaLlama(_Original):
    name: ClassVar[str] = "llava-original"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaLlamaForCausalLM",)
    model_types: ClassVar[tuple[str, ...]] = ("llava", "llava_llama")
    mistral: ClassVar[bool] = False


class LlavaMistral(_Original):
    name: ClassVar[str] = "bakllava-original"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaMistralForCausalLM",)
    model_types: ClassVar[tuple[str, ...]] = ("llava_mistral",)
    mistral: ClassVar[bool] = True
