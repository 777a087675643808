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
from ..tokenizer import LLAVA_V1_TEMPLATE, legacy_spaces_of
from .base import (
    FamilyPlan,
    clip_vision_plan,
    image_norm_from,
    llama_text_plan,
    mlp_projector_jobs,
)

# (embeddings, layer prefix, final norm, lm_head) of the language model
_TEXT_LAYOUTS = (
    (
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    ),
    (
        "model.language_model.embed_tokens.weight",
        "model.language_model.layers.",
        "model.language_model.norm.weight",
        "lm_head.weight",
    ),
)
# where the CLIP vision model's "embeddings."/"encoder." live (transformers 5 drops the
# "vision_model." level when it saves)
_VISION_PREFIXES = (
    "vision_tower.vision_model.",
    "model.vision_tower.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
)
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")


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
        text = next((lay for lay in _TEXT_LAYOUTS if lay[0] in ckpt), None)
        vision = next(
            (p for p in _VISION_PREFIXES if p + "embeddings.patch_embedding.weight" in ckpt), None
        )
        projector = next((p for p in _PROJECTOR_PREFIXES if p + "linear_1.weight" in ckpt), None)
        if text is None or vision is None or projector is None:
            missing = [
                what
                for what, found in (
                    ("language model", text),
                    ("vision tower", vision),
                    ("projector", projector),
                )
                if found is None
            ]
            raise UserError(
                f"{folder} does not look like a llava-hf checkpoint: no {' / '.join(missing)} "
                "weights under the names transformers uses"
            )
        embed, layers, norm, lm_head = text
        text_hp, text_jobs = llama_text_plan(
            ckpt,
            tcfg,
            layer_prefix=layers,
            embed=embed,
            norm=norm,
            lm_head=lm_head,
            mistral=text_type == "mistral",
        )
        legacy_spaces, notes = legacy_spaces_of(folder)
        mean, std = image_norm_from([folder], notes)
        vis_hp, vis_jobs = clip_vision_plan(
            ckpt,
            vcfg,
            prefix=vision,
            select_layer=config.get("vision_feature_layer", -2),
            image_mean=mean,
            image_std=std,
            projection_dim=text_hp.n_embd,
        )
        vis_jobs += mlp_projector_jobs(
            ckpt,
            first=projector + "linear_1.",
            second=projector + "linear_2.",
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
            # transformers' processor tokenizes the whole prompt with <image> as an added
            # token; the tokenizer's pipeline decides whether a "▁" follows special tokens
            legacy_spaces=legacy_spaces,
        )
