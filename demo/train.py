#!/usr/bin/env python3
"""Train mmchat's built-in demo model: a tiny LLaVA that names coloured shapes.

Run from the repository root (needs the ``fixtures`` extra: torch, transformers 5,
sentencepiece, protobuf, safetensors, pillow, numpy)::

    nice -n 15 python demo/train.py            # writes mmchat/data/demo/ and demo/train.log

Architecture (llava-hf ``LlavaForConditionalGeneration``, trained from scratch):
CLIP ViT (64 px pictures, 8 px patches -> 64 image tokens, width 128, 4 blocks of which
LLaVA's feature layer -2 uses 3, quick-GELU) -> LLaVA 1.5 ``mlp2x_gelu`` projector ->
Llama decoder (width 256, 2 blocks, 4 heads, FFN 512) with a tiny byte-fallback
SentencePiece BPE tokenizer. The text widths are multiples of 256 so that the default
``--quant q4_k_m`` really stores Q4_K/Q6_K blocks (ggml K-quants need row lengths that are
multiples of 256; others fall back to Q5_0/Q8_0).

Data: ``demo/shapes.py`` draws one or two shapes (4 kinds, 6 colours, any size, position
and background). Pictures are preprocessed as original LLaVA and mmchat's vision engine do:
padded to a square with the mean colour, bicubic resize, CLIP normalisation.

Training, in two phases as LLaVA's recipe (a vision tower trained first, then frozen):

1. the vision tower alone: training-only linear heads on its hidden state -2 (what the
   projector reads) predict per patch which shape and colour covers it and whether it is
   the left or the right shape; the heads are discarded;
2. projector + language model, tower frozen, on conversations of 1-4 turns about one
   picture, formatted and tokenized exactly as transformers' llava-hf processor and mmchat's
   runtime do with the converted GGUF (Vicuna v1 ``USER: <image>\n... ASSISTANT:``; only the
   start of the prompt gets SentencePiece's dummy-prefix space, the text after the image and
   after ``</s>`` continues without one: ``legacy=False``). The ids are checked against
   transformers' own tokenization of the rendered template and written to
   ``demo/prompts.json`` for the test suite.

The run ends by saving the checkpoint (llava-hf hub key layout, float16), reloading it with
``LlavaForConditionalGeneration.from_pretrained`` (every tensor checked) and printing its
greedy accuracy on held-out pictures.

Everything is seeded; the run is deterministic for a given ``--threads``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as S

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "mmchat" / "data" / "demo"
DEFAULT_LOG = ROOT / "demo" / "train.log"


@dataclass(frozen=True)
class Config:
    seed: int = 8
    # vision (CLIP ViT)
    image_size: int = 64
    patch_size: int = 8
    v_hidden: int = 128
    v_ffn: int = 512
    v_layers: int = 4
    v_heads: int = 4
    # text (Llama)
    hidden: int = 256
    ffn: int = 512
    layers: int = 2
    heads: int = 4
    max_pos: int = 2048
    sp_vocab: int = 512
    # training
    steps: int = 1000
    batch: int = 32
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.02
    # phase 1: the vision tower alone on per-patch labels
    v_steps: int = 2000
    v_batch: int = 64
    v_lr: float = 2e-3
    # evaluation
    n_heldout: int = 200


IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
BOS, EOS = 1, 2

# Chat template shipped with the checkpoint (and so written into the GGUF): Vicuna v1 as
# LLaVA 1.5 uses it, without a default system prompt (the demo never saw one). Accepts
# string content or typed parts (images first), like the llava-hf templates.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}{%- set n_images = 0 -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') -%}"
    "{%- set n_images = message['content'] | selectattr('type', 'equalto', 'image') "
    "| list | length -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- text + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- 'USER: ' + ('<image>\\n' * n_images) + text + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + text + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# Plain English for the tokenizer besides the chat lines (so other words get real pieces).
EXTRA_TEXT = """\
Hello! I am a tiny demo model. I can only see coloured shapes in a picture.
Ask me what is in the image, what colour or shape it is, or how many shapes there are.
The picture shows a shape on a plain, striped or noisy background.
Please attach an image and ask a short question about it.
left right top bottom middle small large big tiny one two three four five
Thank you. Yes. No. Sorry, I do not know.
"""


# --- tokenizer ------------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    lines: list[str] = []
    colours = list(S.COLOURS)
    for qs in S.QUESTIONS.values():
        for q in qs:
            lines.append(f"USER: {q} ASSISTANT:")
    # every answer form, for single shapes and a spread of pairs
    for c in colours:
        for k in S.SHAPES:
            one = S.Scene(
                64,
                64,
                ("solid", (0, 0, 0), (0, 0, 0), 0, 0),
                (S.Shape(k, c, (0, 0, 0), 0, 0, 1, 0),),
                0,
            )
            for intent in S.INTENTS:
                lines.append("ASSISTANT: " + S.answer(one, intent))
            for c2 in colours:
                k2 = S.SHAPES[(S.SHAPES.index(k) + colours.index(c2)) % len(S.SHAPES)]
                two = S.Scene(
                    64,
                    64,
                    one.background,
                    (one.shapes[0], S.Shape(k2, c2, (0, 0, 0), 0, 0, 1, 0)),
                    0,
                )
                for intent in S.INTENTS:
                    lines.append("ASSISTANT: " + S.answer(two, intent))
    lines += [ln for ln in EXTRA_TEXT.splitlines() if ln.strip()]
    return lines


def train_sentencepiece(vocab: int) -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_corpus()),
        model_writer=out,
        model_type="bpe",  # llama.cpp's SPM tokenizer reproduces BPE merges exactly
        vocab_size=vocab,
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return out.getvalue()


class Tok:
    """The tokenization of a Vicuna-v1 chat with one image, as transformers' llava-hf
    processor does it (``legacy=False``) and mmchat's runtime reproduces for a converted
    checkpoint: only the very start of the prompt gets SentencePiece's dummy-prefix space;
    text after ``<image>``/the image and after ``</s>`` is tokenized as a continuation.

    ``head``: BOS + "USER: "; ``cont``: any later text.
    """

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        m = pb.ModelProto()
        m.ParseFromString(model_proto)
        m.normalizer_spec.add_dummy_prefix = False
        self.sp_cont = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
        self.n = self.sp.get_piece_size()

    def head(self) -> list[int]:
        return [BOS, *self.sp.encode("USER: ")]

    def cont(self, text: str) -> list[int]:
        return list(self.sp_cont.encode(text))


def conversation_ids(
    tok: Tok, turns: list[tuple[str, str]], n_image: int, image_id: int
) -> tuple[list[int], list[int]]:
    """(input ids with ``n_image`` image tokens, labels: -100 except the answers + EOS)."""
    ids = tok.head() + [image_id] * n_image
    labels = [-100] * len(ids)
    for i, (q, a) in enumerate(turns):
        prompt = tok.cont(f"\n{q} ASSISTANT:" if i == 0 else f"USER: {q} ASSISTANT:")
        ans = [*tok.cont(" " + a), EOS]
        ids += prompt + ans
        labels += [-100] * len(prompt) + ans
    return ids, labels


def check_tokenization(tok: Tok) -> None:
    """Prompt/answer boundaries never merge, so training ids == what the runtime feeds."""
    for qs in S.QUESTIONS.values():
        for q in qs:
            p = f"\n{q} ASSISTANT:"
            for a in ("A red circle.", "There are two shapes.", "Purple and yellow."):
                joint = tok.cont(f"{p} {a}")
                if joint != tok.cont(p) + tok.cont(" " + a):
                    raise SystemExit(f"tokenizer merges across the answer boundary: {q!r} {a!r}")


def check_against_transformers(tok: Tok, hf_tok: Any, image_id: int) -> None:
    """Our ids == transformers' tokenization of the rendered chat (template included)."""
    turns = [
        (S.QUESTIONS["describe"][0], "A red circle and a blue square."),
        (S.QUESTIONS["count"][0], "There are two shapes."),
        (S.QUESTIONS["colour"][2], "Red and blue."),
    ]
    for n in range(1, len(turns) + 1):
        msgs: list[dict[str, Any]] = []
        for i, (q, a) in enumerate(turns[:n]):
            content = [{"type": "image"}, {"type": "text", "text": q}] if i == 0 else q
            msgs.append({"role": "user", "content": content})
            msgs.append({"role": "assistant", "content": a})
        text = hf_tok.apply_chat_template(msgs, tokenize=False)
        theirs = list(hf_tok(text, add_special_tokens=True).input_ids)
        ours, _ = conversation_ids(tok, turns[:n], 1, image_id)
        if ours != theirs:
            raise SystemExit(
                f"tokenization differs from transformers' for {text!r}:\n{ours}\n{theirs}"
            )


def prompt_record(tok: Tok, image_id: int) -> dict[str, Any]:
    """Token ids of the canonical prompts as trained (``demo/prompts.json``): the test checks
    that mmchat's runtime feeds the converted model exactly these."""
    prompts = []
    for intent in S.INTENTS:
        q = S.QUESTIONS[intent][0]
        before = tok.head()
        after = tok.cont(f"\n{q} ASSISTANT:")
        prompts.append(
            {
                "messages": [{"role": "user", "content": q, "images": 1}],
                "before_image": before,
                "after_image": after,
            }
        )
    turns = [(S.QUESTIONS["describe"][0], "A red circle and a blue square.")]
    q2 = S.QUESTIONS["count"][0]
    ids, _ = conversation_ids(tok, turns, 1, image_id)
    ids += tok.cont(f"USER: {q2} ASSISTANT:")
    pos = ids.index(image_id)
    prompts.append(
        {
            "messages": [
                {"role": "user", "content": turns[0][0], "images": 1},
                {"role": "assistant", "content": turns[0][1]},
                {"role": "user", "content": q2},
            ],
            "before_image": ids[:pos],
            "after_image": ids[pos + 1 :],
        }
    )
    return {
        "about": "Token ids demo/train.py trained with for these chats (image = one slot); "
        "generated by demo/train.py",
        "answers": {
            a: [*tok.cont(" " + a), EOS]
            for a in ("A red circle.", "There are two shapes.", "Purple and yellow.")
        },
        "prompts": prompts,
    }


# --- model ----------------------------------------------------------------------------------


def build_model(cfg: Config, vocab: int, image_id: int, pad_id: int) -> Any:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vcfg = CLIPVisionConfig(
        hidden_size=cfg.v_hidden,
        intermediate_size=cfg.v_ffn,
        num_hidden_layers=cfg.v_layers,
        num_attention_heads=cfg.v_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=cfg.v_hidden,
    )
    tcfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.ffn,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_pos,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=pad_id,
        rope_theta=10000.0,
        initializer_range=0.02,
    )
    lcfg = LlavaConfig(
        vision_config=vcfg,
        text_config=tcfg,
        image_token_index=image_id,
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        pad_token_id=pad_id,
    )
    lcfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(lcfg)


def skip_last_vision_block(model: Any) -> Any:
    """Drop the tower's last block while training (returns the full list to put back).

    LLaVA reads the tower's hidden state -2, so its last block never reaches the LLM, but
    transformers still computes it; without it, hidden state -1 is the same tensor."""
    import torch

    enc = model.model.vision_tower.encoder
    full = enc.layers
    enc.layers = torch.nn.ModuleList(list(full)[:-1])
    return full


def check_skip(model: Any, full_layers: Any, ids: Any, px: Any) -> None:
    """The shortcut gives the very features of the full tower's hidden state -2.

    (The full tower runs first: transformers hooks the blocks on the first call.)"""
    import torch

    enc = model.model.vision_tower.encoder
    short = enc.layers
    kw = {"vision_feature_select_strategy": "default", "output_hidden_states": True}
    with torch.no_grad():
        enc.layers = full_layers
        b = model.model.get_image_features(px[:4], vision_feature_layer=-2, **kw)
        enc.layers = short
        a = model.model.get_image_features(px[:4], vision_feature_layer=-1, **kw)
    fa, fb = torch.stack(list(a.pooler_output)), torch.stack(list(b.pooler_output))
    if len(b.hidden_states) != len(full_layers) + 1 or not torch.equal(fa, fb):
        raise SystemExit("the training shortcut changes the image features")


class AuxHeads:
    """Training-only linear heads on the image features LLaVA passes to the projector
    (tower hidden state -2): for every patch, which shape and which colour covers it.

    Dense labels teach the from-scratch ViT shapes far faster than the answer tokens alone
    can (whose gradient reaches the tower through the whole language model). The heads are
    not part of the model and are not saved."""

    def __init__(self, width: int) -> None:
        import torch

        self.heads = torch.nn.ModuleList(
            [
                torch.nn.Linear(width, 1 + len(S.SHAPES)),  # which shape covers the patch
                torch.nn.Linear(width, 1 + len(S.COLOURS)),  # which colour
                torch.nn.Linear(width, 3),  # the left or the right shape
            ]
        )

    def parameters(self) -> list[Any]:
        return list(self.heads.parameters())

    def loss(self, v: Any, patch: Any) -> Any:
        """Summed cross-entropy of the heads (``v``: [B, patches, width], ``patch``: [B,
        patches, 3])."""
        import torch.nn.functional as F

        return sum(
            F.cross_entropy(head(v).flatten(0, 1), patch[..., k].flatten())
            for k, head in enumerate(self.heads)
        )

    def accuracy(self, v: Any, patch: Any) -> list[float]:
        """Per head: accuracy on the patches a shape covers."""
        fg = patch[..., 0] > 0
        return [
            float((head(v).argmax(-1) == patch[..., k])[fg].float().mean())
            for k, head in enumerate(self.heads)
        ]


def train_loss(model: Any, ids: Any, labels: Any, mask: Any, px: Any) -> Any:
    """Cross-entropy of the answer tokens, the tower frozen (phase 2, as LLaVA keeps CLIP
    frozen); the LM head runs only where there is a label."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        v = tower_features(model, px)  # hidden state -2 without the class token
    image = model.model.multi_modal_projector(v)
    out = model.model(
        input_ids=ids,
        attention_mask=mask,
        mm_encoder_outputs={"image": SimpleNamespace(pooler_output=list(image))},
    )
    h = out.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    sel = target != -100
    return F.cross_entropy(model.lm_head(h[sel]), target[sel])


def tower_features(model: Any, px: Any) -> Any:
    """The patch features LLaVA hands to the projector (with the training shortcut on)."""
    out = model.model.vision_tower(px, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]


# --- data -----------------------------------------------------------------------------------


def sample(
    seed: int, cfg: Config, tok: Tok, image_id: int
) -> tuple[np.ndarray, list[int], list[int], np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    scene = S.random_scene(seed)
    n_turns = int(rng.integers(1, len(S.INTENTS) + 1))
    intents = [S.INTENTS[i] for i in rng.permutation(len(S.INTENTS))[:n_turns]]
    turns = []
    for intent in intents:
        qs = S.QUESTIONS[intent]
        # the canonical question half the time, a paraphrase otherwise
        q = qs[0] if rng.random() < 0.5 else qs[int(rng.integers(0, len(qs)))]
        turns.append((q, S.answer(scene, intent)))
    n_image = (cfg.image_size // cfg.patch_size) ** 2
    ids, labels = conversation_ids(tok, turns, n_image, image_id)
    px = S.llava_pixels(S.render(scene), cfg.image_size)
    return px, ids, labels, patch_labels(scene, cfg.image_size, cfg.patch_size)


def patch_labels(scene: S.Scene, size: int, patch: int) -> np.ndarray:
    """[patches, 3]: (shape 1..4, colour 1..6, 1 = left / 2 = right shape) of the shape
    covering at least a fifth of each patch of the preprocessed picture (padded to a square,
    resized), else zeros."""
    from PIL import Image, ImageDraw

    w, h = scene.width, scene.height
    side = max(w, h)
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    ox, oy = (side - w) // 2, (side - h) // 2
    for i, s in enumerate(scene.shapes):
        if s.kind == "circle":
            r = s.size / 2
            draw.ellipse([ox + s.cx - r, oy + s.cy - r, ox + s.cx + r, oy + s.cy + r], fill=i + 1)
        else:
            draw.polygon(S._polygon(s.kind, ox + s.cx, oy + s.cy, s.size, s.angle), fill=i + 1)
    m = np.asarray(mask.resize((size, size), Image.NEAREST))
    g = size // patch
    blocks = m.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch)
    out = np.zeros((g * g, 3), dtype=np.int64)
    for j, block in enumerate(blocks):
        counts = np.bincount(block, minlength=len(scene.shapes) + 1)[1:]
        if counts.max() * 5 >= patch * patch:
            i = int(counts.argmax())
            s = scene.shapes[i]
            out[j] = (1 + S.SHAPES.index(s.kind), 1 + list(S.COLOURS).index(s.colour), 1 + i)
    return out


def batch_for(step: int, cfg: Config, tok: Tok, image_id: int, pad_id: int) -> Any:
    import torch

    base = cfg.seed * 10_000_000 + step * cfg.batch
    items = [sample(base + j, cfg, tok, image_id) for j in range(cfg.batch)]
    assert base + cfg.batch <= S.TRAIN_SEEDS.stop
    n = max(len(it[1]) for it in items)
    ids = torch.full((cfg.batch, n), pad_id, dtype=torch.long)
    labels = torch.full((cfg.batch, n), -100, dtype=torch.long)
    mask = torch.zeros((cfg.batch, n), dtype=torch.long)
    for j, (_, i, lab, _) in enumerate(items):
        ids[j, : len(i)] = torch.tensor(i)
        labels[j, : len(lab)] = torch.tensor(lab)
        mask[j, : len(i)] = 1
    px = torch.from_numpy(np.stack([it[0] for it in items]))
    patch = torch.from_numpy(np.stack([it[3] for it in items]))
    return ids, labels, mask, px, patch


PRETRAIN_SEED_OFFSET = 5_000_000
PRETRAIN_MAX_SIDE = 96


def vision_batch(step: int, cfg: Config) -> Any:
    """Pictures + patch labels for the tower's pre-training (drawn at most 96 px: the tower
    sees them at 48 px anyway, and drawing is the bottleneck of this phase)."""
    import torch

    base = cfg.seed * 10_000_000 + PRETRAIN_SEED_OFFSET + step * cfg.v_batch
    assert base + cfg.v_batch <= S.TRAIN_SEEDS.stop
    px, patch = [], []
    for j in range(cfg.v_batch):
        scene = S.random_scene(base + j)
        scene = S.scaled(scene, min(1.0, PRETRAIN_MAX_SIDE / max(scene.width, scene.height)))
        px.append(S.llava_pixels(S.render(scene), cfg.image_size))
        patch.append(patch_labels(scene, cfg.image_size, cfg.patch_size))
    return torch.from_numpy(np.stack(px)), torch.from_numpy(np.stack(patch))


class VisionBatches:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __len__(self) -> int:
        return self.cfg.v_steps

    def __getitem__(self, step: int) -> Any:
        return vision_batch(step, self.cfg)


class Batches:
    """Batch ``step`` of the training run (a map-style dataset for a DataLoader worker)."""

    def __init__(self, cfg: Config, tok: Tok, image_id: int, pad_id: int) -> None:
        self.args = (cfg, tok, image_id, pad_id)

    def __len__(self) -> int:
        return self.args[0].steps

    def __getitem__(self, step: int) -> Any:
        return batch_for(step, *self.args)


# --- evaluation -----------------------------------------------------------------------------


def patch_report(model: Any, aux: AuxHeads, cfg: Config) -> str:
    import torch

    seeds = S.HELDOUT_SEEDS[-256:]
    scenes = [S.random_scene(s) for s in seeds]
    px = torch.from_numpy(np.stack([S.llava_pixels(S.render(sc), cfg.image_size) for sc in scenes]))
    patch = torch.from_numpy(
        np.stack([patch_labels(sc, cfg.image_size, cfg.patch_size) for sc in scenes])
    )
    with torch.no_grad():
        acc = aux.accuracy(tower_features(model, px), patch)
    return "  ".join(f"{a:.1%}" for a in acc)


def greedy_answers(
    model: Any, tok: Tok, image_id: int, question: str, pixels: np.ndarray, n_image: int
) -> list[str]:
    import torch

    ids, _ = conversation_ids(tok, [], n_image, image_id)
    ids += tok.cont(f"\n{question} ASSISTANT:")
    out: list[str] = []
    for start in range(0, len(pixels), 50):
        px = torch.from_numpy(pixels[start : start + 50])
        inp = torch.tensor([ids] * len(px))
        with torch.no_grad():
            gen = model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                pixel_values=px,
                max_new_tokens=16,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=EOS,
            )
        for row in gen[:, len(ids) :].tolist():
            if EOS in row:
                row = row[: row.index(EOS)]
            out.append(tok.sp.decode([t for t in row if t < tok.n]).strip())
    return out


def evaluate(model: Any, cfg: Config, tok: Tok, image_id: int, log: Any) -> dict[str, float]:
    seeds = list(S.HELDOUT_SEEDS[: cfg.n_heldout])
    scenes = [S.random_scene(s) for s in seeds]
    pixels = np.stack([S.llava_pixels(S.render(sc), cfg.image_size) for sc in scenes])
    n_image = (cfg.image_size // cfg.patch_size) ** 2
    results: dict[str, float] = {}
    for intent in S.INTENTS:
        q = S.QUESTIONS[intent][0]
        answers = greedy_answers(model, tok, image_id, q, pixels, n_image)
        ok = 0
        wrong: list[str] = []
        for sc, a in zip(scenes, answers, strict=True):
            if intent == "describe":
                good = S.parse_objects(a) == S.objects(sc)
            elif intent == "count":
                good = S.parse_count(a) == len(sc.shapes)
            else:
                good = a == S.answer(sc, intent)
            ok += good
            if not good and len(wrong) < 3:
                wrong.append(f"{a!r} (want {S.answer(sc, intent)!r})")
        results[intent] = ok / len(scenes)
        log(
            f"  {q:<28} {ok}/{len(scenes)} = {ok / len(scenes):.1%}"
            + (f"   e.g. {'; '.join(wrong)}" if wrong else "")
        )
    single = [i for i, sc in enumerate(scenes) if len(sc.shapes) == 1]
    answers = greedy_answers(
        model, tok, image_id, S.QUESTIONS["describe"][0], pixels[single], n_image
    )
    ok = sum(
        S.parse_objects(a) == S.objects(scenes[i]) for i, a in zip(single, answers, strict=True)
    )
    results["describe_single"] = ok / max(1, len(single))
    log(f"  describe, one-shape pictures  {ok}/{len(single)} = {results['describe_single']:.1%}")
    return results


# --- saving ---------------------------------------------------------------------------------


def write_tokenizer(folder: Path, sp_model: bytes, image_id: int, pad_id: int) -> Any:
    from transformers import AutoTokenizer

    def added(text: str) -> dict[str, Any]:
        return {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }

    tcfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": added("<unk>"),
            "1": added("<s>"),
            "2": added("</s>"),
            str(image_id): added(IMAGE_TOKEN),
            str(pad_id): added(PAD_TOKEN),
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": PAD_TOKEN,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 2048,
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
        "chat_template": CHAT_TEMPLATE,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "tokenizer.model").write_bytes(sp_model)
        (t / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
        tok = AutoTokenizer.from_pretrained(tmp)
    assert tok.convert_tokens_to_ids(IMAGE_TOKEN) == image_id, "image token id"
    assert tok.convert_tokens_to_ids(PAD_TOKEN) == pad_id, "pad token id"
    return tok


def hub_name(name: str) -> str:
    """transformers-5 parameter name -> the llava-hf hub checkpoint's tensor name."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for ours, theirs in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def check_round_trip(model: Any, folder: Path) -> None:
    """from_pretrained must give back every tensor (float16-rounded), none re-initialised."""
    import torch
    from transformers import LlavaForConditionalGeneration

    loaded = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    mine = model.state_dict()
    theirs = loaded.state_dict()
    if set(mine) != set(theirs):
        raise SystemExit(f"round trip: key sets differ: {set(mine) ^ set(theirs)}")
    for k, v in mine.items():
        if not torch.equal(v.detach().to(torch.float16).float(), theirs[k]):
            raise SystemExit(f"round trip: {k} differs after from_pretrained")


def save_checkpoint(model: Any, cfg: Config, out: Path, sp_model: bytes, hf_tok: Any) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, LlavaProcessor

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".demo-") as tmp:
        t = Path(tmp)
        model.save_pretrained(t, safe_serialization=True)  # config + generation config
        # the weights in the key layout of the llava-hf hub repos (llava-1.5-7b-hf), which
        # every reader knows (transformers 5 would write vision_tower.* without
        # vision_model.), stored as float16
        save_file(
            {
                hub_name(k): v.detach().to(torch.float16).contiguous()
                for k, v in model.state_dict().items()
            },
            str(t / "model.safetensors"),
            metadata={"format": "pt"},
        )
        cfg_path = t / "config.json"
        conf = json.loads(cfg_path.read_text())
        conf["dtype"] = "float16"
        cfg_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        improc = CLIPImageProcessor(
            size={"shortest_edge": cfg.image_size},
            crop_size={"height": cfg.image_size, "width": cfg.image_size},
            do_center_crop=True,
            do_convert_rgb=True,
            image_mean=list(S.CLIP_MEAN),
            image_std=list(S.CLIP_STD),
            resample=3,
        )
        proc = LlavaProcessor(
            image_processor=improc,
            tokenizer=hf_tok,
            patch_size=cfg.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=CHAT_TEMPLATE,
            image_token=IMAGE_TOKEN,
        )
        proc.save_pretrained(t)
        (t / "tokenizer.model").write_bytes(sp_model)
        # transformers 5 leaves these out of what it saves; readers of the checkpoint (our
        # converter, transformers 4) need them: legacy=False is how this tokenizer splits
        # text after special tokens (no "▁"), and what the model was trained with
        tc_path = t / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc.update({"add_bos_token": True, "add_eos_token": False, "legacy": False})
        tc.pop("is_local", None)
        tc_path.write_text(json.dumps(dict(sorted(tc.items())), indent=2) + "\n")
        # a preprocessor_config.json too: older readers (and our converter) look for it
        pre = t / "preprocessor_config.json"
        if not pre.exists():
            pre.write_text(json.dumps(improc.to_dict(), indent=2, sort_keys=True) + "\n")
        os.chmod(t, 0o755)  # package data: readable by everyone (mkdtemp makes it 0700)
        for f in t.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(t, out)
        t.mkdir()  # TemporaryDirectory cleans up a folder of that name


def describe_sizes(model: Any, out: Path) -> list[str]:
    n_text = sum(
        p.numel()
        for n, p in model.named_parameters()
        if "language_model" in n or n.startswith("lm_head")
    )
    n_vis = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    n_proj = sum(p.numel() for n, p in model.named_parameters() if "multi_modal_projector" in n)
    files = sorted(p for p in out.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    return [
        f"parameters: text {n_text:,}  vision {n_vis:,}  projector {n_proj:,}  "
        f"total {n_text + n_vis + n_proj:,}",
        f"checkpoint {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}: "
        f"{total / 1e6:.2f} MB in {len(files)} files: " + ", ".join(p.name for p in files),
    ]


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder")
    ap.add_argument("--log", type=Path, default=DEFAULT_LOG, help="log file")
    ap.add_argument("--steps", type=int, default=Config.steps, help="phase 2 steps")
    ap.add_argument("--v-steps", type=int, default=Config.v_steps, help="phase 1 steps")
    ap.add_argument("--batch", type=int, default=Config.batch)
    ap.add_argument("--seed", type=int, default=Config.seed)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is the most CPU-efficient for this tiny model)",
    )
    ap.add_argument("--heldout", type=int, default=Config.n_heldout)
    args = ap.parse_args(argv)
    cfg = Config(
        seed=args.seed,
        steps=args.steps,
        v_steps=args.v_steps,
        batch=args.batch,
        n_heldout=args.heldout,
    )

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    args.log.parent.mkdir(parents=True, exist_ok=True)
    logf = open(args.log, "w", encoding="utf-8")  # noqa: SIM115
    t0 = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"demo/train.py  {time.strftime('%Y-%m-%d %H:%M:%S')}")
    log(
        f"python {platform.python_version()}  torch {torch.__version__}  "
        f"transformers {transformers.__version__}  threads {args.threads}  "
        f"cpus {os.cpu_count()}  load average {os.getloadavg()[0]:.1f}"
    )
    log("config: " + json.dumps(asdict(cfg)))

    sp_model = train_sentencepiece(cfg.sp_vocab)
    tok = Tok(sp_model)
    check_tokenization(tok)
    image_id, pad_id = tok.n, tok.n + 1
    vocab = tok.n + 2
    hf_tok = write_tokenizer(Path(tempfile.gettempdir()), sp_model, image_id, pad_id)
    n_image = (cfg.image_size // cfg.patch_size) ** 2
    check_against_transformers(tok, hf_tok, image_id)
    q = S.QUESTIONS["describe"][0]
    ours = conversation_ids(tok, [], 1, image_id)[0] + tok.cont(f"\n{q} ASSISTANT:")
    prompts_path = args.log.with_name("prompts.json")
    prompts_path.write_text(json.dumps(prompt_record(tok, image_id), indent=1) + "\n")
    log(
        f"tokenizer: {tok.n} SentencePiece pieces + <image> {image_id} + <pad> {pad_id}; "
        f"prompt {len(ours) - 1} text tokens + {n_image} image tokens"
    )

    model = build_model(cfg, vocab, image_id, pad_id)
    model.train()
    full_layers = skip_last_vision_block(model)
    first = batch_for(0, cfg, tok, image_id, pad_id)
    check_skip(model, full_layers, first[0], first[3])
    aux = AuxHeads(cfg.v_hidden)
    t_train = time.time()
    c_train = time.process_time()

    def clock() -> str:
        return (
            f"{time.time() - t_train:6.0f} s  cpu {time.process_time() - c_train:6.0f} s  "
            f"load {os.getloadavg()[0]:.1f}"
        )

    def loader(dataset: Any) -> Any:
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=1,  # draws pictures while the main process trains
            prefetch_factor=4,
            worker_init_fn=lambda _: torch.set_num_threads(1),
        )

    def schedule(peak: float, steps: int) -> Any:
        def lr_at(step: int) -> float:
            if step < cfg.warmup:
                return peak * (step + 1) / cfg.warmup
            p = (step - cfg.warmup) / max(1, steps - cfg.warmup)
            return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

        return lr_at

    def groups(params: list[tuple[str, Any]]) -> list[dict[str, Any]]:
        decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
        return [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # phase 1: the tower learns what is where from per-patch labels (cheap: no LM)
    tower = model.model.vision_tower
    log(f"phase 1: vision tower alone, {cfg.v_steps} steps x {cfg.v_batch} pictures")
    opt = torch.optim.AdamW(
        [*groups(list(tower.named_parameters())), {"params": aux.parameters(), "weight_decay": 0}],
        lr=cfg.v_lr,
        betas=(0.9, 0.98),
    )
    lr_at = schedule(cfg.v_lr, cfg.v_steps)
    running = 0.0
    for step, (px, patch) in enumerate(loader(VisionBatches(cfg))):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = aux.loss(tower_features(model, px), patch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == cfg.v_steps - 1:
            log(f"v-step {step:5d}  patch loss {running:.4f}  lr {lr_at(step):.2e}  {clock()}")
        if step % 500 == 499:
            log(
                "  held-out patch accuracy (shape, colour, left/right): "
                + patch_report(model, aux, cfg)
            )
    log(
        "phase 1 held-out patch accuracy (shape, colour, left/right): "
        + patch_report(model, aux, cfg)
    )

    # phase 2: projector + language model on conversations, the tower frozen
    tower.requires_grad_(False)
    tower.eval()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    log(
        f"phase 2: projector + language model ({sum(p.numel() for _, p in trained):,} "
        f"parameters), {cfg.steps} steps x {cfg.batch} conversations"
    )
    opt = torch.optim.AdamW(groups(trained), lr=cfg.lr, betas=(0.9, 0.98))
    lr_at = schedule(cfg.lr, cfg.steps)
    running = 0.0
    for step, (ids, labels, mask, px, _) in enumerate(loader(Batches(cfg, tok, image_id, pad_id))):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = train_loss(model, ids, labels, mask, px)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trained], 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {running:.4f}  lr {lr_at(step):.2e}  {clock()}")
    tower.requires_grad_(True)
    model.model.vision_tower.encoder.layers = full_layers
    model.eval()
    train_s = time.time() - t_train
    log(
        f"training took {train_s:.0f} s ({train_s / 60:.1f} min) wall, "
        f"{time.process_time() - c_train:.0f} s CPU in the training process"
    )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, cfg, args.out, sp_model, hf_tok)
    check_round_trip(model, args.out)
    for line in describe_sizes(model, args.out):
        log(line)

    # held-out accuracy of the saved (float16) checkpoint, reloaded by transformers
    from transformers import LlavaForConditionalGeneration

    loaded = LlavaForConditionalGeneration.from_pretrained(args.out, dtype=torch.float32).eval()
    log(
        f"held-out accuracy ({cfg.n_heldout} pictures, seeds {S.HELDOUT_SEEDS.start}+, "
        "saved checkpoint reloaded by transformers, greedy):"
    )
    results = evaluate(loaded, cfg, tok, image_id, log)
    log("held-out summary: " + "  ".join(f"{k} {v:.1%}" for k, v in results.items()))
    log(f"total time {time.time() - t0:.0f} s")
    logf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
