"""OpenFlamingo decoder speed: mmchat's native cross-attention decoder vs open_flamingo's own
``Flamingo`` in torch fp32 (same threads), and vs llama.cpp on the same base LLM weights
without the gated blocks.

    python benchmarks/openflamingo.py --torch-python /work/venv-of/bin/python --threads 2 [--write]

For each base in ``--bases`` a random "tiny but wide" OpenFlamingo is built in a torch
interpreter that holds open_flamingo (``--torch-python``; the project's environment has no
torch) from open_flamingo's own classes, the way ``create_model_and_transforms`` builds it and
as tests/fixtures/make_openflamingo_fixtures.py does (its tokenizer and weight randomisation
are imported from there):

- ``neox``: OpenFlamingo-4B's shape, a GPT-NeoX base (RedPajama-INCITE: sequential residual,
  full rotary), a gated block before every 2nd layer;
- ``mpt``: OpenFlamingo-9B's, an MPT-7B-style base (ALiBi, no biases, tied head), a gated
  block before every 4th layer;

both ``--hidden`` wide (heads of 64, MLP 4x) with ``--layers`` layers, the gated blocks and a
one-layer Perceiver as open_flamingo makes them (8 heads of 64, FF mult 4, 64 latents), and
a one-block ``--vis-dim`` wide OpenCLIP ViT on 28 px images (4 patches), so the image side
costs nothing. Weights are random at a real scale, gates far from 0. The image is encoded
once (``Flamingo.cache_media``) and left out of every timing; the torch prompt is one
forward of ``--prompt`` tokens (``<image>`` first) with ``use_cache=True``, decode a manual
KV-cached greedy loop of ``--gen`` tokens over ``past_key_values`` (open_flamingo's
``generate`` does the same through transformers' ``generate``; the manual loop times the
steps alone). Note that open_flamingo recomputes the image keys/values (``to_kv`` of the 64
latents) in every forward, the decode steps included; mmchat computes them once per image.

The same checkpoint is converted to f32 GGUF files by ``mmchat.converters.convert`` (in the
torch interpreter, which ``checkpoint.pt`` needs, with the project's site-packages added) and
timed through ``IdeficsRuntime`` (f32 KV); the text file with every ``blk.N.x*`` tensor
dropped and Q/K/V fused as llama.cpp's ``gptneox`` / ``mpt`` graphs load them is timed
through libllama (f32 KV, flash attention off): what the gated blocks cost, next to their
FLOP share. Torch: medians of ``--runs`` after one warm-up. Native and llama.cpp alternate
in ``--runs`` rounds (each a warm-up and a timed run of each), so that the load of a shared
machine falls on both alike; their speeds are medians over the rounds, the blocks' cost the
median of the rounds' native / llama.cpp ratios. The prompt's last logits and the greedy
tokens of torch and the native decoder are compared as a check that both ran the same model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import site
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from idefics import time_loop, write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## openflamingo"
FIXTURES = ROOT / "tests" / "fixtures" / "make_openflamingo_fixtures.py"
HEAD_DIM, HEADS, N_LATENTS, FF_MULT = 64, 8, 64, 4  # open_flamingo's blocks and Perceiver
IMAGE, PATCH = 28, 14

# base -> (decoder layers attribute, cross_attn_every_n_layers, description)
BASES: dict[str, tuple[str, int, str]] = {
    "neox": ("gpt_neox.layers", 2, "GPT-NeoX (OpenFlamingo-4B)"),
    "mpt": ("transformer.blocks", 4, "MPT-7B, ALiBi (OpenFlamingo-9B)"),
}


# --- the torch interpreter ---------------------------------------------------------------


def _fixture_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_openflamingo_fixtures", FIXTURES)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {FIXTURES}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _base_lm(base: str, n_vocab: int, args: argparse.Namespace) -> Any:
    h = args.hidden
    if base == "neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=n_vocab,
                hidden_size=h,
                num_hidden_layers=args.layers,
                num_attention_heads=h // HEAD_DIM,
                intermediate_size=4 * h,
                rotary_pct=1.0,  # RedPajama-INCITE-3B
                rotary_emb_base=10000,
                max_position_embeddings=2048,
                use_parallel_residual=False,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=0,
            )
        ).eval()
    from transformers import MptConfig, MptForCausalLM

    return MptForCausalLM(
        MptConfig(
            d_model=h,
            n_heads=h // HEAD_DIM,
            n_layers=args.layers,
            expansion_ratio=4,
            max_seq_len=2048,
            vocab_size=n_vocab,
            layer_norm_epsilon=1e-5,
            attn_config={"alibi": True, "alibi_bias_max": 8},
            bos_token_id=0,
            eos_token_id=0,
        )
    ).eval()


def _clip(fx: Any, folder: Path, vis_dim: int) -> Any:
    """A one-block OpenCLIP ViT, saved as the hub's open_clip repos publish one."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = {"layers": 1, "width": vis_dim, "head_width": HEAD_DIM, "image_size": IMAGE}
    vision["patch_size"] = PATCH
    text = {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}
    clip = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=CLIPVisionCfg(**vision, mlp_ratio=4.0),
        text_cfg=CLIPTextCfg(**text),
        quick_gelu=True,
    )
    fx.randomise(clip, 3)
    folder.mkdir()
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    cfg = {"embed_dim": 64, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text}
    pre = {"mean": fx.CLIP_MEAN, "std": fx.CLIP_STD}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=1)
    )
    clip.visual.output_tokens = True
    clip.visual.final_ln_after_pool = True  # the tokens without ln_post (docs/openflamingo-gguf)
    return clip


def _randomise_trained(model: Any, width: int) -> None:
    """What OpenFlamingo trains (Perceiver, gated blocks, resized embeddings) at a real
    scale: LayerNorms near 1, linears by fan-in, gates far from 0."""
    import torch

    g = torch.Generator().manual_seed(7)
    lang = model.lang_encoder
    parts = [model.perceiver, *(b for b in lang.gated_cross_attn_layers if b is not None)]
    with torch.no_grad():

        def noise(p: torch.Tensor) -> torch.Tensor:
            return torch.randn(p.shape, generator=g)

        for part in parts:
            for m in part.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.copy_(1.0 + 0.1 * noise(m.weight))
                    m.bias.copy_(0.05 * noise(m.bias))
                elif isinstance(m, torch.nn.Linear):
                    m.weight.copy_(noise(m.weight) * m.weight.shape[1] ** -0.5)
            for name, p in part.named_parameters():
                if name.endswith("_gate"):
                    n = noise(p)
                    p.copy_(0.8 * n + 0.6 * torch.sign(n))
                elif name == "latents":
                    p.copy_(0.5 * noise(p))
        emb_in, emb_out = lang.get_input_embeddings().weight, lang.get_output_embeddings().weight
        if emb_out is emb_in:  # a tied head (MPT)
            emb_in.copy_(noise(emb_in) * width**-0.5)
        else:
            emb_in.copy_(noise(emb_in))
            emb_out.copy_(noise(emb_out) * width**-0.5)


def torch_side(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build, save and time the OpenFlamingo, then convert it (see the module doc)."""
    import torch

    fx = _fixture_module()  # also stubs torchvision's compiled ops for open_clip
    import open_flamingo
    import transformers
    from open_flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.helpers import PerceiverResampler
    from open_flamingo.src.utils import extend_instance

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers_attr, every_n, _ = BASES[args.base]
    folder = work / "release"
    base_dir = folder / "base"
    base_dir.mkdir(parents=True)
    tok = fx.base_tokenizer(base_dir)
    n_base = len(tok)
    lm = _base_lm(args.base, n_base + 13, args)
    fx.randomise(lm, 1)
    lm.save_pretrained(base_dir, safe_serialization=True)
    clip = _clip(fx, folder / "clip", args.vis_dim)

    # open_flamingo.src.factory.create_model_and_transforms, step by step
    tok.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(layers_attr)
    lm.resize_token_embeddings(len(tok))
    eoc, media = tok.encode("<|endofchunk|>")[-1], tok.encode("<image>")[-1]
    model = Flamingo(
        clip, lm, eoc, media, vis_dim=args.vis_dim, cross_attn_every_n_layers=every_n
    ).eval()
    model.perceiver = PerceiverResampler(dim=args.vis_dim, depth=1)
    _randomise_trained(model, args.hidden)
    embeds = (
        "lang_encoder.gpt_neox.embed_in.weight",
        "lang_encoder.embed_out.weight",
        "lang_encoder.transformer.wte.weight",
    )
    # transformers 5 names GPT-NeoX's head lm_head; the releases (transformers 4) embed_out
    neox_head = {"lang_encoder.lm_head.weight": "lang_encoder.embed_out.weight"}
    renamed = neox_head if args.base == "neox" else {}
    keep = {
        renamed.get(k, k): v.clone()
        for k, v in model.state_dict().items()
        if k.startswith("perceiver.")
        or (".gated_cross_attn_layer." in k and k.startswith(f"lang_encoder.{layers_attr}."))
        or renamed.get(k, k) in embeds
    }
    torch.save(keep, folder / "checkpoint.pt")

    rng = np.random.default_rng(0)
    ids = [media] + [int(x) for x in rng.integers(1, n_base, args.prompt - 1)]
    input_ids = torch.tensor([ids])
    px = torch.randn(1, 1, 1, 3, IMAGE, IMAGE)
    state: dict[str, Any] = {}
    with torch.inference_mode():
        model.cache_media(input_ids=input_ids, vision_x=px)
        rows = model.lang_encoder._get_decoder_layers()[0].vis_x[0, 0]

        def prefill() -> None:
            out = model(None, input_ids, clear_conditioned_layers=False, use_cache=True)
            state.update(past=out.past_key_values, logits=out.logits[0, -1])
            state["greedy"] = [int(state["logits"].argmax())]

        def step(pos: int) -> None:
            out = model(
                None,
                torch.tensor([[state["greedy"][-1]]]),
                past_key_values=state["past"],
                use_cache=True,
                clear_conditioned_layers=False,
            )
            state["past"] = out.past_key_values
            state["greedy"].append(int(out.logits[0, -1].argmax()))

        pre, dec = time_loop(prefill, step, len(ids), args.runs, args.gen)
        model.uncache_media()
    np.save(work / "rows.npy", rows.float().numpy())
    np.save(work / "logits.npy", state["logits"].float().numpy())

    site.addsitedir(args.project_site)  # mmchat and gguf, behind this interpreter's packages
    from mmchat.converters import convert

    r = convert(folder, outdir=work / "gguf", quant="f32", vision_quant="f32")
    return {
        "prefill_s": pre,
        "decode_s_per_tok": dec,
        "greedy": state["greedy"],
        "ids": ids,
        "text": str(r.model_path),
        "mmproj": str(r.mmproj_path),
        "n_vocab": len(tok),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "open_flamingo": getattr(open_flamingo, "__version__", "")
            or metadata.version("open_flamingo"),
        },
    }


# --- the project's interpreter -------------------------------------------------------------


def plain_gguf(src: Path, dst: Path) -> None:
    """The text GGUF as llama.cpp's own graph of its architecture (``gptneox`` / ``mpt``)
    loads it: no gated blocks (``blk.N.x*``), Q/K/V fused into ``attn_qkv`` ([q; k; v] rows,
    as llama.cpp's converter writes them for both)."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    w = GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        w.add_key_value(
            f.name, f.contents(), vt, sub_type=f.types[-1] if vt == GGUFValueType.ARRAY else None
        )
    tensors = {t.name: t for t in r.tensors}
    for name, t in tensors.items():
        if ".x" in name or ".attn_k." in name or ".attn_v." in name:
            continue
        if ".attn_q." in name:
            parts = [tensors[name.replace(".attn_q.", f".attn_{p}.")] for p in "qkv"]
            if any(p.tensor_type != parts[0].tensor_type for p in parts) or parts[0].data.dtype != (
                np.float32
            ):
                raise ValueError(f"{name}: only f32 Q/K/V are fused here")
            fused = np.concatenate([np.asarray(p.data) for p in parts], axis=0)
            w.add_tensor(name.replace(".attn_q.", ".attn_qkv."), fused)
            continue
        w.add_tensor(
            name,
            np.asarray(t.data),
            raw_shape=list(reversed([int(x) for x in t.shape])),
            raw_dtype=t.tensor_type,
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def native_side(work: Path, ref: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from mmchat.runtime import _llama
    from mmchat.runtime.flamingo import IdeficsRuntime

    ids = np.asarray(ref["ids"], dtype=np.int32)
    rows = np.load(work / "rows.npy")
    n = len(ids)
    n_ctx = n + args.gen + 8
    rt = IdeficsRuntime.open(
        ref["text"], ref["mmproj"], n_ctx=n_ctx, n_batch=512, n_threads=args.threads, device="cpu"
    )
    greedy: list[int] = []
    diff: list[float] = []
    want = np.load(work / "logits.npy")

    def fl_prefill() -> None:
        rt.prefill(ids.tolist(), [rows])
        logits = rt.backend.last_logits()
        greedy[:] = [int(np.argmax(logits))]
        diff[:] = [float(np.abs(logits - want).max())]

    def fl_step(pos: int) -> None:
        rt.backend.decode_one(greedy[-1], pos)
        greedy.append(int(np.argmax(rt.backend.last_logits())))

    plain = work / "plain.gguf"
    plain_gguf(Path(ref["text"]), plain)
    tm = _llama.TextModel(str(plain), n_gpu_layers=0)
    ctx = _llama.Context(
        tm, n_ctx=n_ctx, n_batch=512, n_threads=args.threads, flash_attn=False, kv_cache_type="f32"
    )

    def ll_prefill() -> None:
        ctx.clear()
        ctx.decode_tokens(ids, 0, logits_last=True)

    def ll_step(pos: int) -> None:
        ctx.decode_one(int(np.argmax(ctx.last_logits())), pos)

    try:
        # alternate the two in every round so that a shared machine's load falls on both
        rounds = [
            [time_loop(pre, step, n, 1, args.gen) for pre, step in engines]
            for engines in [[(fl_prefill, fl_step), (ll_prefill, ll_step)]] * args.runs
        ]
    finally:
        ctx.close()
        tm.close()
        rt.close()
    med = statistics.median
    return {
        "native": (med(r[0][0] for r in rounds), med(r[0][1] for r in rounds)),
        "llama": (med(r[1][0] for r in rounds), med(r[1][1] for r in rounds)),
        # the blocks' cost: the median of each round's native / llama.cpp ratio
        "cost": (med(r[0][0] / r[1][0] for r in rounds), med(r[0][1] / r[1][1] for r in rounds)),
        "native_greedy": greedy,
        "logits_diff": diff[0],
    }


def flop_share(h: int, layers: int, every_n: int, ctx: float, vis_dim: int, n_img: float) -> float:
    """Per-token multiply-adds of the gated blocks relative to the base decoder's layers
    (GPT-NeoX and MPT alike: Q/K/V/out 4 h^2, GELU MLP 2 h 4h, attention 2 h ctx).
    open_flamingo's block: LayerNorm (not counted), q and out projections h x 8*64, attention
    over the 64 latents, LayerNorm + FF (h -> 4h -> h, GELU); its image keys/values (64
    latents x vis_dim x 2*8*64) are made once per image: ``n_img`` images per token (prompt:
    1/N, decode: 0). The output head is left out (a vocabulary of a few hundred rows)."""
    inner = HEADS * HEAD_DIM
    base = 4 * h * h + 2 * h * 4 * h + 2 * h * ctx
    cross = 2.0 * h * inner + 2 * h * FF_MULT * h + 2 * inner * N_LATENTS
    cross += n_img * 2 * vis_dim * inner * N_LATENTS
    return (layers // every_n) * cross / (layers * base)


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs (shared), {threads} threads"


def _native_lib() -> str:
    from mmchat.native.library import find_library

    lib = find_library()
    return str(lib) if lib else "none"


def _head() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def run_base(base: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"ofbench-{base}-") as tmp:
        work = Path(tmp)
        cmd = [args.torch_python, __file__, "--child", str(work), "--base", base]
        cmd += [f"--project-site={site.getsitepackages()[0]}"]
        cmd += [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("threads", "hidden", "layers", "vis_dim", "prompt", "gen", "runs")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if proc.returncode != 0:
            sys.exit(f"the torch side failed ({base}):\n{proc.stderr[-4000:]}")
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        return {**ref, **native_side(work, ref, args)}


def report(res: dict[str, dict[str, Any]], args: argparse.Namespace, load: list[float]) -> str:
    first = next(iter(res.values()))
    v = first["versions"]
    n = args.prompt
    lines = [
        SECTION,
        "",
        f"Command: `nice -n 10 python benchmarks/openflamingo.py --threads {args.threads} "
        f"--hidden {args.hidden} --layers {args.layers} --vis-dim {args.vis_dim} --prompt {n} "
        f"--gen {args.gen} --runs {args.runs} --bases {','.join(res)}`",
        f"Machine: {machine(args.threads)}; load average {load[0]:.2f} before, {load[1]:.2f} "
        f"after; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, open_flamingo "
        f"{v['open_flamingo']}, llama-cpp-python {metadata.version('llama_cpp_python')}, mmchat "
        f"{_head()} (native library {_native_lib()}).",
        "",
        "| base | engine | prompt tok/s | decode tok/s |",
        "| --- | --- | ---: | ---: |",
    ]
    notes = []
    for base, r in res.items():
        desc = BASES[base][2]
        (fp, fd), (lp, ld), (cp, cd) = r["native"], r["llama"], r["cost"]
        rows = [
            ("open_flamingo Flamingo, torch fp32 (KV-cached loop)", r["prefill_s"]),
            ("mmchat native decoder via IdeficsRuntime (f32, f32 KV)", fp),
            ("llama.cpp, same base without gated blocks (f32 KV, no FA)", lp),
        ]
        decs = [r["decode_s_per_tok"], fd, ld]
        for (name, p), d in zip(rows, decs, strict=True):
            lines.append(f"| {desc} | {name} | {n / p:.0f} | {1 / d:.1f} |")
        every_n = BASES[base][1]
        sp = flop_share(args.hidden, args.layers, every_n, n, args.vis_dim, 1 / n)
        sd = flop_share(args.hidden, args.layers, every_n, n + args.gen / 2, args.vis_dim, 0)
        agree = 0
        for a, b in zip(r["greedy"], r["native_greedy"], strict=False):
            if a != b:
                break
            agree += 1
        notes.append(
            f"{desc}: native vs torch: prompt {r['prefill_s'] / fp:.2f}x, decode "
            f"{r['decode_s_per_tok'] / fd:.2f}x. Gated blocks over llama.cpp (median of "
            f"the rounds' ratios): prompt {cp:.2f}x, decode {cd:.2f}x; their FLOP share "
            f"predicts {1 + sp:.2f}x / {1 + sd:.2f}x, so measured / predicted = "
            f"{cp / (1 + sp):.2f} / {cd / (1 + sd):.2f} (extra time over extra FLOPs: "
            f"{(cp - 1) / sp:.2f} / {(cd - 1) / sd:.2f}). Check: the prompt's last "
            f"logits differ from torch's by at most {r['logits_diff']:.1e}; greedy tokens "
            f"equal torch's for the first {agree} of {len(r['greedy'])}."
        )
    lines.append("")
    for note in notes:
        lines += [note, ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--torch-python", default="/work/venv-of/bin/python")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vis-dim", type=int, default=1024, help="ViT width (ViT-L/14: 1024)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bases", default="neox,mpt", help="comma-separated: neox, mpt")
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base", default="neox", choices=sorted(BASES), help=argparse.SUPPRESS)
    ap.add_argument("--project-site", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(torch_side(Path(args.child), args)))
        return
    bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    unknown = [b for b in bases if b not in BASES]
    if unknown or not bases:
        ap.error(f"--bases: {', '.join(unknown) or 'none'}; choose from {', '.join(BASES)}")
    if args.prompt < 2 or args.gen < 1 or args.runs < 1:
        ap.error("--prompt >= 2, --gen >= 1 and --runs >= 1")
    load0 = os.getloadavg()[0]
    res: dict[str, dict[str, Any]] = {}
    for base in bases:
        res[base] = run_base(base, args)
    text = report(res, args, [load0, os.getloadavg()[0]])
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
