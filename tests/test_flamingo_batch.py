"""Parallel generation on the cross-attention decoder (issue 18): ``decode_mixed`` decodes the
tokens of several sequences in one graph (``mmd_decode_batch``), each token attending to its
own sequence's cells and its own sequence's latest image only. For IDEFICS and both committed
OpenFlamingo conversions (GPT-NeoX, MPT with ALiBi), four sequences with different prompts and
images give, batched, the logits each gives decoded alone (f32 KV)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support.decoder import needs_decoder

from mmchat.native.model import NativeError
from mmchat.vision.image import load_image
from mmchat.vision.synthetic import rel_l2

pytestmark = needs_decoder

FIXTURES = Path(__file__).parent / "fixtures"
IDEFICS = FIXTURES / "idefics"
OPENFLAMINGO = FIXTURES / "openflamingo"
# four sequences: images at different places, two images, none, an end-of-sequence /
# <|endofchunk|> after the image
PROMPTS = {
    "idefics": ["one_image", "two_images", "text_only", "after_eos"],
    "openflamingo-neox": ["one_image", "two_images", "text_before_image", "after_eoc"],
    "openflamingo-mpt": ["two_images", "one_image", "after_eoc", "text_only"],
}
STEPS = 4


def _text_pair(family: str, tmp: Path) -> tuple[Path, Path]:
    if family == "idefics":
        from mmchat.converters import convert

        r = convert(IDEFICS / "idefics_tiny", outdir=tmp, quant="f32", vision_quant="f32")
        return r.model_path, r.mmproj_path
    folder = OPENFLAMINGO / "gguf" / family.split("-")[1]
    return folder / "text.gguf", folder / "mmproj.gguf"


def _prompts(family: str, engine: Any) -> list[tuple[list[int], list[np.ndarray]]]:
    """(token ids with <image> in place, image rows) per sequence."""
    out = []
    if family == "idefics":
        meta = json.loads((IDEFICS / "goldens.json").read_text())
        g = np.load(IDEFICS / "goldens.npz")
        for name in PROMPTS[family]:
            p = meta["prompts"][name]
            out.append((list(p["input_ids"]), [g[f"image/{n}/latents"] for n in p["images"]]))
        return out
    variant = family.split("-")[1]
    meta = json.loads(
        (OPENFLAMINGO / ("goldens.json" if variant == "neox" else "goldens_mpt.json")).read_text()
    )
    for name in PROMPTS[family]:
        p = meta["prompts"][name]
        rows = [
            engine.model.encode(
                engine.pixels(load_image(OPENFLAMINGO / "images" / f"{n}.png"))[None]
            )[0]
            for n in p["images"]
        ]
        out.append((list(p["ids"]), rows))
    return out


@pytest.fixture(scope="module", params=list(PROMPTS))
def parts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Any]]:
    from mmchat.runtime.flamingo import IdeficsRuntime, open_parts

    family = str(request.param)
    text, mmproj = _text_pair(family, tmp_path_factory.mktemp(family))
    vocab, backend, engine = open_parts(
        text, mmproj, n_ctx=64, n_seq=4, n_batch=16, n_threads=2, device="cpu", kv_cache_type="f32"
    )
    rt = IdeficsRuntime(vocab, engine, backend)
    yield family, rt
    rt.close()


def _solo(
    rt: Any, s: int, ids: list[int], rows: list[np.ndarray]
) -> tuple[list[int], list[np.ndarray]]:
    """Sequence ``s`` alone: the prompt's logits, then STEPS greedy tokens one by one."""
    be = rt.backend
    rt.prefill(ids, rows, seq_id=s)
    logits = [be.last_logits()]
    tokens = []
    for k in range(STEPS):
        tok = int(np.argmax(logits[-1]))
        tokens.append(tok)
        be.decode_one(tok, len(ids) + k, seq_id=s)
        logits.append(be.last_logits())
    be.truncate(0, s)
    return tokens, logits


def test_batched_sequences_match_each_decoded_alone(parts: tuple[str, Any]) -> None:
    family, rt = parts
    be = rt.backend
    be.clear()
    prompts = _prompts(family, rt.engine)
    solo = [_solo(rt, s, ids, rows) for s, (ids, rows) in enumerate(prompts)]
    assert be.ctx.n_images(0) == 0  # truncate(0) let the slots go

    # each prompt up to its last image alone, the rest of every prompt in one mixed batch
    # (more than n_batch = 16 tokens: decode_mixed splits it), then the steps together
    cuts = []
    for s, (ids, rows) in enumerate(prompts):
        images = [i for i, t in enumerate(ids) if t == rt.engine.image_token]
        cut = min(len(ids) - 1, images[-1] + 1) if images else 1
        rt.prefill(ids[:cut], rows, seq_id=s)
        cuts.append(cut)
    tokens: list[int] = []
    pos: list[int] = []
    seqs: list[int] = []
    want: list[int] = []
    last: list[int] = []
    for s, (ids, _) in enumerate(prompts):
        tail = ids[cuts[s] :]
        tokens += tail
        pos += range(cuts[s], len(ids))
        seqs += [s] * len(tail)
        want += [0] * (len(tail) - 1) + [1]
        last.append(len(tokens) - 1)
    assert len(tokens) > be.n_batch
    be.decode_mixed(np.asarray(tokens), np.asarray(pos), np.asarray(seqs), np.asarray(want))
    for s in range(len(prompts)):
        err = rel_l2(be.logits_at(last[s]), solo[s][1][0])
        assert err <= 1e-5, (family, s, "prompt", err)
    with pytest.raises(RuntimeError, match="no logits"):
        be.logits_at(0)

    order = list(reversed(range(len(prompts))))  # entries need not follow the sequences' order
    for k in range(STEPS):
        be.decode_mixed(
            np.asarray([solo[s][0][k] for s in order]),
            np.asarray([len(prompts[s][0]) + k for s in order]),
            np.asarray(order),
            np.ones(len(order), np.int8),
        )
        for j, s in enumerate(order):
            err = rel_l2(be.logits_at(j), solo[s][1][k + 1])
            assert err <= 1e-5, (family, s, k, err)
    for s, (ids, rows) in enumerate(prompts):
        assert be.pos_max(s) == len(ids) + STEPS - 1
        assert be.ctx.n_images(s) == len(rows)


def test_bad_batches_are_refused(parts: tuple[str, Any]) -> None:
    _, rt = parts
    ctx = rt.backend.ctx
    ctx.clear()
    with pytest.raises(NativeError, match=r"sequence 4 is outside 0\.\.3"):
        ctx.decode_batch([5, 6], [0, 0], [0, 4], [0, 1])
    with pytest.raises(NativeError, match="appears twice"):
        ctx.decode_batch([5, 6], [3, 3], [1, 1], [0, 1])
    with pytest.raises(NativeError, match="one position, sequence and logits flag per token"):
        ctx.decode_batch([5, 6], [0, 1], [0], [0, 1])
    assert ctx.pos_max(0) == -1 and ctx.pos_max(1) == -1  # nothing was decoded
    ctx.decode_batch([5, 6], [0, 0], [1, 0], [1, 0])  # the same position in two sequences
    assert ctx.pos_max(0) == 0 and ctx.pos_max(1) == 0
    with pytest.raises(NativeError, match="no logits were computed for batch entry 1"):
        ctx.logits_ith(1)
    assert ctx.logits_ith(0).shape == (rt.backend.info.n_vocab,)
    assert np.array_equal(ctx.logits(), ctx.logits_ith(0))  # the last entry with logits
    ctx.clear()
