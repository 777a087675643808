"""The space after a special token (issue 22): ``mmchat.tokenizer.legacy_spaces`` is decided at
conversion time from the tokenizer that actually tokenizes the prompt, and the runtime then
gives transformers' own ids.

The matrix (``tests/fixtures/tokenizer_legacy``): ``tokenizer.json`` none / Metaspace
``prepend_scheme`` "first" / "always" / the old ``Prepend("▁")`` normalizer × the ``legacy``
key absent / true / false, with the ids ``AutoTokenizer`` gives under transformers 5.23 and
4.57 (``make_issue22_fixtures.py``). transformers 4 runs ``tokenizer.json`` as written and
uses ``legacy`` (missing = True) only without it; transformers 5's ``LlamaTokenizer``
follows ``legacy`` alone (missing = False). mmchat follows ``tokenizer.json`` when present,
then ``legacy``, then transformers 5's default; the tests pin which version each
combination matches, and that a conversion note names every combination where the two
versions disagree.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mmchat.converters.tokenizer import legacy_spaces_of, prefix_rule_of_tokenizer_json

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MATRIX = FIXTURES / "tokenizer_legacy"
VICUNA = FIXTURES / "llava16_vicuna_t5"
PIPELINES = ("none", "first", "always", "prepend")
FLAGS = ("absent", "true", "false")
COMBOS = [(p, f) for p in PIPELINES for f in FLAGS]
SPIECE_ID = 459
IMAGE_ID = 512


@cache
def ids_by_version(major: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((MATRIX / f"ids_transformers{major}.json").read_text())
    return data


def combo_dir(pipeline: str, flag: str, dst: Path) -> Path:
    """One combination's tokenizer folder, assembled from the committed inputs the way the
    fixture script assembled it for transformers."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(MATRIX / "base" / f, dst / f)
    cfg = json.loads((MATRIX / "base" / "tokenizer_config.json").read_text())
    if flag != "absent":
        cfg["legacy"] = flag == "true"
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if pipeline != "none":
        shutil.copy(MATRIX / f"tokenizer.{pipeline}.json", dst / "tokenizer.json")
    return dst


def expected(pipeline: str, flag: str) -> bool:
    """mmchat's rule, written out: the file's pipeline, else the flag, else False."""
    if pipeline == "first":
        return False
    if pipeline in ("always", "prepend"):
        return True
    return flag == "true"


def followed_version(pipeline: str) -> int:
    """The transformers version whose ids mmchat reproduces for this combination."""
    return 5 if pipeline == "none" else 4


# -- the decision (no llama.cpp needed) ------------------------------------------------


@pytest.mark.parametrize(("pipeline", "flag"), COMBOS)
def test_decision_follows_the_tokenizer_that_runs(pipeline: str, flag: str, tmp_path: Path) -> None:
    folder = combo_dir(pipeline, flag, tmp_path / "tok")
    value, notes = legacy_spaces_of(folder)
    assert value is expected(pipeline, flag)
    key = f"{pipeline}/{flag}"
    v4, v5 = ids_by_version(4)["combos"][key], ids_by_version(5)["combos"][key]
    # the followed version really puts (or leaves out) a "▁" after <image> that way
    ours = v4 if followed_version(pipeline) == 4 else v5
    assert ours["spiece_after_special"] is value
    # a note exactly where transformers 4 and 5 disagree about the "▁"
    disagree = v4["spiece_after_special"] != v5["spiece_after_special"]
    assert bool(notes) is disagree, notes
    if notes:
        assert "transformers 4" in notes[0] and "transformers 5" in notes[0]


def test_the_matrix_records_what_transformers_does() -> None:
    """The facts the rule rests on, as the fixture script measured them."""
    v4, v5 = ids_by_version(4), ids_by_version(5)
    assert v4["transformers"].startswith("4.") and v5["transformers"].startswith("5.")
    for pipeline, flag in COMBOS:
        key = f"{pipeline}/{flag}"
        # transformers 5: the flag alone (missing = False)
        assert v5["combos"][key]["spiece_after_special"] is (flag == "true"), key
        # transformers 4: the file, else the flag (missing = True)
        want4 = expected(pipeline, flag) if pipeline != "none" else flag != "false"
        assert v4["combos"][key]["spiece_after_special"] is want4, key


@pytest.mark.parametrize(
    ("pre_tokenizer", "normalizer", "want"),
    [
        ({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}, None, False),
        ({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}, None, True),
        ({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never"}, None, False),
        ({"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}, None, True),
        (
            {
                "type": "Sequence",
                "pretokenizers": [{"type": "Metaspace", "prepend_scheme": "first"}],
            },
            None,
            False,
        ),
        (None, {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}]}, True),
        ({"type": "ByteLevel"}, None, None),
        (None, None, None),
    ],
)
def test_tokenizer_json_pipelines(
    pre_tokenizer: dict[str, Any] | None, normalizer: dict[str, Any] | None, want: bool | None
) -> None:
    value, why = prefix_rule_of_tokenizer_json(
        {"normalizer": normalizer, "pre_tokenizer": pre_tokenizer}
    )
    assert value is want
    assert bool(why) is (want is not None)


def test_a_non_bool_legacy_value_counts_as_missing(tmp_path: Path) -> None:
    folder = combo_dir("none", "absent", tmp_path / "tok")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["legacy"] = "yes"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert legacy_spaces_of(folder)[0] is False


# -- conversion and the runtime's ids (llama.cpp) ----------------------------------------


@pytest.fixture(scope="module")
def vicuna_model() -> Any:
    """The transformers-5-saved Vicuna LLaVA 1.6, converted and loaded (f32)."""
    pytest.importorskip("llama_cpp")
    from support.models import converted

    from mmchat.runtime import LoadOptions, load_model

    model, mmproj = converted("llava16_vicuna_t5")
    lm = load_model(model, mmproj, LoadOptions.parity(n_threads=2, vision_device="cpu"))
    yield lm
    lm.close()


def test_transformers5_vicuna_converts_without_legacy_spaces() -> None:
    """The issue's checkpoint: no legacy key, tokenizer.json 'first', no tokenizer.model."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from support.models import converted

    assert not (VICUNA / "tokenizer.model").exists()
    assert "legacy" not in json.loads((VICUNA / "tokenizer_config.json").read_text())
    model, _ = converted("llava16_vicuna_t5")
    r = GGUFReader(model)
    assert r.fields["mmchat.tokenizer.legacy_spaces"].contents() is False
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    # <image> and <pad> are listed only in tokenizer.json's added_tokens
    assert tokens[IMAGE_ID] == "<image>" and types[IMAGE_ID] == 3
    assert tokens[IMAGE_ID + 1] == "<pad>"


def prompt_tokenizer(lm: Any, legacy_spaces: bool) -> Any:
    """The loaded model's prompt tokenizer with another legacy-space rule."""
    from mmchat.runtime.tokenizing import PromptTokenizer

    return PromptTokenizer(lm.text, lm.template, legacy_spaces)


@pytest.mark.parametrize(("pipeline", "flag"), COMBOS)
def test_runtime_ids_equal_transformers(
    pipeline: str, flag: str, vicuna_model: Any, tmp_path: Path
) -> None:
    """The converted vocabulary with each combination's decision tokenizes every prompt as
    the transformers version it follows does."""
    value, _ = legacy_spaces_of(combo_dir(pipeline, flag, tmp_path / "tok"))
    key = f"{pipeline}/{flag}"
    data = ids_by_version(followed_version(pipeline))
    tok = prompt_tokenizer(vicuna_model, value)
    for i, (prompt, want) in enumerate(
        zip(data["prompts"], data["combos"][key]["ids"], strict=True)
    ):
        got = tok.tokenize_prompt(prompt)
        metaspace_always = value and (pipeline == "always" or followed_version(pipeline) == 5)
        if metaspace_always and prompt.startswith("<image> "):
            # Metaspace "always" does not prefix text that already starts with a space;
            # SentencePiece and llama.cpp do (one "▁" more): a known difference
            assert got == [*want[:2], SPIECE_ID, *want[2:]], (key, i)
            continue
        assert got == want, (key, i, prompt)


def test_the_old_default_gave_an_extra_spiece_after_the_image(vicuna_model: Any) -> None:
    """What the issue measured: legacy_spaces=True puts "▁" after <image>, transformers not."""
    assert vicuna_model.legacy_spaces is False
    data = ids_by_version(5)["combos"]["first/absent"]
    prompt = ids_by_version(5)["prompts"][0]
    want = data["ids"][0]
    assert vicuna_model.tokenize_prompt(prompt) == want
    wrong = prompt_tokenizer(vicuna_model, True).tokenize_prompt(prompt)
    pos = want.index(IMAGE_ID) + 1
    assert wrong == [*want[:pos], SPIECE_ID, *want[pos:]]


@cache
def vicuna_goldens() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(VICUNA / "goldens.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((VICUNA / "goldens.json").read_text())


@pytest.mark.parametrize("chat", ["single", "two_turns"])
def test_chat_path_matches_transformers(chat: str, vicuna_model: Any) -> None:
    """``LoadedModel.evaluate(messages)``: the folder's chat template, whole-prompt
    tokenization (no "▁" after <image> or </s>), anyres encoding -> transformers' ids and
    final logits (the issue measured rel L2 0.23-0.38 here before the fix)."""
    from mmchat.runtime.messages import Message
    from mmchat.runtime.model import PromptImage
    from mmchat.vision import load_image
    from mmchat.vision.synthetic import rel_l2

    g, meta = vicuna_goldens()
    c = next(c for c in meta["chats"] if c["key"] == f"chat.{chat}")
    msgs = [
        Message(
            role=m["role"],
            content=m["content"],
            images=[load_image(FIXTURES / f) for f in m["images"]],
        )
        for m in c["messages"]
    ]
    assert vicuna_model.legacy_spaces is False
    flat: list[int] = []
    for it in vicuna_model.build_prompt(msgs):
        flat += [IMAGE_ID] if isinstance(it, PromptImage) else list(it)
    assert flat == g[f"{c['key']}.ids_collapsed"].tolist()
    ev = vicuna_model.evaluate(msgs)
    assert sum(e.shape[0] for e in ev.image_embeddings) == c["n_image_tokens"]
    err = rel_l2(ev.logits, g[f"{c['key']}.logits"])
    print(f"\nllava16_vicuna_t5 {c['key']}: chat-path logits rel L2 {err:.2e}")
    assert err <= 2e-3
    assert int(np.argmax(ev.logits)) == c["top1"]
