"""MiniGPT-v2 and MiniGPT-4 (Llama 2) as Vision-CAIR publishes them.

MiniGPT-v2: ``eva_vit_g.pth`` (the EVA ViT-g LAVIS downloads), ``minigptv2_checkpoint.pth``
(``{"model": {llama_proj.*, the LoRA of the LLM's q_proj/v_proj:
llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight, optionally
ln_vision.*}}``) and the Llama-2-chat LLM as a Hugging Face folder (the
one sub-folder with a Llama ``config.json``), all in one folder.

No Q-Former: ``encode_img`` runs EVA at 448 px (its 16x16 learned positions bicubic-
interpolated to 32x32, as LAVIS' ``interpolate_pos_embed`` does on load: done here once, with
torch, which reading the .pth needs anyway), ``ln_vision``, drops the class row, puts every 4
consecutive patch rows side by side (1024 x 1408 -> 256 x 5632) and applies ``llama_proj``:
the vision file's projector type ``eva_concat`` (native/src/families/eva_concat.cpp). The
LoRA (r from the shapes, alpha 16 as MiniGPT-v2's config) is merged into the text GGUF
(W + alpha/r * B @ A). ``ln_vision`` is a fresh LayerNorm (eps 1e-5) frozen at weight 1, bias
0 in MiniGPT-v2 when the checkpoint does not carry it. The prompt as its demo builds it
(CONV_VISION_minigptv2): ``<s>[INST] <Img><rows></Img> {q} [/INST]`` after the tokenizer's
own BOS (so two BOS tokens, as the original tokenizes the first segment with special tokens).

MiniGPT-4 on Llama 2 (``has_qformer: False`` in ``minigpt4_llama2.yaml``) is the same vision
path at EVA's own 224 px (positions as trained) without a LoRA: ``eva_vit_g.pth``,
``pretrained_minigpt4_llama2_7b.pth`` (``{"model": {llama_proj.*}}``; ``ln_vision`` a fresh
frozen LayerNorm) and the Llama-2-chat folder. Its prompt is ``CONV_VISION_LLama2``:
``{system}<s>[INST] <Img><rows></Img> {q} [/INST] `` after the tokenizer's BOS, answers
appended as they are (its separator is empty).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmchat.errors import CorruptFileError, UserError

from ..checkpoint import TensorRef, open_checkpoint
from .base import FamilyPlan, TensorJob, image_norm_from, job, read_json
from .llama_text import llama_text_plan
from .original_files import EVA_FILE, EVA_HEAD_DIM, OriginalFiles, eva_names, torch_refs

PROJECTOR = "eva_concat"
CONCAT_ROWS = 4
LORA_ALPHA = 16.0  # MiniGPT-v2's lora_alpha (not stored in the checkpoint)
LN_VISION_EPS = 1e-5

_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
)
MINIGPTV2_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}" + _PARTS + "{%- if message['role'] == 'user' -%}"
    "{{- '<s>[INST] ' + ('<Img><image></Img> ' * n_images) + text + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + text -}}"
    "{%- elif message['role'] == 'system' -%}{{- text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

MINIGPT4_SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image "
    "once I provide it to you. Please answer my questions."
)
_SYSTEM = (
    "{%- set ns = namespace(system='" + MINIGPT4_SYSTEM + "') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', "
    "'text') | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# CONV_VISION_LLama2: roles "<s>[INST] " / " [/INST] ", separator "", the system text first
MINIGPT4_LLAMA2_TEMPLATE = (
    _SYSTEM + "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}" + _PARTS + "{%- if message['role'] == 'user' -%}"
    "{{- '<s>[INST] ' + ('<Img><image></Img> ' * n_images) + text + ' [/INST] ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass
class EvaConcatVision:
    """The ``eva_concat`` vision GGUF's metadata (docs/vision-gguf.md)."""

    image_size: int
    patch_size: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    projection_dim: int
    family: str = "minigptv2"
    projector_type: str = PROJECTOR

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // CONCAT_ROWS

    def description(self, name: str) -> str:
        return f"EVA ViT + 4-row concat + linear projection of {name} (converted by mmchat)"

    def kv(self) -> list[tuple[str, Any]]:
        return [
            ("clip.has_text_encoder", False),
            ("clip.has_vision_encoder", True),
            ("clip.projector_type", self.projector_type),
            ("clip.use_gelu", True),
            ("clip.vision.image_size", self.image_size),
            ("clip.vision.patch_size", self.patch_size),
            ("clip.vision.embedding_length", self.n_embd),
            ("clip.vision.feed_forward_length", self.n_ff),
            ("clip.vision.block_count", self.n_layer),
            ("clip.vision.attention.head_count", self.n_head),
            ("clip.vision.attention.layer_norm_epsilon", 1e-6),
            ("clip.vision.post_ln.layer_norm_epsilon", LN_VISION_EPS),
            ("clip.vision.image_mean", [float(x) for x in self.image_mean]),
            ("clip.vision.image_std", [float(x) for x in self.image_std]),
            ("clip.vision.projection_dim", self.projection_dim),
            ("mmchat.vision.family", self.family),
            ("mmchat.vision.resize", "bicubic"),
            ("mmchat.vision.concat_rows", CONCAT_ROWS),
        ]


def _const(name: str, value: float, n: int) -> TensorJob:
    return TensorJob(name, (n,), 4 * n, lambda: np.full((n,), value, dtype=np.float32))


def _interpolated_positions(ref: TensorRef, grid: int, new_grid: int, width: int) -> TensorJob:
    """EVA positions [1, 1 + g*g, H] -> [1 + G*G, H], bicubic as LAVIS' interpolate_pos_embed."""

    def load() -> np.ndarray:
        import torch

        pos = torch.from_numpy(ref.load().reshape(1 + grid * grid, width))
        cls, patches = pos[:1], pos[1:]
        img = patches.reshape(1, grid, grid, width).permute(0, 3, 1, 2)
        img = torch.nn.functional.interpolate(
            img, size=(new_grid, new_grid), mode="bicubic", align_corners=False
        )
        out = torch.cat([cls, img.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width)], 0)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    shape = (1 + new_grid * new_grid, width)
    return TensorJob("v.position_embd.weight", shape, ref.nbytes, load)


_EVA_PARTS = (
    ("self_attn.projection", "attn_out"),
    ("mlp.fc1", "ffn_up"),
    ("mlp.fc2", "ffn_down"),
    ("layer_norm1", "ln1"),
    ("layer_norm2", "ln2"),
)


def _rows(part: int, width: int) -> Any:
    def cut(a: np.ndarray) -> np.ndarray:
        return a[part * width : (part + 1) * width]

    return cut


def _eva_jobs(
    refs: dict[str, TensorRef], res_factor: int
) -> tuple[dict[str, Any], list[TensorJob]]:
    """EVA ViT-g's tensors at ``res_factor`` times its trained resolution (positions
    interpolated when > 1) and its hyper-parameters."""
    view = {n: r for k, r in refs.items() if (n := eva_names(k)) is not None}
    p = "vision_model."
    need = ("embeddings.class_embedding", "embeddings.patch_embedding.weight")
    for n in need:
        if p + n not in view:
            raise CorruptFileError(f"{EVA_FILE} has no {n} (is it LAVIS' EVA ViT-g?)")
    width = int(view[p + "embeddings.class_embedding"].shape[-1])
    pe = view[p + "embeddings.patch_embedding.weight"]
    patch = int(pe.shape[-1])
    pos = view[p + "embeddings.position_embedding"]
    n_pos = int(pos.shape[-2])
    grid = math.isqrt(n_pos - 1)
    if grid * grid + 1 != n_pos or width % EVA_HEAD_DIM:
        raise CorruptFileError(f"{EVA_FILE}: {n_pos} positions, width {width}: not an EVA ViT-g")
    layers = sorted(
        {
            int(m.group(1))
            for n in view
            if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", n))
        }
    )
    if layers != list(range(len(layers))) or not layers:
        raise CorruptFileError(f"{EVA_FILE}: blocks {layers[:5]}… are not 0..n-1")
    jobs = [
        job(
            "v.class_embd",
            view[p + "embeddings.class_embedding"],
            lambda a: a.reshape(width),
            (width,),
        ),
        job("v.patch_embd.weight", pe),
        _interpolated_positions(pos, grid, grid * res_factor, width)
        if res_factor > 1
        else job("v.position_embd.weight", pos, lambda a: a.reshape(n_pos, width), (n_pos, width)),
    ]
    if p + "embeddings.patch_embedding.bias" in view:
        jobs.append(job("v.patch_embd.bias", view[p + "embeddings.patch_embedding.bias"]))
    n_ff = 0
    for i in layers:
        b = f"{p}encoder.layers.{i}."
        t = f"v.blk.{i}."

        def g(s: str, _b: str = b, _i: int = i) -> TensorRef:
            if _b + s not in view:
                raise CorruptFileError(f"{EVA_FILE}: block {_i} has no {s}")
            return view[_b + s]

        qkv = g("self_attn.qkv.weight")
        for k, part in (("q", 0), ("k", 1), ("v", 2)):
            jobs.append(
                job(
                    f"{t}attn_{k}.weight",
                    qkv,
                    _rows(part, width),
                    (width, width),
                )
            )
        jobs.append(job(f"{t}attn_q.bias", g("self_attn.q_bias")))
        jobs.append(job(f"{t}attn_v.bias", g("self_attn.v_bias")))
        for hf, gg in _EVA_PARTS:
            jobs.append(job(f"{t}{gg}.weight", g(hf + ".weight")))
            jobs.append(job(f"{t}{gg}.bias", g(hf + ".bias")))
        n_ff = int(g("mlp.fc1.weight").shape[0])
    hp = {
        "image_size": grid * res_factor * patch,
        "patch_size": patch,
        "n_embd": width,
        "n_ff": n_ff,
        "n_layer": len(layers),
        "n_head": width // EVA_HEAD_DIM,
    }
    return hp, jobs


def _merge_lora(base: TensorJob, a: TensorRef, b: TensorRef, scale: float) -> TensorJob:
    def load() -> np.ndarray:
        w = base.load()
        delta = b.load().astype(np.float64) @ a.load().astype(np.float64)
        return np.ascontiguousarray(w + (scale * delta).astype(np.float32))

    return TensorJob(base.name, base.shape, base.source_bytes + a.nbytes + b.nbytes, load)


class MiniGptV2:
    """MiniGPT-v2; ``MiniGpt4Llama2`` changes the class facts below."""

    name: ClassVar[str] = "minigptv2"
    architectures: ClassVar[tuple[str, ...]] = ("MiniGPTv2",)
    checkpoint_glob: ClassVar[str] = "minigptv2*.pth"
    res_factor: ClassVar[int] = 2  # EVA at twice its pre-training resolution (224 -> 448)
    lora: ClassVar[bool] = True
    template: ClassVar[str] = MINIGPTV2_TEMPLATE
    title: ClassVar[str] = "MiniGPT-v2"

    def __init__(self, files: OriginalFiles) -> None:
        self.files = files

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return False  # no config.json: see detect_folder

    @classmethod
    def detect_folder(cls, files: OriginalFiles) -> bool:
        return any(files.folder.glob(cls.checkpoint_glob))

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError(f"--vision-tower does not apply to {self.title}")
        self.files.refuse_unused(("eva", "llm"), self.title)
        ckpt_path = sorted(folder.glob(self.checkpoint_glob))[0]
        refs = torch_refs(ckpt_path)
        if "llama_proj.weight" not in refs:
            raise UserError(
                f"{ckpt_path.name} has no llama_proj: it is not a {self.title} checkpoint"
            )
        vhp, vis_jobs = _eva_jobs(self.files.refs(EVA_FILE), self.res_factor)
        width = vhp["n_embd"]
        for kind, value in (("weight", 1.0), ("bias", 0.0)):
            key = f"ln_vision.{kind}"
            vis_jobs.append(
                job(f"v.post_ln.{kind}", refs[key])
                if key in refs
                else _const(f"v.post_ln.{kind}", value, width)
            )
        proj = refs["llama_proj.weight"]
        if len(proj.shape) != 2 or proj.shape[1] != CONCAT_ROWS * width:
            raise UserError(
                f"llama_proj reads {proj.shape[-1]}-wide rows but 4 EVA rows are "
                f"{CONCAT_ROWS * width}: "
                "the checkpoint and eva_vit_g.pth do not belong together"
            )
        vis_jobs.append(job("mm.proj.weight", proj))
        if "llama_proj.bias" in refs:
            vis_jobs.append(job("mm.proj.bias", refs["llama_proj.bias"]))

        llm = self.files.llm()
        tcfg = read_json(llm / "config.json")
        text_hp, text_jobs = llama_text_plan(
            open_checkpoint(llm),
            tcfg,
            layer_prefix="model.layers.",
            embed="model.embed_tokens.weight",
            norm="model.norm.weight",
            lm_head="lm_head.weight",
            mistral=False,
        )
        if int(proj.shape[0]) != text_hp.n_embd:
            raise UserError(
                f"llama_proj outputs width {proj.shape[0]} but the language model is "
                f"{text_hp.n_embd} wide; they do not belong together"
            )
        if self.lora:
            text_jobs = self._with_lora(text_jobs, refs, text_hp.n_head, text_hp.n_head_kv)
        elif any(".lora_A." in k for k in refs):
            raise UserError(
                f"{ckpt_path.name} holds a LoRA of the language model, which {self.title} "
                f"does not have: it is not a {self.title} checkpoint"
            )
        notes: list[str] = []
        if "ln_vision.weight" not in refs:
            notes.append(
                f"ln_vision not in the checkpoint: {self.title}'s frozen fresh LayerNorm (1, 0)"
            )
        mean, std = image_norm_from([folder, llm], notes)
        notes = [n for n in notes if "image processor config" not in n]
        return FamilyPlan(
            family=self.name,
            architecture=self.architectures[0],
            text=text_hp,
            text_tensors=text_jobs,
            vision=EvaConcatVision(
                image_mean=mean,
                image_std=std,
                projection_dim=text_hp.n_embd,
                family=self.name,
                **vhp,
            ),
            vision_tensors=vis_jobs,
            tokenizer_dir=llm,
            default_template=self.template,
            config_ids={
                "bos_token_id": tcfg.get("bos_token_id"),
                "eos_token_id": tcfg.get("eos_token_id"),
                "pad_token_id": tcfg.get("pad_token_id"),
            },
            notes=notes,
            vision_source=EVA_FILE,
            legacy_spaces=True,
            add_bos=False,
        )

    @staticmethod
    def _with_lora(
        jobs: list[TensorJob], refs: dict[str, TensorRef], n_head: int, n_head_kv: int
    ) -> list[TensorJob]:
        """Merge the q_proj/v_proj LoRA into the text tensors (attn_q rows are in llama.cpp's
        rope order, so the merged delta is permuted the same way)."""

        rx = re.compile(
            r"llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qv])_proj\.lora_A\.weight"
        )
        lora: dict[str, tuple[TensorRef, TensorRef]] = {}
        for name, a in refs.items():
            m = rx.fullmatch(name)
            if m is None:
                continue
            b_name = name.replace("lora_A", "lora_B")
            if b_name not in refs:
                raise CorruptFileError(f"LoRA {name} has no lora_B")
            lora[f"blk.{m.group(1)}.attn_{m.group(2)}.weight"] = (a, refs[b_name])
        if not lora:
            raise UserError("the MiniGPT-v2 checkpoint holds no LoRA of the language model")
        out = []
        for j in jobs:
            if j.name in lora:
                a, b = lora.pop(j.name)
                scale = LORA_ALPHA / float(a.shape[0])
                if j.name.endswith("attn_q.weight"):
                    b = _PermutedRef(b, n_head)
                j = _merge_lora(j, a, b, scale)
            out.append(j)
        if lora:
            raise CorruptFileError(f"LoRA for tensors the model does not have: {sorted(lora)[:3]}")
        return out


class _PermutedRef(TensorRef):
    """lora_B of q_proj with its rows in llama.cpp's rope order (like the merged weight)."""

    def __init__(self, ref: TensorRef, n_head: int) -> None:
        super().__init__(ref.name, ref.shape, ref.dtype, ref.nbytes, ref._reader)
        self._n_head = n_head

    def load(self) -> np.ndarray:
        from .llama_text import _permute_rope

        return _permute_rope(super().load(), self._n_head)


class MiniGpt4Llama2(MiniGptV2):
    """MiniGPT-4 on Llama 2: no Q-Former, EVA at 224 px, no LoRA (module docstring)."""

    name: ClassVar[str] = "minigpt4-llama2"
    architectures: ClassVar[tuple[str, ...]] = ("MiniGPT4Llama2",)
    checkpoint_glob: ClassVar[str] = "pretrained_minigpt4_llama2*.pth"
    res_factor: ClassVar[int] = 1
    lora: ClassVar[bool] = False
    template: ClassVar[str] = MINIGPT4_LLAMA2_TEMPLATE
    title: ClassVar[str] = "MiniGPT-4 (Llama 2)"
