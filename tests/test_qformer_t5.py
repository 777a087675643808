"""BLIP-2 / InstructBLIP with a Flan-T5 language model (tests/fixtures/qformer_t5, made by
tests/fixtures/make_qformer_t5_fixtures.py with transformers' own classes): ``convert`` writes
llama.cpp's ``t5`` text GGUF + the ``qformer`` vision GGUF; the encoder-decoder backend
(mmchat/runtime/encdec.py) gives the rows entering the T5 encoder, the first decoder step's
logits and greedy tokens as transformers computes them; a second turn encodes the whole
conversation again; ``mmchat run`` and the server answer; bad input is one clear error."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mmchat.errors import UserError
from mmchat.runtime import LoadOptions, Message, SamplingParams
from mmchat.runtime.loader import load_model
from mmchat.vision.image import load_image
from mmchat.vision.synthetic import rel_l2

ROOT = Path(__file__).parent / "fixtures" / "qformer_t5"
IMAGES = Path(__file__).parent / "fixtures" / "qformer" / "images"
MODELS = ["blip2_t5", "instructblip_t5"]
QUESTION = "What is in this image?"
OPTS = LoadOptions.parity(n_threads=2, vision_device="cpu")


@cache
def goldens() -> tuple[dict[str, Any], Any]:
    return json.loads((ROOT / "goldens.json").read_text()), np.load(ROOT / "goldens.npz")


_out: dict[str, Path] = {}


@cache
def converted(model: str, quant: str = "f32", vq: str = "f32") -> tuple[Path, Path]:
    import tempfile

    from mmchat.converters import convert

    out = Path(tempfile.mkdtemp(prefix=f"{model}-{quant}-"))
    r = convert(ROOT / model, outdir=out, quant=quant, vision_quant=vq)
    return r.model_path, r.mmproj_path


def message_of(model: str) -> str:
    meta, _ = goldens()
    return QUESTION if model == "blip2_t5" else str(meta["models"][model]["prompt"])


def image(name: str) -> Any:
    return load_image(IMAGES / f"{name}.png")


# --- conversion --------------------------------------------------------------------------


def test_conversion_writes_llama_cpp_t5() -> None:
    from mmchat.converters import convert

    from mmchat.gguf_meta import read_gguf

    text, mmproj = converted("blip2_t5")
    t = read_gguf(text)
    assert t.architecture == "t5"
    assert t.get("t5.attention.relative_buckets_count") == 32
    assert t.get("t5.decoder_start_token_id") == 0 and t.get("t5.decoder_block_count") == 2
    assert t.get("tokenizer.ggml.model") == "t5"
    assert t.get("tokenizer.ggml.add_bos_token") is False
    assert t.get("tokenizer.ggml.scores") == {"array_length": 128}
    assert t.get("tokenizer.ggml.precompiled_charsmap") is not None
    assert t.get("tokenizer.chat_template").endswith("{{- eos_token -}}{%- endif -%}")
    for name in ("enc.blk.0.attn_rel_b.weight", "dec.blk.1.cross_attn_o.weight", "output.weight"):
        assert t.tensor(name) is not None, name
    assert t.tensor("enc.blk.1.attn_rel_b.weight") is None  # layer 0's table is shared
    assert t.tensor("dec.blk.0.ffn_gate.weight") is not None  # gated GELU
    assert read_gguf(mmproj).get("clip.projector_type") == "qformer"
    r = convert(ROOT / "blip2_t5", outdir=text.parent / "again", quant="f32", vision_quant="f32")
    assert any("exact GELU" in n for n in r.notes)  # BLIP-2's T5 vs ggml's tanh GELU


def test_unigram_tokenizer_matches_transformers() -> None:
    from mmchat.runtime._llama import TextModel

    meta, _ = goldens()
    m = TextModel(str(converted("blip2_t5")[0]), n_gpu_layers=0)
    try:
        assert m.has_encoder and m.decoder_start == 0 and m.bos < 0
        for case in meta["tokenizer"]:  # transformers appends </s>; llama.cpp's add_eos too
            assert m.tokenize(case["text"], add_special=True) == case["ids"], case["text"]
    finally:
        m.close()


# --- rows, logits and greedy tokens against transformers -------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_rows_and_first_decoder_logits(model: str) -> None:
    meta, g = goldens()
    want_ids = meta["models"][model]["input_ids"][8:]  # after the 8 query rows
    with load_model(*converted(model), OPTS) as lm:
        assert type(lm.ctx).__name__ == "EncoderDecoderBackend"
        print(f"\n{model} f32: rel L2 vs transformers (exact GELU) / vs the tanh-GELU golden")
        for name in meta["images"]:
            ev = lm.evaluate(
                [{"role": "user", "content": message_of(model), "images": [image(name)]}]
            )
            assert ev.token_ids == want_ids  # the template's encoder input, </s> last
            rows = rel_l2(ev.image_embeddings[0], g[f"{model}/{name}/rows"])
            want = g[f"{model}/{name}/logits"]
            err = rel_l2(ev.logits, want)
            tanh = g.get(f"{model}/{name}/logits_tanh")
            extra = f" / {rel_l2(ev.logits, tanh):.2e}" if tanh is not None else ""
            print(f"  {name:9s} rows {rows:.2e}  logits {err:.2e}{extra}")
            assert rows <= 2e-3 and err <= 2e-3, f"{model}/{name}: {rows:.2e} {err:.2e}"
            assert int(np.argmax(ev.logits)) == int(np.argmax(want))


def _reply_ids(lm: Any, text: str, images: list[Any], n: int) -> tuple[list[int], Any]:
    p = SamplingParams(temperature=0, max_tokens=n, seed=1, repeat_penalty=1.0)
    chat = lm.session(params=p)
    ids: list[int] = []
    for ev in chat.send(text, images):
        ids += list(getattr(ev, "token_ids", []) or [])
    return ids, chat


@pytest.mark.parametrize("model", MODELS)
def test_greedy_tokens_match(model: str) -> None:
    """The prompt through the encoder, then each argmax token fed to the decoder (the
    generation step, ``decode_token``) — 8 tokens as transformers' greedy loop picks them."""
    meta, _ = goldens()
    with load_model(*converted(model), OPTS) as lm:
        for name in meta["images"]:
            want = meta["models"][model]["greedy"][name]
            msgs = [Message("user", message_of(model), [image(name)])]
            got: list[int] = []
            with lm.lock:
                lm.run_prompt(lm.build_prompt(msgs))
                for _ in want:
                    got.append(int(np.argmax(lm.logits())))
                    lm.decode_token(got[-1])
            assert got == want, name


def test_second_turn_encodes_the_whole_conversation() -> None:
    """Turn 2 = "Question: q1 Answer: a1 Question: q2 Answer:</s>" through the encoder, as
    transformers computes it; the prefix held from turn 1 (rows, text, generated tokens)
    is reused as encoder input and matches a fresh evaluation."""
    meta, g = goldens()
    t2 = meta["models"]["blip2_t5"]["turn2"]
    with load_model(*converted("blip2_t5"), OPTS) as lm:
        ids, chat = _reply_ids(lm, t2["q1"], [image("landscape")], 8)
        assert ids == meta["models"]["blip2_t5"]["greedy"]["landscape"]
        assert chat.messages[-1].content == t2["a1"]
        encodes = lm.vision.encode_count
        msgs = [*chat.messages, Message("user", t2["q2"])]
        with lm.lock:
            items = lm.build_prompt(msgs)
            run = lm.run_prompt(items)
            reused = lm.logits()
        assert run.cached > 8 and lm.vision.encode_count == encodes  # prefix and rows reused
        want = g["blip2_t5/landscape/logits_turn2"]
        fresh = lm.evaluate(msgs)
        assert fresh.token_ids == t2["input_ids"][8:]
        print(
            f"\nturn 2: reused {rel_l2(reused, want):.2e}, fresh {rel_l2(fresh.logits, want):.2e}"
        )
        assert rel_l2(reused, want) <= 2e-3 and rel_l2(fresh.logits, want) <= 2e-3
        # and through the session: the reply's first token is transformers' argmax
        lm.reset()
        _, chat = _reply_ids(lm, t2["q1"], [image("landscape")], 8)
        first = next(ev for ev in chat.send(t2["q2"]) if getattr(ev, "token_ids", None))
        assert first.token_ids[0] == int(np.argmax(want))


@pytest.mark.parametrize("model", MODELS)
def test_top1_at_q8_0(model: str) -> None:
    meta, g = goldens()
    with load_model(*converted(model, "q8_0", "q8_0"), OPTS) as lm:
        for name in meta["images"]:
            ev = lm.evaluate(
                [{"role": "user", "content": message_of(model), "images": [image(name)]}]
            )
            assert int(np.argmax(ev.logits)) == int(np.argmax(g[f"{model}/{name}/logits"])), name


def test_one_sequence_without_scheduler() -> None:
    """llama.cpp keeps one encoder output per context: n_parallel is forced to 1."""
    opts = LoadOptions(n_threads=2, n_parallel=4, scheduled=True, vision_device="cpu")
    with load_model(*converted("blip2_t5"), opts) as lm:
        assert lm.n_seq == 1 and lm.scheduler is None and lm.describe()["parallel"] == 1
        assert lm.ctx.n_ubatch == lm.n_ctx  # the whole prompt is one encoder micro-batch


# --- as a user runs it ---------------------------------------------------------------------


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mmchat", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "MMCHAT_HOME": str(cwd / "home")},
    )


def test_mmchat_convert_then_run_answers_about_an_image(tmp_path: Path) -> None:
    """As a user does it: ``mmchat convert`` (q8_0 text, f16 vision) registers the pair,
    ``mmchat run NAME "… ./photo.png"`` answers with transformers' greedy reply."""
    shutil.copy(IMAGES / "landscape.png", tmp_path / "photo.png")
    src = str(ROOT / "blip2_t5")
    conv = _cli(
        ["convert", src, "--name", "blip2-t5", "--outdir", "out", "--quant", "q8_0"], tmp_path
    )
    assert conv.returncode == 0, conv.stderr
    assert "exact GELU" in conv.stdout + conv.stderr
    greedy = ("--max-tokens", "8", "--temperature", "0", "--repeat-penalty", "1")
    r = _cli(["run", "blip2-t5", *greedy, f"{QUESTION} ./photo.png"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Added image './photo.png'" in r.stderr
    meta, _ = goldens()
    assert r.stdout.strip() == meta["models"]["blip2_t5"]["turn2"]["a1"]


def test_server_answers_two_at_once_one_by_one(tmp_path: Path) -> None:
    """``serve --parallel 2``: a T5 model is loaded with one sequence (shown in /api/ps)
    and answers concurrent requests one after the other, each as alone."""
    import threading
    import urllib.request

    from test_serve import start_server

    from mmchat.store import Store

    meta, _ = goldens()
    model, mmproj = converted("blip2_t5")
    store = Store(tmp_path)
    store.register("blip2-t5", model=model, mmproj=mmproj)
    msg = {"role": "user", "content": QUESTION, "images": [str(IMAGES / "landscape.png")]}
    srv = start_server(store, parallel=2, load_options=OPTS)
    try:
        opts = {"temperature": 0, "num_predict": 8, "seed": 1, "repeat_penalty": 1.0}
        got: dict[int, str] = {}

        def ask(i: int) -> None:
            reply = srv.ollama().chat("blip2-t5", [msg], options=opts).message.content
            got[i] = reply or ""

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == {0: meta["models"]["blip2_t5"]["turn2"]["a1"]} | {
            1: meta["models"]["blip2_t5"]["turn2"]["a1"]
        }
        with urllib.request.urlopen(srv.url + "/api/ps", timeout=30) as r:
            ps = json.loads(r.read())
        assert [m["parallel"] for m in ps["models"]] == [1]
    finally:
        srv.stop()


# --- bad input -------------------------------------------------------------------------------


def _convert_fails(src: Path, out: Path, match: str) -> None:
    from mmchat.converters import convert

    with pytest.raises(UserError, match=match) as exc:
        convert(src, outdir=out, quant="f32", vision_quant="f32")
    assert "\n" not in str(exc.value)
    assert not out.exists() or not any(out.iterdir()), "a failed conversion left files behind"


def _edit_config(src: Path, **text: Any) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(text)
    (src / "config.json").write_text(json.dumps(cfg))


def test_bad_t5_checkpoints(tmp_path: Path) -> None:
    src = tmp_path / "b"
    shutil.copytree(ROOT / "blip2_t5", src)
    _edit_config(src, relative_attention_max_distance=256)
    _convert_fails(src, tmp_path / "o1", "max_distance 256.*llama.cpp")
    _edit_config(src, relative_attention_max_distance=128, feed_forward_proj="gated-silu")
    _edit_config(src, dense_act_fn="silu")
    _convert_fails(src, tmp_path / "o2", "gated-silu")
    _edit_config(src, feed_forward_proj="gated-gelu", dense_act_fn="gelu")
    (src / "spiece.model").unlink()
    (src / "tokenizer.json").unlink()
    _convert_fails(src, tmp_path / "o3", "spiece.model")


def test_tokenizer_json_alone_gives_the_same_file(tmp_path: Path) -> None:
    """A folder saved by transformers 5 has tokenizer.json but no spiece.model: its Unigram
    vocabulary, scores, charsmap and whitespace rules give a byte-identical text GGUF."""
    from mmchat.converters import convert

    src = tmp_path / "tj"
    shutil.copytree(ROOT / "blip2_t5", src)
    (src / "spiece.model").unlink()
    a = convert(src, outdir=tmp_path / "a", name="same", quant="f32", vision_quant="f32")
    b = convert(ROOT / "blip2_t5", outdir=tmp_path / "b", name="same", quant="f32")
    assert a.model_path.read_bytes() == b.model_path.read_bytes()


def _wider_t5(src: Path, dst: Path, width: int) -> None:
    """The fixture with its T5 (and language projection) ``width`` wide instead of 64."""
    from mmchat.converters.checkpoint import open_checkpoint
    from support.models import write_safetensors

    shutil.copytree(src, dst)
    ckpt = open_checkpoint(dst)
    rng = np.random.default_rng(0)
    out = {}
    for name in ckpt.names():
        a = ckpt[name].load()
        if name.startswith(("language_model.", "language_projection.")):
            shape = tuple(width if d == 64 else d for d in a.shape)
            a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        out[name] = a
    (dst / "model.safetensors").unlink()
    write_safetensors(dst / "model.safetensors", out)
    _edit_config(dst, d_model=width, d_kv=width // 4)


def test_text_model_of_another_width_is_refused(tmp_path: Path) -> None:
    from mmchat.converters import convert

    _wider_t5(ROOT / "blip2_t5", tmp_path / "wide", 80)
    wide = convert(tmp_path / "wide", outdir=tmp_path / "o", quant="f32", vision_quant="f32")
    _, mmproj64 = converted("blip2_t5")
    with pytest.raises(UserError) as exc:
        load_model(wide.model_path, mmproj64, OPTS)
    assert "\n" not in str(exc.value) and "80" in str(exc.value)


def test_embeddings_are_refused_not_a_crash() -> None:
    from mmchat.runtime.embedding import open_embedder

    with (
        load_model(converted("blip2_t5")[0], None, OPTS) as lm,
        pytest.raises(UserError, match="encoder-decoder"),
    ):
        open_embedder(lm)


def test_bin_checkpoint_converts_the_same(tmp_path: Path) -> None:
    """``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``) gives the same
    text GGUF as the safetensors file."""
    torch = pytest.importorskip("torch", reason="reading .bin checkpoints needs torch")
    from mmchat.converters import convert
    from mmchat.converters.checkpoint import open_checkpoint

    from mmchat.gguf_meta import read_gguf

    src = tmp_path / "bin"
    shutil.copytree(ROOT / "blip2_t5", src)
    ckpt = open_checkpoint(src)
    state = {n: torch.from_numpy(np.array(ckpt[n].load())) for n in ckpt.names()}
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    r = convert(src, outdir=tmp_path / "o", quant="f32", vision_quant="f32")
    a, b = read_gguf(r.model_path), read_gguf(converted("blip2_t5")[0])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert r.model_path.read_bytes()[-4096:] == converted("blip2_t5")[0].read_bytes()[-4096:]


# --- LAVIS' own layout (torch-only: the .pth files need torch.load) --------------------------


def _lavis_convert(src: Path, out: Path) -> Any:
    from mmchat.converters import convert

    return convert(src, outdir=out, quant="f32", vision_quant="f32")


def test_lavis_instructblip_t5_matches_transformers(tmp_path: Path) -> None:
    """LAVIS' blip2_t5_instruct files (eva_vit_g.pth, the trimmed .pth with ``t5_proj``,
    bert-base-uncased/, the Flan-T5 folder with its own ``gelu_new`` config and untied
    ``lm_head``) convert and answer as transformers' InstructBLIP on the same weights with
    the exact GELU, which LAVIS sets."""
    pytest.importorskip("torch", reason="the LAVIS files are .pth: reading them needs torch")
    from mmchat.gguf_meta import read_gguf

    meta = json.loads((ROOT / "goldens_lavis.json").read_text())
    g = np.load(ROOT / "goldens_lavis.npz")
    r = _lavis_convert(ROOT / "lavis_instructblip_t5", tmp_path / "o")
    assert r.family == "instructblip-lavis" and r.architecture == "Blip2T5Instruct"
    assert any("exact GELU" in n for n in r.notes)  # the folder says gelu_new, LAVIS gelu
    assert read_gguf(r.model_path).architecture == "t5"
    with load_model(r.model_path, r.mmproj_path, OPTS) as lm:
        print("\nLAVIS InstructBLIP-T5 f32: rows / first-step logits, rel L2 vs transformers")
        for name in goldens()[0]["images"]:
            msgs = [{"role": "user", "content": meta["prompt"], "images": [image(name)]}]
            ev = lm.evaluate(msgs)
            assert ev.token_ids == meta["input_ids"]
            rows = rel_l2(ev.image_embeddings[0], g[f"{name}/rows"])
            err = rel_l2(ev.logits, g[f"{name}/logits"])
            print(f"  {name:9s} rows {rows:.2e}  logits {err:.2e}")
            assert rows <= 2e-3 and err <= 2e-3
            assert int(np.argmax(ev.logits)) == int(np.argmax(g[f"{name}/logits"]))


@pytest.mark.parametrize(
    "published", ["blip2_pretrained_flant5xl.pth", "blip2_pretrained_flant5xxl.pth"]
)
def test_lavis_blip2_t5_reads_no_instruction(tmp_path: Path, published: str) -> None:
    """LAVIS' blip2_t5 drops the Q-Former's text embeddings and text FFN: the same files
    without them convert as BLIP-2 (queries only, "Question: … Answer:" template), under
    either published name (the XXL one is also the file MiniGPT-4 takes its Q-Former from)."""
    torch = pytest.importorskip(
        "torch", reason="the LAVIS files are .pth: reading them needs torch"
    )
    from mmchat.gguf_meta import read_gguf

    src = tmp_path / "blip2"
    shutil.copytree(ROOT / "lavis_instructblip_t5", src)
    path = src / "instruct_blip_flanxl_trimmed.pth"
    state = torch.load(path, weights_only=True)["model"]
    path.unlink()
    drop = ("Qformer.bert.embeddings.word_", "Qformer.bert.embeddings.position_")
    keep = {
        k: v
        for k, v in state.items()
        if not k.startswith(drop) and not re.search(r"layer\.\d+\.(intermediate|output)\.", k)
    }
    torch.save({"model": keep}, src / published)
    r = _lavis_convert(src, tmp_path / "o")
    assert r.family == "blip2-lavis" and r.architecture == "Blip2T5"
    assert read_gguf(r.mmproj_path).get("qformer.text_input") is False
    assert "Question: " in str(read_gguf(r.model_path).get("tokenizer.chat_template"))
    with load_model(r.model_path, r.mmproj_path, OPTS) as lm:
        ev = lm.evaluate([{"role": "user", "content": QUESTION, "images": [image("pixel")]}])
        assert np.isfinite(ev.logits).all() and ev.token_ids[-1] == 1  # ... Answer:</s>


def test_lavis_t5_checkpoint_with_a_vicuna_folder_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the LAVIS files are .pth: reading them needs torch")
    src = tmp_path / "mixed"
    shutil.copytree(ROOT / "lavis_instructblip_t5", src)
    cfg = json.loads((src / "flan-t5-xl" / "config.json").read_text())
    (src / "flan-t5-xl" / "config.json").write_text(json.dumps(cfg | {"model_type": "llama"}))
    with pytest.raises(UserError, match="Flan-T5 folder"):
        _lavis_convert(src, tmp_path / "o")


def test_generated_tokens_reused_as_encoder_input_match_a_fresh_evaluation() -> None:
    """A prompt that continues after generated tokens (cells the decoder produced) reuses
    them as encoder input; one that diverges inside them cuts the decoder: both give what a
    fresh evaluation of the same prompt gives."""
    meta, g = goldens()
    rows = g["blip2_t5/landscape/rows"]
    ids = meta["models"]["blip2_t5"]["input_ids"][8:-1]  # without </s>
    with load_model(converted("blip2_t5")[0], None, OPTS) as lm:
        lm.evaluate_ids([rows, ids])
        gen = []
        with lm.lock:
            for _ in range(3):
                gen.append(int(np.argmax(lm.logits())))
                lm.decode_token(gen[-1])
        assert lm.ctx.encoder_cells == 8 + len(ids)
        for prompt in ([rows, ids + gen + [5, 1]], [rows, ids + gen[:1] + [7, 1]]):
            reused = lm.evaluate_ids(prompt, reuse_cache=True)
            n_kept = lm.last_run.cached if lm.last_run else 0
            assert n_kept >= 8 + len(ids) + 1  # the rows, the text and generated tokens
            fresh = lm.evaluate_ids(prompt)
            assert rel_l2(reused.logits, fresh.logits) < 1e-5
            lm.evaluate_ids([rows, ids])  # back to the state after the prompt
            with lm.lock:
                for t in gen:
                    lm.decode_token(t)


def test_image_without_question_is_a_caption_prompt() -> None:
    """BLIP-2's captioning input (LAVIS: an empty prompt): the query rows and </s> only."""
    with load_model(*converted("blip2_t5"), OPTS) as lm:
        ev = lm.evaluate([{"role": "user", "content": "", "images": [image("pixel")]}])
        assert isinstance(ev.segments[0], np.ndarray) and ev.token_ids == [1]
        assert lm.render([{"role": "user", "content": "Hi"}]) == "Question: Hi Answer:</s>"


def test_scaled_decoder_output_is_folded_into_output_weight(tmp_path: Path) -> None:
    """The original (tied) T5 scales the decoder output by d_model ** -0.5 before lm_head;
    llama.cpp does not, so the scale goes into ``output.weight``."""
    from gguf import GGUFReader
    from mmchat.converters import convert

    src = tmp_path / "scaled"
    shutil.copytree(ROOT / "blip2_t5", src)
    _edit_config(src, scale_decoder_outputs=True)
    r = convert(src, outdir=tmp_path / "o", quant="f32", vision_quant="f32")

    def tensor(path: Path, name: str) -> np.ndarray:
        return np.array(next(t for t in GGUFReader(path).tensors if t.name == name).data)

    plain = tensor(converted("blip2_t5")[0], "output.weight")
    scaled = tensor(r.model_path, "output.weight")
    np.testing.assert_allclose(scaled, plain * 64**-0.5, rtol=1e-6)
    np.testing.assert_array_equal(plain, tensor(r.model_path, "token_embd.weight"))  # tied
