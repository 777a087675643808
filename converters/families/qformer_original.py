"""The original releases of the Q-Former models, as their repositories publish them (no
``config.json``; every hyper-parameter comes from the tensors' shapes):

* LAVIS InstructBLIP (Vicuna): ``eva_vit_g.pth`` (the EVA ViT-g LAVIS downloads), the model's
  ``.pth`` (``{"model": {query_tokens, ln_vision.*, Qformer.bert.*, llm_proj.*}}``, e.g.
  ``instruct_blip_vicuna7b_trimmed.pth``), ``bert-base-uncased/`` (its ``vocab.txt``; LAVIS
  adds ``[DEC]``) and the Vicuna LLM as a Hugging Face folder;
* MiniGPT-4 (v1, Vicuna v0): ``eva_vit_g.pth``, ``blip2_pretrained_flant5xxl.pth`` (BLIP-2's
  ``Qformer``, ``query_tokens``, ``ln_vision``), ``pretrained_minigpt4.pth`` or the 7B's
  ``prerained_minigpt4_7b.pth`` (``llama_proj``) and the Vicuna folder.

All in one folder under their published names; the LLM is the sub-folder holding a Llama
``config.json``. ``.pth`` files are read only with ``torch.load(weights_only=True)``. The
names are mapped onto transformers' (the inverse of its ``convert_*_original_to_pytorch.py``)
and the Hugging Face plan does the rest. Differences from the transformers port kept here:
``ln_vision`` is LAVIS' LayerNorm with eps 1e-5; head sizes are EVA's 88 and BERT's 64.
LAVIS' Flan-T5 checkpoints (``t5_proj``: ``blip2_t5``, and ``blip2_t5_instruct`` whose
Q-Former keeps its text embeddings) take the Flan-T5 folder as the LLM and run it with the
exact GELU, as LAVIS does (t5_text.py); ``opt_proj`` checkpoints are refused (OPT never).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, ClassVar

from mmchat.errors import CorruptFileError, UserError
from mmchat.vision.wordpiece import read_wordpiece_folder

from ..checkpoint import Checkpoint, TensorRef, open_checkpoint
from .base import FamilyPlan, read_json, require
from .llama_text import llama_text_plan
from .minigptv2 import MINIGPT4_SYSTEM, MiniGpt4Llama2, MiniGptV2
from .original_files import (
    EVA_FILE,
    EVA_HEAD_DIM,
    QFORMER_FILE,
    OriginalFiles,
    eva_names,
    torch_refs,
)
from .qformer import INSTRUCTBLIP_TEMPLATE, qformer_plan
from .t5_text import BLIP2_T5_TEMPLATE, INSTRUCTBLIP_T5_TEMPLATE, t5_text_plan, t5_vocab

BERT_HEAD_DIM = 64
LAVIS_LN_VISION_EPS = 1e-5
MINIGPT4_PROJ = ("pretrained_minigpt4.pth", "prerained_minigpt4_7b.pth")
MINIGPT4_QFORMER = QFORMER_FILE

# MiniGPT-4 v1 (Vicuna v0, CONV_VISION): "{system}###Human: <Img><image></Img> {q}###Assistant:"
MINIGPT4_TEMPLATE = (
    "{%- set ns = namespace(system='" + MINIGPT4_SYSTEM + "') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if message['content'] is string -%}{%- set ns.system = message['content'] -%}"
    "{%- else -%}{%- set ns.system = message['content'] | selectattr('type', 'equalto', "
    "'text') | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system + '###' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'Human: ' + ('<Img><image></Img> ' * n_images) + text + '###' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'Assistant: ' + text + '###' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _renamed(refs: dict[str, TensorRef], rename: dict[str, str]) -> dict[str, TensorRef]:
    return {rename.get(k, k): r for k, r in refs.items()}


def _lavis_names(name: str, *, queries_only: bool) -> str | None:
    """A LAVIS Q-Former/connector name -> transformers' name (None: not needed)."""
    if name == "query_tokens":
        return name
    if name.startswith("ln_vision."):
        return "vision_model.post_layernorm." + name.split(".", 1)[1]
    for proj in ("llm_proj.", "llama_proj.", "t5_proj."):
        if name.startswith(proj):
            return "language_projection." + name[len(proj) :]
    if name.startswith("visual_encoder."):
        return eva_names(name[len("visual_encoder.") :])
    if not name.startswith("Qformer.bert."):
        return None
    rest = name[len("Qformer.bert.") :]
    if rest.startswith("embeddings.LayerNorm."):
        kind = rest.rsplit(".", 1)[1]
        return (
            f"qformer.layernorm.{kind}" if queries_only else f"qformer.embeddings.layernorm.{kind}"
        )
    if rest.startswith("embeddings."):
        return None if queries_only else "qformer." + rest
    if not rest.startswith("encoder.layer."):
        return None
    rest = rest.replace(".attention.self.", ".attention.attention.")
    rest = rest.replace(".crossattention.self.", ".crossattention.attention.")
    if queries_only and re.match(r"encoder\.layer\.\d+\.(intermediate|output)\.", rest):
        return None  # the text FFN: unused without text input
    return "qformer." + rest


def _shape_config(ckpt: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """Vision and Q-Former configs from the tensors (LAVIS ships no config)."""
    cls = require(ckpt, "vision_model.embeddings.class_embedding", "EVA class token")
    width = int(cls.shape[-1])
    pe = require(ckpt, "vision_model.embeddings.patch_embedding.weight", "EVA patch embedding")
    pos = require(ckpt, "vision_model.embeddings.position_embedding", "EVA positions")
    patch = int(pe.shape[-1])
    grid = math.isqrt(int(pos.shape[-2]) - 1)
    if grid * grid + 1 != int(pos.shape[-2]) or width % EVA_HEAD_DIM:
        raise CorruptFileError(
            f"the EVA ViT has {pos.shape[-2]} positions and width {width}: not an EVA ViT-g"
        )
    fc1 = require(ckpt, "vision_model.encoder.layers.0.mlp.fc1.weight", "EVA MLP")
    layers = {
        int(m.group(1))
        for n in ckpt.names()
        if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", n))
    }
    vcfg = {
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": width // EVA_HEAD_DIM,
        "image_size": grid * patch,
        "patch_size": patch,
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }
    qt = require(ckpt, "query_tokens", "learned queries")
    d = int(qt.shape[-1])
    ffn = require(ckpt, "qformer.encoder.layer.0.intermediate_query.dense.weight", "Q-Former FFN")
    n_layer = len(_indices(ckpt, r"qformer\.encoder\.layer\.(\d+)\."))
    cross = sorted(_indices(ckpt, r"qformer\.encoder\.layer\.(\d+)\.crossattention\."))
    if not cross or cross[0] != 0 or d % BERT_HEAD_DIM:
        raise CorruptFileError("the Q-Former's cross-attention layers or width are not BLIP-2's")
    freq = cross[1] if len(cross) > 1 else n_layer
    if cross != list(range(0, n_layer, freq)):
        raise CorruptFileError(f"Q-Former cross-attention in layers {cross}: not every n-th layer")
    key = require(ckpt, "qformer.encoder.layer.0.crossattention.attention.key.weight", "cross key")
    qcfg = {
        "hidden_size": d,
        "intermediate_size": int(ffn.shape[0]),
        "num_attention_heads": d // BERT_HEAD_DIM,
        "cross_attention_frequency": freq,
        "encoder_hidden_size": int(key.shape[1]),
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    return vcfg, qcfg


def _indices(ckpt: Checkpoint, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for n in ckpt.names() if (m := rx.match(n))}


class _Original:
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    parts: ClassVar[tuple[str, ...]]  # the OriginalFiles overrides it reads

    def __init__(self, files: OriginalFiles) -> None:
        self.files = files

    @classmethod
    def detect(cls, config: dict[str, Any]) -> bool:
        return False  # these folders have no config.json: see detect_folder

    @classmethod
    def detect_folder(cls, files: OriginalFiles) -> bool:
        raise NotImplementedError

    def _model_refs(self) -> tuple[dict[str, TensorRef], Path | None, bool]:
        """(original-name refs of everything but EVA, the bert folder, text input)."""
        raise NotImplementedError

    def plan(
        self, folder: Path, config: dict[str, Any], *, vision_tower: Path | None
    ) -> FamilyPlan:
        if vision_tower is not None:
            raise UserError(f"--vision-tower does not apply to {self.name}")
        self.files.refuse_unused(self.parts, self.name)
        refs, bert, text_input = self._model_refs()
        queries_only = not text_input
        view: dict[str, TensorRef] = {}
        for name, ref in refs.items():
            new = _lavis_names(name, queries_only=queries_only)
            if new is not None:
                view[new] = ref
        if not any(k.startswith("vision_model.encoder.") for k in view):
            for name, ref in self.files.refs(EVA_FILE).items():
                new = eva_names(name)
                if new is not None:
                    view[new] = ref
        ckpt = Checkpoint(view, [])
        vcfg, qcfg = _shape_config(ckpt)
        llm = self.files.llm()
        tcfg = read_json(llm / "config.json")
        t5 = tcfg.get("model_type") == "t5"
        if t5 != ("t5_proj.weight" in refs):
            want = "a Flan-T5" if "t5_proj.weight" in refs else "a Llama/Vicuna"
            raise UserError(f"{self.name}: this checkpoint's language model is {want} folder")
        notes: list[str] = []
        t5_kv: list[tuple[str, Any]] = []
        if t5:  # LAVIS' blip2_t5 / blip2_t5_instruct run Flan-T5 with the exact GELU
            hp, jobs, t5_kv = t5_text_plan(
                open_checkpoint(llm), tcfg | {"dense_act_fn": "gelu"}, prefix="", notes=notes
            )
            text = (hp, jobs)
            template = INSTRUCTBLIP_T5_TEMPLATE if text_input else BLIP2_T5_TEMPLATE
        else:
            text = llama_text_plan(
                open_checkpoint(llm),
                tcfg,
                layer_prefix="model.layers.",
                embed="model.embed_tokens.weight",
                norm="model.norm.weight",
                lm_head="lm_head.weight",
                mistral=tcfg.get("model_type") == "mistral",
            )
            template = self.template()
        tokenizer = None
        if text_input:
            if bert is None or not (bert / "vocab.txt").is_file():
                raise UserError(
                    f"{folder} has no bert-base-uncased/vocab.txt: InstructBLIP's Q-Former reads "
                    "the instruction with bert-base-uncased's WordPiece vocabulary"
                )
            tokenizer = read_wordpiece_folder(bert)
            if "[DEC]" not in tokenizer.tokens:  # LAVIS' init_tokenizer adds it
                tokenizer.tokens.append("[DEC]")
        config_ids = {
            "bos_token_id": None if t5 else tcfg.get("bos_token_id"),
            "eos_token_id": tcfg.get("eos_token_id"),
            "pad_token_id": tcfg.get("pad_token_id"),
        }
        plan = qformer_plan(
            ckpt,
            vcfg=vcfg,
            qcfg=qcfg,
            text=text,
            tokenizer=tokenizer,
            family=self.name if text_input or not t5 else "blip2-lavis",
            architecture=_lavis_architecture(self.architectures[0], t5, text_input),
            template=template,
            folders=[folder, llm],
            tokenizer_dir=llm,
            config_ids=config_ids,
            ln_vision_eps=LAVIS_LN_VISION_EPS,
            vision_source=EVA_FILE,
        )
        if t5:
            vocab, space_prefix, vocab_kv = t5_vocab(
                llm, vocab_size=text[0].n_vocab, config_ids=config_ids, template=template
            )
            plan.text.add_space_prefix = space_prefix
            plan.vocab = vocab
            plan.text_kv = t5_kv + vocab_kv
            plan.notes = notes + plan.notes
        # LAVIS' eval processor: bicubic resize to the square size, /255, CLIP mean/std
        plan.notes = [n for n in plan.notes if "image processor config" not in n]
        return plan

    def template(self) -> str:
        raise NotImplementedError


def _lavis_architecture(default: str, t5: bool, text_input: bool) -> str:
    """LAVIS' model class: Blip2T5 / Blip2T5Instruct for Flan-T5 checkpoints."""
    if not t5:
        return default
    return "Blip2T5Instruct" if text_input else "Blip2T5"


def _lavis_model_file(folder: Path) -> Path | None:
    for path in sorted(folder.glob("*.pth")):
        # blip2_pretrained_flant5xxl.pth is LAVIS' BLIP-2 Flan-T5 XXL model: a model here
        # (a folder holding MiniGPT-4's projection is detected as MiniGPT-4 first)
        if path.name in (EVA_FILE, *MINIGPT4_PROJ) or path.match(MiniGpt4Llama2.checkpoint_glob):
            continue
        return path
    return None


class LavisInstructBlip(_Original):
    name: ClassVar[str] = "instructblip-lavis"
    architectures: ClassVar[tuple[str, ...]] = ("Blip2VicunaInstruct",)

    parts: ClassVar[tuple[str, ...]] = ("eva", "llm")

    @classmethod
    def detect_folder(cls, files: OriginalFiles) -> bool:
        return files.has(EVA_FILE) and _lavis_model_file(files.folder) is not None

    def _model_refs(self) -> tuple[dict[str, TensorRef], Path | None, bool]:
        folder = self.files.folder
        path = _lavis_model_file(folder)
        assert path is not None
        refs = torch_refs(path)
        if any(k.startswith("opt_proj.") for k in refs):
            raise UserError(
                "BLIP-2 with an OPT language model cannot run on llama.cpp (it has no OPT "
                "architecture); run it with vLLM or transformers instead"
            )
        if "t5_proj.weight" in refs:  # BLIP-2 / InstructBLIP with Flan-T5
            # InstructBLIP keeps the Q-Former's text embeddings; BLIP-2 drops them
            text_input = "Qformer.bert.embeddings.word_embeddings.weight" in refs
            return refs, folder / "bert-base-uncased", text_input
        if "llm_proj.weight" not in refs:
            raise UserError(
                f"{path.name} is not a LAVIS InstructBLIP checkpoint (no llm_proj or t5_proj)"
            )
        return refs, folder / "bert-base-uncased", True

    def template(self) -> str:
        return INSTRUCTBLIP_TEMPLATE


class MiniGpt4(_Original):
    name: ClassVar[str] = "minigpt4"
    architectures: ClassVar[tuple[str, ...]] = ("MiniGPT4",)

    parts: ClassVar[tuple[str, ...]] = ("eva", "qformer", "llm")

    @classmethod
    def detect_folder(cls, files: OriginalFiles) -> bool:
        return any((files.folder / n).is_file() for n in MINIGPT4_PROJ)

    def _model_refs(self) -> tuple[dict[str, TensorRef], Path | None, bool]:
        folder = self.files.folder
        proj = next(folder / n for n in MINIGPT4_PROJ if (folder / n).is_file())
        refs = dict(self.files.refs(MINIGPT4_QFORMER))
        extra = torch_refs(proj)
        if "llama_proj.weight" not in extra:
            raise UserError(f"{proj.name} has no llama_proj: it is not a MiniGPT-4 checkpoint")
        refs.update({k: v for k, v in extra.items() if k.startswith("llama_proj.")})
        return refs, None, False

    def template(self) -> str:
        return MINIGPT4_TEMPLATE


FOLDER_FAMILIES = (MiniGptV2, MiniGpt4Llama2, MiniGpt4, LavisInstructBlip)
