"""LLaVA 1.6 ("LLaVA-NeXT", anyres) checkpoints.

* llava-hf ``LlavaNextForConditionalGeneration`` (``llava-hf/llava-v1.6-mistral-7b-hf``,
  ``llava-v1.6-vicuna-7b-hf``, ``-13b-hf``, ``-34b-hf``): the llava-hf key layout plus a
  top-level ``image_newline``.
* The original haotian-liu layout (``liuhaotian/llava-v1.6-*``): ``LlavaLlamaForCausalLM`` /
  ``LlavaMistralForCausalLM`` with ``image_aspect_ratio: anyres`` and ``mm_patch_merge_type:
  spatial_unpad``, ``model.image_newline``, and the fine-tuned CLIP tower saved inside the
  checkpoint (``mm_vision_tower`` still names the hub tower, used for its config only).

The mmproj is the LLaVA 1.5 one plus ``v.image_newline``, ``clip.vision.image_grid_pinpoints``
and ``clip.vision.mm_patch_merge_type = spatial_unpad`` (what llama.cpp's mtmd reads), and
``mmchat.vision.unpad_rounding``. Pinpoints are written as (width, height) pairs in the order
the reference model tries them, llama.cpp's reading: the llava-hf config's pairs are (height,
width), so they are swapped here; original LLaVA's are already (width, height). The rounding
records how the reference unpads: original LLaVA truncates ("truncate"), transformers rounds
to 7 decimals first ("round7"); mmchat's runtime follows it (see mmchat/vision/anyres.py).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import UserError

from ..checkpoint import open_checkpoint
from .base import Family, FamilyPlan, TensorJob, expect_shape, job
from .clip import VisionHParams
from .llava_hf import LlavaHF
from .llava_original import LlavaLlama, LlavaMistral

PATCH_MERGE = "spatial_unpad"
KEY_PINPOINTS = "clip.vision.image_grid_pinpoints"
KEY_MERGE = "clip.vision.mm_patch_merge_type"
KEY_ROUNDING = "mmchat.vision.unpad_rounding"

# "[INST] <image>\n<question> [/INST]" (llava-v1.6-mistral's conv_mistral_instruct); content
# may be a string or a list of {"type": "image"|"text"} parts (images first)
MISTRAL_INSTRUCT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = text + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '[INST] ' + ns.system + ('<image>\\n' * n_images) + text + ' [/INST]' -}}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + text + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def _clip_vision(plan: FamilyPlan) -> VisionHParams:
    """The CLIP vision spec of a LLaVA plan (the base families always write one)."""
    if not isinstance(plan.vision, VisionHParams):
        raise TypeError(f"{plan.family}: expected a CLIP vision spec")
    return plan.vision


def parse_pinpoints(
    raw: Any, *, image_size: int, pair_order: str, where: str
) -> list[tuple[int, int]]:
    """``image_grid_pinpoints`` from a config -> (width, height) pairs in trial order.

    ``pair_order`` is how the config spells a pair: "wh" (original LLaVA) or "hw"
    (transformers). ``UserError`` for a missing or malformed list."""
    if raw is None:
        raise UserError(
            f"{where} has no image_grid_pinpoints: a LLaVA 1.6 (anyres) checkpoint must list "
            "the canvas sizes its images are tiled to"
        )
    value = raw
    if isinstance(raw, str):  # original LLaVA accepts the list written as a string
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise UserError(
                f"{where}: image_grid_pinpoints {raw!r} is not a list of [width, height] pairs"
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise UserError(
            f"{where}: image_grid_pinpoints must be a non-empty list of pairs, got {raw!r}"
        )
    pairs: list[tuple[int, int]] = []
    for pin in value:
        ok = (
            isinstance(pin, (list, tuple))
            and len(pin) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pin)
        )
        if not ok:
            raise UserError(
                f"{where}: image_grid_pinpoints entry {pin!r} is not a pair of positive integers"
            )
        a, b = int(pin[0]), int(pin[1])
        if a % image_size or b % image_size:
            raise UserError(
                f"{where}: image_grid_pinpoints entry {[a, b]} is not a multiple of the vision "
                f"tower's image size {image_size}"
            )
        pairs.append((a, b) if pair_order == "wh" else (b, a))
    return pairs


def add_anyres(
    plan: FamilyPlan,
    *,
    newline: TensorJob,
    pinpoints_wh: list[tuple[int, int]],
    rounding: str,
) -> FamilyPlan:
    """Turn a LLaVA 1.5-style plan into the LLaVA 1.6 one."""
    expect_shape_job(newline, plan.text.n_embd)
    plan.vision_tensors.append(newline)
    plan.vision_kv.extend(
        [
            (KEY_PINPOINTS, [x for pin in pinpoints_wh for x in pin]),
            (KEY_MERGE, PATCH_MERGE),
            (KEY_ROUNDING, rounding),
        ]
    )
    return plan


def expect_shape_job(newline: TensorJob, n_embd: int) -> None:
    if tuple(newline.shape) != (n_embd,):
        raise UserError(
            f"image_newline has shape {list(newline.shape)}, expected [{n_embd}] (the language "
            "model's hidden size)"
        )


def _newline_job(folder: Path, names: tuple[str, ...], n_embd: int) -> TensorJob:
    ckpt = open_checkpoint(folder)
    name = next((n for n in names if n in ckpt), None)
    if name is None:
        raise UserError(
            f"{folder} has no image_newline tensor ({' or '.join(names)}), which LLaVA 1.6 "
            "appends after every row of image features"
        )
    ref = ckpt[name]
    expect_shape(ref, (n_embd,), "image_newline")
    return job("v.image_newline", ref)


class LlavaNextHF:
    name: ClassVar[str] = "llava-next-hf"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaNextForConditionalGeneration",)

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        archs = config.get("architectures") or []
        if any(a in cls.architectures for a in archs):
            return True
        return not archs and config.get("model_type") == "llava_next"

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        vcfg = config.get("vision_config") or {}
        image_size = int(vcfg.get("image_size", 336))
        # transformers spells each pair (height, width)
        pins = parse_pinpoints(
            config.get("image_grid_pinpoints"),
            image_size=image_size,
            pair_order="hw",
            where=f"{folder / 'config.json'}",
        )
        if config.get("use_image_newline_parameter") is False:
            raise UserError("LLaVA-NeXT checkpoints without image_newline are not supported")
        plan = LlavaHF().plan(folder, config, vision_tower=vision_tower)
        if _clip_vision(plan).image_size != image_size:
            raise UserError("vision_config.image_size disagrees with the vision tower")
        newline = _newline_job(folder, ("image_newline", "model.image_newline"), plan.text.n_embd)
        plan.family = self.name
        plan.architecture = self.architectures[0]
        return add_anyres(plan, newline=newline, pinpoints_wh=pins, rounding="round7")


class _NextOriginal:
    name: ClassVar[str] = "llava-next-original"
    architectures: ClassVar[tuple[str, ...]] = ()
    base: ClassVar[type[LlavaLlama] | type[LlavaMistral]] = LlavaLlama
    template: ClassVar[str | None] = None

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        if not cls.base.detect(config):
            return False
        merge = str(config.get("mm_patch_merge_type") or "flat")
        aspect = str(config.get("image_aspect_ratio") or "")
        return merge.startswith("spatial") or aspect.startswith("anyres")

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        where = str(folder / "config.json")
        merge = str(config.get("mm_patch_merge_type") or "flat")
        aspect = str(config.get("image_aspect_ratio") or "")
        if merge != PATCH_MERGE or aspect != "anyres":
            raise UserError(
                f"{where}: mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r} is "
                "not supported (LLaVA 1.6 uses 'spatial_unpad' with 'anyres')"
            )
        plan = self.base().plan(folder, config, vision_tower=vision_tower)
        pins = parse_pinpoints(
            config.get("image_grid_pinpoints"),
            image_size=_clip_vision(plan).image_size,
            pair_order="wh",
            where=where,
        )
        newline = _newline_job(folder, ("model.image_newline",), plan.text.n_embd)
        plan.family = self.name
        if self.template is not None:
            plan.default_template = self.template
        return add_anyres(plan, newline=newline, pinpoints_wh=pins, rounding="truncate")


class LlavaNextLlama(_NextOriginal):
    name: ClassVar[str] = "llava-next-original"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaLlamaForCausalLM (anyres)",)
    base = LlavaLlama


class LlavaNextMistral(_NextOriginal):
    name: ClassVar[str] = "llava-next-original"
    architectures: ClassVar[tuple[str, ...]] = ("LlavaMistralForCausalLM (anyres)",)
    base = LlavaMistral
    template = MISTRAL_INSTRUCT_TEMPLATE


FAMILIES: tuple[type[Family], ...] = (LlavaNextHF, LlavaNextLlama, LlavaNextMistral)
"""Register these before the LLaVA 1.5 families: the original layouts share their
architecture names and are told apart by ``mm_patch_merge_type`` / ``image_aspect_ratio``."""
