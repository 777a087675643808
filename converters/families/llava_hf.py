"""llava-hf ``LlavaForConditionalGeneration`` checkpoints (LLaVA 1.5, bakLlava-v1-hf).

Both key layouts transformers has written are accepted: ``language_model.model.*`` /
``vision_tower.*`` / ``multi_modal_projector.*`` (transformers 4) and
``model.language_model.*`` / ``model.vision_tower.*`` / ``model.multi_modal_projector.*``
with a top-level ``lm_head`` (transformers >= 4.52 and 5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import UserError

from ..checkpoint import open_checkpoint
from ..tokenizer import LLAVA_V1_TEMPLATE
from .base import (
    FamilyPlan,
    clip_vision_plan,
    image_norm_from,
    llama_text_plan,
    mlp_projector_jobs,
)

_LAYOUTS = (
    {
        "embed": "language_model.model.embed_tokens.weight",
        "layers": "language_model.model.layers.",
        "norm": "language_model.model.norm.weight",
        "lm_head": "language_model.lm_head.weight",
        "vision": "vision_tower.vision_model.",
        "projector": "multi_modal_projector.",
    },
    {
        "embed": "model.language_model.embed_tokens.weight",
        "layers": "model.language_model.layers.",
        "norm": "model.language_model.norm.weight",
        "lm_head": "lm_head.weight",
        "vision": "model.vision_tower.vision_model.",
        "projector": "model.multi_modal_projector.",
    },
)


class LlavaHF:
    name: ClassVar[str] = "llava-hf"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        if any(a in cls.architectures for a in archs):
            return True
        return config.get("model_type") == "llava" and isinstance(config.get("text_config"), dict)

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError(
                "--vision-tower is only for original LLaVA checkpoints; a llava-hf checkpoint "
                "contains its vision tower"
            )
        tcfg = dict(config.get("text_config") or {})
        vcfg = dict(config.get("vision_config") or {})
        text_type = tcfg.get("model_type", "llama")
        if text_type not in ("llama", "mistral"):
            raise UserError(
                f"llava-hf checkpoints with a {text_type!r} language model are not supported "
                "(llama and mistral are)"
            )
        if vcfg.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise UserError(
                f"llava-hf checkpoints with a {vcfg.get('model_type')!r} vision tower are not "
                "supported (CLIP is)"
            )
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise UserError(
                f"vision_feature_select_strategy {strategy!r} is not supported (LLaVA uses "
                "'default': patch features without the class token)"
            )
        act = config.get("projector_hidden_act", "gelu")
        if act != "gelu":
            raise UserError(f"projector activation {act!r} is not supported (gelu is)")

        ckpt = open_checkpoint(folder)
        layout = next((lay for lay in _LAYOUTS if lay["embed"] in ckpt), None)
        if layout is None:
            raise UserError(
                f"{folder} does not look like a llava-hf checkpoint: no "
                f"{_LAYOUTS[0]['embed']} or {_LAYOUTS[1]['embed']}"
            )
        mistral = text_type == "mistral"
        text_hp, text_jobs = llama_text_plan(
            ckpt,
            tcfg,
            layer_prefix=layout["layers"],
            embed=layout["embed"],
            norm=layout["norm"],
            lm_head=layout["lm_head"],
            mistral=mistral,
        )
        notes: list[str] = []
        mean, std = image_norm_from([folder], notes)
        vis_hp, vis_jobs = clip_vision_plan(
            ckpt,
            vcfg,
            prefix=layout["vision"],
            select_layer=config.get("vision_feature_layer", -2),
            image_mean=mean,
            image_std=std,
            projection_dim=text_hp.n_embd,
        )
        vis_jobs += mlp_projector_jobs(
            ckpt,
            first=layout["projector"] + "linear_1.",
            second=layout["projector"] + "linear_2.",
            vision_width=vis_hp.n_embd,
            text_width=text_hp.n_embd,
        )
        return FamilyPlan(
            family=self.name,
            architecture=self.architectures[0],
            text=text_hp,
            text_tensors=text_jobs,
            vision=vis_hp,
            vision_tensors=vis_jobs,
            tokenizer_dir=folder,
            default_template=LLAVA_V1_TEMPLATE,
            config_ids={
                "bos_token_id": tcfg.get("bos_token_id", config.get("bos_token_id")),
                "eos_token_id": tcfg.get("eos_token_id", config.get("eos_token_id")),
                "pad_token_id": config.get("pad_token_id", tcfg.get("pad_token_id")),
            },
            notes=notes,
            vision_source="checkpoint",
        )
