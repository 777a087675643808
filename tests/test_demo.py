"""The built-in demo model (issue 8): a tiny LLaVA trained by ``demo/train.py`` that names
coloured shapes, shipped as a llava-hf checkpoint in ``mmchat/data/demo``.

Converted with the default quantization (``--quant q4_k_m``, ``--vision-quant f16``) and run
through mmchat's own runtime and vision engine (greedy), it must name colour and shape on
pictures drawn here with seeds training never used, and count the shapes. This is the
end-to-end check a random model cannot give: a wrong preprocessing step, projector, image
position or embedding injection anywhere makes the accuracy fall.

No torch here: pictures come from ``demo/shapes.py`` (Pillow + numpy).
"""

from __future__ import annotations

import importlib.util
import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "mmchat" / "data" / "demo"
PROMPTS = ROOT / "demo" / "prompts.json"

N_DESCRIBE = 50  # one-shape pictures: colour and shape must both be right
N_COUNT = 20  # one or two shapes: "How many shapes are there?"
N_PAIRS = 20  # two-shape pictures: both shapes, named left to right


def shapes_module() -> Any:
    """``demo/shapes.py`` (not a package; loaded from its file)."""
    name = "mmchat_demo_shapes"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "demo" / "shapes.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from mmchat.converters import convert

    out = tmp_path_factory.mktemp("demo-gguf")
    return convert(DEMO, outdir=out, name="demo")  # the defaults: q4_k_m text, f16 vision


# --- the shipped checkpoint ----------------------------------------------------------------


def test_checkpoint_is_a_small_llava_hf_model() -> None:
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"]
    assert cfg["vision_feature_layer"] == -2
    assert cfg["vision_feature_select_strategy"] == "default"
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert text["model_type"] == "llama" and vision["model_type"] == "clip_vision_model"
    # K-quant rows are 256 values long: every text matrix's row length is a multiple of 256
    assert text["hidden_size"] % 256 == 0 and text["intermediate_size"] % 256 == 0
    for f in (
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
    ):
        assert (DEMO / f).is_file(), f
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < 8_000_000, f"the demo checkpoint should stay a few MB, it is {total:,} B"
    tcfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert tcfg["legacy"] is False  # text after <image>/</s> without "▁", as trained


def test_held_out_seeds_are_disjoint_from_training() -> None:
    s = shapes_module()
    for a, b in (
        (s.TRAIN_SEEDS, s.TEST_SEEDS),
        (s.HELDOUT_SEEDS, s.TEST_SEEDS),
        (s.TRAIN_SEEDS, s.HELDOUT_SEEDS),
    ):
        assert a.stop <= b.start or b.stop <= a.start
    # the seeds the committed run drew its pictures from (its config is in the log)
    log = (ROOT / "demo" / "train.log").read_text()
    cfg = json.loads(log.split("config: ", 1)[1].splitlines()[0])
    base = cfg["seed"] * 10_000_000
    phase1 = base + 5_000_000  # demo/train.py PRETRAIN_SEED_OFFSET
    for first, n in (
        (base, cfg["steps"] * cfg["batch"]),
        (phase1, cfg["v_steps"] * cfg["v_batch"]),
    ):
        assert s.TRAIN_SEEDS.start <= first and first + n <= s.TRAIN_SEEDS.stop
    assert base + cfg["steps"] * cfg["batch"] <= phase1


def test_answers_and_parsers() -> None:
    s = shapes_module()
    scene = s.random_scene(s.TEST_SEEDS.start + 7, n_shapes=2)
    a = s.answer(scene, "describe")
    assert s.parse_objects(a) == s.objects(scene)
    assert s.parse_count(s.answer(scene, "count")) == 2
    assert s.parse_objects("An orange star.") == [("orange", "star")]
    assert s.parse_count("There is one shape.") == 1 and s.parse_count("Red.") is None
    left, right = scene.shapes
    assert left.cx < right.cx


# --- conversion with the default quantization ----------------------------------------------


def test_default_conversion_really_uses_k_quants(converted: Any) -> None:
    from gguf import GGUFReader

    assert converted.quant == "q4_k_m" and converted.vision_quant == "f16"
    text = GGUFReader(converted.model_path)
    types = {t.name: t.tensor_type.name for t in text.tensors}
    matrices = {n: ty for n, ty in types.items() if not n.endswith("norm.weight")}
    assert set(matrices.values()) <= {"Q4_K", "Q6_K"}, matrices  # no shape fallback
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q4_K"
    vision = GGUFReader(converted.mmproj_path)
    vtypes = {t.name: t.tensor_type.name for t in vision.tensors}
    assert vtypes["mm.0.weight"] == "F16" and vtypes["v.blk.0.attn_q.weight"] == "F16"


# --- llama.cpp's own loader (text part) ----------------------------------------------------


def test_text_gguf_loads_in_llama_cpp_high_level_api(converted: Any) -> None:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = Llama(str(converted.model_path), vocab_only=True, verbose=False)
    try:
        prompts = json.loads(PROMPTS.read_text())
        # tokenizer: the prompt start, and the answers (a reply follows "ASSISTANT:", so it
        # starts with "▁" as llama.cpp's dummy prefix gives it) tokenize as trained and back
        assert llm.tokenize(b"USER: ", add_bos=True) == prompts["prompts"][0]["before_image"]
        for answer, trained in prompts["answers"].items():
            ids = llm.tokenize(answer.encode(), add_bos=False)
            assert [*ids, llm.token_eos()] == trained
            assert llm.detokenize(ids).decode().strip() == answer
        assert llm.token_bos() == 1 and llm.token_eos() == 2
        # the chat template in the GGUF renders the Vicuna-v1 prompt the model was trained on
        template = llm.metadata["tokenizer.chat_template"]
        fmt = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")
        q = "What's in this image?"
        r = fmt(messages=[{"role": "user", "content": q}])
        assert r.prompt == f"USER: {q} ASSISTANT:"
        parts = [{"type": "image"}, {"type": "text", "text": q}]
        r = fmt(
            messages=[
                {"role": "user", "content": parts},
                {"role": "assistant", "content": "A red circle."},
                {"role": "user", "content": "How many shapes are there?"},
            ]
        )
        assert r.prompt == (
            f"USER: <image>\n{q} ASSISTANT: A red circle.</s>"
            "USER: How many shapes are there? ASSISTANT:"
        )
    finally:
        llm.close()


# --- mmchat's runtime + vision engine ------------------------------------------------------


def evaluate(model_path: str, mmproj_path: str) -> dict[str, Any]:
    """Run in a child process (see the test): the tokenized prompts, and the answers to
    held-out pictures through ``load_model`` / ``ChatSession.send``, greedy."""
    from mmchat.runtime import Done, SamplingParams, load_model
    from mmchat.runtime.messages import Message
    from mmchat.vision import load_image

    s = shapes_module()
    out: dict[str, Any] = {"segments": [], "describe": [], "count": [], "pairs": []}

    def prepared(scene: Any) -> Any:
        buf = io.BytesIO()
        s.render(scene).save(buf, format="PNG")
        return load_image(buf.getvalue())

    greedy = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=24, seed=0)
    with load_model(model_path, mmproj_path) as model:
        probe = prepared(s.random_scene(s.TEST_SEEDS.start))
        for p in json.loads(PROMPTS.read_text())["prompts"]:
            msgs = [
                Message(m["role"], m["content"], [probe] * m.get("images", 0))
                for m in p["messages"]
            ]
            segs = model.prompt_segments(msgs)
            out["segments"].append([seg if isinstance(seg, list) else "IMAGE" for seg in segs])

        def ask(question: str, scene: Any) -> str:
            chat = model.session(params=greedy)
            events = list(chat.send(question, [prepared(scene)]))
            done = [e for e in events if isinstance(e, Done)]
            return str(done[-1].text).strip()

        base = s.TEST_SEEDS.start + 1000
        for i in range(N_DESCRIBE):
            scene = s.random_scene(base + i, n_shapes=1)
            out["describe"].append((ask(s.QUESTIONS["describe"][0], scene), s.objects(scene)))
        for i in range(N_COUNT):
            scene = s.random_scene(base + 1000 + i, n_shapes=1 + i % 2)
            out["count"].append((ask(s.QUESTIONS["count"][0], scene), len(scene.shapes)))
        for i in range(N_PAIRS):
            scene = s.random_scene(base + 2000 + i, n_shapes=2)
            out["pairs"].append((ask(s.QUESTIONS["describe"][0], scene), s.objects(scene)))
    return out


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_demo import evaluate
print("RESULT " + json.dumps(evaluate(sys.argv[2], sys.argv[3])))
"""


@pytest.fixture(scope="module")
def answers(converted: Any) -> dict[str, Any]:
    """The child's results. A child process, so that a crash inside llama.cpp (e.g. SIGILL
    from its AMX weight buffers on virtual machines that hide AMX state) fails this test
    with a message instead of killing the whole suite."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(Path(__file__).parent),
            str(converted.model_path),
            str(converted.mmproj_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == -signal.SIGILL:
        pytest.fail(
            "llama.cpp died with SIGILL running the q4_k_m demo model: its AMX extra buffer "
            "types fault on this CPU; the runtime must load models with "
            "llama_model_params.use_extra_bufts=False here"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def test_runtime_feeds_the_prompt_tokens_the_model_was_trained_with(
    answers: dict[str, Any],
) -> None:
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    for p, segs in zip(prompts, answers["segments"], strict=True):
        assert segs == [p["before_image"], "IMAGE", p["after_image"]], p["messages"]


def test_names_colour_and_shape_of_held_out_pictures(answers: dict[str, Any]) -> None:
    s = shapes_module()
    results = [(a, [tuple(o) for o in want]) for a, want in answers["describe"]]
    ok = [s.parse_objects(a) == want for a, want in results]
    wrong = [f"{a!r} for {want}" for (a, want), good in zip(results, ok, strict=True) if not good]
    assert sum(ok) >= 0.9 * len(ok), f"{sum(ok)}/{len(ok)} right; wrong: {wrong}"


def test_counts_shapes_of_held_out_pictures(answers: dict[str, Any]) -> None:
    s = shapes_module()
    ok = [s.parse_count(a) == n for a, n in answers["count"]]
    wrong = [
        f"{a!r} for {n}" for (a, n), good in zip(answers["count"], ok, strict=True) if not good
    ]
    assert sum(ok) >= 0.9 * len(ok), f"{sum(ok)}/{len(ok)} right; wrong: {wrong}"


def test_names_two_shapes_left_to_right(answers: dict[str, Any]) -> None:
    s = shapes_module()
    results = [(a, [tuple(o) for o in want]) for a, want in answers["pairs"]]
    ok = [s.parse_objects(a) == want for a, want in results]
    wrong = [f"{a!r} for {want}" for (a, want), good in zip(results, ok, strict=True) if not good]
    assert sum(ok) >= 0.9 * len(ok), f"{sum(ok)}/{len(ok)} right; wrong: {wrong}"


# --- `mmchat run demo` on a fresh machine -------------------------------------------------


def test_run_demo_converts_the_shipped_checkpoint_offline(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's first command, on an empty MMCHAT_HOME with the hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mmchat",
            "run",
            "demo",
            "What's in this image? examples/red-circle.png",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "A red circle." in proc.stdout
    from mmchat.store import open_store

    rec = open_store().resolve("demo")
    assert rec.mmproj_path is not None
    assert rec.manifest["source"]["type"] == "convert"
    info = json.dumps(rec.manifest["parts"]["model"].get("info", {}))
    assert "Q4_K" in info or "q4_k" in info.lower()
