"""Chat latency: mmchat's ChatSession vs the same work done with raw llama-cpp-python calls.

    python benchmarks/chat.py                       # the llava15_hf test fixture, converted
    python benchmarks/chat.py --model M.gguf --mmproj P.gguf --threads 4
    python benchmarks/chat.py --write               # also update the `## chat` section

A five-turn conversation about one image (the image in turn 1), greedy sampling, a fixed
number of generated tokens per turn. Measured side by side in one run:

- **mmchat**: ``ChatSession.send`` — template rendering, tokenization, KV-cache prefix reuse,
  image encode (turn 1 only), sampling, UTF-8 streaming, stop-string holdback, statistics.
- **raw, prefix kept**: llama-cpp-python's low-level API on its own context with the same
  settings, given the very same token ids and image embeddings already prepared (no
  templating or tokenization is timed); it keeps the KV cache and decodes only the new
  tokens of each turn: the least work possible, the bar for overhead.
- **raw, re-evaluated**: the same, but each turn clears the KV cache and decodes the whole
  conversation again with the image re-encoded (what llama-cpp-python's chat handlers do).

TTFT is from the call to the first token's text; decode tokens/s is over the tokens after
the first. Turn 1 with a cold image cache (a fresh MMCHAT_HOME, a fresh vision engine for
the raw runs). Also: CLI start to prompt (model load excluded), in a pseudo-terminal.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## chat"
IMAGE = ROOT / "tests" / "fixtures" / "images" / "landscape.png"
QUESTIONS = [
    "What is in this image?",
    "What colours do you see?",
    "Is there any text in it?",
    "Describe the left half.",
    "Summarise everything so far.",
]


@dataclass
class Turn:
    ttft_ms: float = 0.0
    decode_tps: float = 0.0
    ttft_cpu_ms: float = 0.0  # CPU time of this thread (steadier on a busy machine)
    decode_cpu_tps: float = 0.0
    prompt_eval: int = 0
    generated: int = 0


@dataclass
class Series:
    label: str
    turns: list[list[Turn]] = field(default_factory=list)  # per repeat, per turn

    def median(self, turn: int, attr: str) -> float:
        return statistics.median(getattr(r[turn], attr) for r in self.turns)


FIXTURE = ROOT / "tests" / "fixtures" / "llava15_hf"


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F16", meta
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], np.float16).reshape(meta["shape"])
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": "F16",
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            fh.write(np.ascontiguousarray(t).tobytes())


def scaled_fixture(workdir: Path, *, hidden: int, layers: int, ffn: int, heads: int) -> Path:
    """The llava15_hf fixture grown to a LLaVA-1.5-like shape: a ``hidden``-wide,
    ``layers``-deep Llama and a 336 px / patch 14 vision grid (576 image tokens), random
    weights, same tokenizer and chat template. Written once under ``workdir``."""
    out = workdir / f"llava-h{hidden}-l{layers}"
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in FIXTURE.iterdir():
        if f.suffix in (".json", ".model") and not f.name.startswith("goldens"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((FIXTURE / "config.json").read_text())
    old_h, old_ffn = cfg["text_config"]["hidden_size"], cfg["text_config"]["intermediate_size"]
    cfg["text_config"].update(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    vis = cfg["vision_config"]
    vis.update(image_size=336, patch_size=14)
    cfg["image_seq_length"] = (336 // 14) ** 2
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    pre = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    pre["crop_size"] = {"height": 336, "width": 336}
    pre["size"] = {"shortest_edge": 336}
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = json.loads((FIXTURE / "processor_config.json").read_text())
    proc["patch_size"] = 14
    (out / "processor_config.json").write_text(json.dumps(proc, indent=2))

    rng = np.random.default_rng(0)
    src = _read_safetensors(FIXTURE / "model.safetensors")
    grown: dict[str, np.ndarray] = {}
    for name, t in src.items():
        if name.startswith("language_model.model.layers."):
            if not name.startswith("language_model.model.layers.0."):
                continue
            names = [name.replace(".layers.0.", f".layers.{i}.") for i in range(layers)]
        else:
            names = [name]
        shape = list(t.shape)
        if name.startswith(("language_model", "multi_modal_projector")):
            shape = [hidden if d == old_h else ffn if d == old_ffn else d for d in shape]
        if name.endswith("patch_embedding.weight"):
            shape = [shape[0], 3, 14, 14]
        if name.endswith("position_embedding.weight"):
            shape = [(336 // 14) ** 2 + 1, shape[1]]
        for n in names:
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                value = np.ones(shape, np.float16)
            else:
                value = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
            grown[n] = value
    _write_safetensors(out / "model.safetensors", grown)
    return out


def convert_model(src: Path, workdir: Path, quant: str) -> tuple[Path, Path]:
    from mmchat.converters import convert

    out = workdir / f"{src.name}-{quant}"
    name = src.name.replace("_", "-")
    model, mmproj = out / f"{name}-{quant}.gguf", out / f"mmproj-{name}-f32.gguf"
    if not (model.is_file() and mmproj.is_file()):
        result = convert(src, outdir=out, name=name, quant=quant, vision_quant="f32")
        model, mmproj = result.model_path, result.mmproj_path
    return model, mmproj


# --- mmchat -------------------------------------------------------------------------------


def run_mmchat(model: Any, image: Any, n_gen: int) -> tuple[list[Turn], list[Any]]:
    """One conversation; returns per-turn numbers and the messages (for the raw runs)."""
    from mmchat.runtime import Done, SamplingParams, Token

    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=n_gen, seed=0)
    session = model.session(params=params)
    turns = []
    for i, q in enumerate(QUESTIONS):
        t0, c0 = time.perf_counter(), time.thread_time()
        first = last = cfirst = clast = 0.0
        done = None
        for ev in session.send(q, [image] if i == 0 else []):
            if isinstance(ev, Token):
                last, clast = time.perf_counter(), time.thread_time()
                if not first:
                    first, cfirst = last, clast
            elif isinstance(ev, Done):
                done = ev
        assert done is not None
        n = done.stats.generated_tokens
        turns.append(
            Turn(
                ttft_ms=(first - t0) * 1000,
                decode_tps=(n - 1) / (last - first) if n > 1 and last > first else 0.0,
                ttft_cpu_ms=(cfirst - c0) * 1000,
                decode_cpu_tps=(n - 1) / (clast - cfirst) if n > 1 and clast > cfirst else 0.0,
                prompt_eval=done.stats.prompt_eval_tokens,
                generated=n,
            )
        )
    return turns, list(session.messages)


# --- raw llama-cpp-python -------------------------------------------------------------------


class Raw:
    """A llama context driven with llama-cpp-python's low-level calls only."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, n_batch: int = 512) -> None:
        import llama_cpp as L

        self.L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.n_seq_max = 1
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_embd = int(L.llama_model_n_embd(self.model))
        self.n_batch = n_batch
        self.held = 0  # positions in the KV cache
        sp = L.llama_sampler_chain_default_params()
        self.sampler = L.llama_sampler_chain_init(sp)
        L.llama_sampler_chain_add(self.sampler, L.llama_sampler_init_greedy())

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.held = 0

    def truncate(self, n: int) -> None:
        self.L.llama_memory_seq_rm(self.L.llama_get_memory(self.ctx), 0, n, -1)
        self.held = n

    def _batch(self, n: int, embd: bool) -> Any:
        return self.L.llama_batch_init(n, self.n_embd if embd else 0, 1)

    def decode(self, rows: np.ndarray | list[int], *, last: bool) -> None:
        """Decode token ids or embedding rows at the next positions, in n_batch chunks."""
        L = self.L
        is_embd = isinstance(rows, np.ndarray)
        total = len(rows)
        for a in range(0, total, self.n_batch):
            b = min(a + self.n_batch, total)
            batch = self._batch(b - a, is_embd)
            try:
                batch.n_tokens = b - a
                if is_embd:
                    chunk = np.ascontiguousarray(rows[a:b], dtype=np.float32)
                    ctypes.memmove(batch.embd, chunk.ctypes.data, chunk.nbytes)
                for j in range(b - a):
                    if not is_embd:
                        batch.token[j] = int(rows[a + j])
                    batch.pos[j] = self.held + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = 1 if (last and b == total and j == b - a - 1) else 0
                if L.llama_decode(self.ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                self.held += b - a
            finally:
                L.llama_batch_free(batch)

    def generate(self, n: int) -> tuple[Turn, list[int]]:
        """Sample and decode ``n`` tokens: the times (TTFT from this call) and the tokens."""
        L = self.L
        t0, c0 = time.perf_counter(), time.thread_time()
        first = cfirst = 0.0
        buf = ctypes.create_string_buffer(64)
        tokens = []
        one = L.llama_batch_init(1, 0, 1)
        try:
            for i in range(n):
                tok = L.llama_sampler_sample(self.sampler, self.ctx, -1)
                tokens.append(int(tok))
                L.llama_token_to_piece(self.vocab, tok, buf, 64, 0, False)
                if i == 0:
                    first, cfirst = time.perf_counter(), time.thread_time()
                one.n_tokens = 1
                one.token[0] = tok
                one.pos[0] = self.held
                one.n_seq_id[0] = 1
                one.seq_id[0][0] = 0
                one.logits[0] = 1
                if L.llama_decode(self.ctx, one) != 0:
                    raise RuntimeError("llama_decode failed")
                self.held += 1
        finally:
            L.llama_batch_free(one)
        end, cend = time.perf_counter(), time.thread_time()
        turn = Turn(
            ttft_ms=(first - t0) * 1000,
            decode_tps=(n - 1) / (end - first) if n > 1 else 0.0,
            ttft_cpu_ms=(cfirst - c0) * 1000,
            decode_cpu_tps=(n - 1) / (cend - cfirst) if n > 1 and cend > cfirst else 0.0,
            generated=n,
        )
        return turn, tokens

    def close(self) -> None:
        self.L.llama_sampler_free(self.sampler)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def _flat(items: list[Any]) -> list[Any]:
    """Prompt items → a list of positions: token ids, or (image key, row)."""
    from mmchat.runtime.model import PromptImage

    out: list[Any] = []
    for it in items:
        if isinstance(it, PromptImage):
            out.extend((it.key, j) for j in range(it.n_tokens))
        else:
            out.extend(it)
    return out


def run_raw(
    raw: Raw,
    prompts: list[list[Any]],
    gens: list[int],
    encode: Any,
    *,
    keep_prefix: bool,
) -> list[Turn]:
    """Replay the conversation's prompts (items from ``LoadedModel.build_prompt``)."""
    from mmchat.runtime.model import PromptImage

    raw.clear()
    held: list[Any] = []
    turns = []
    for items, n_gen in zip(prompts, gens, strict=True):
        flat = _flat(items)
        t0, c0 = time.perf_counter(), time.thread_time()
        common = 0
        if keep_prefix:
            while common < min(len(flat), len(held)) and flat[common] == held[common]:
                common += 1
            common = min(common, len(flat) - 1)
            raw.truncate(common)
        else:
            raw.clear()
        pos = 0
        segs: list[np.ndarray | list[int]] = []
        for it in items:
            n = it.n_tokens if isinstance(it, PromptImage) else len(it)
            lo = max(common - pos, 0)
            if lo < n:
                if isinstance(it, PromptImage):
                    segs.append(encode(it)[lo:])
                else:
                    segs.append(list(it[lo:]))
            pos += n
        for k, seg in enumerate(segs):
            raw.decode(seg, last=k == len(segs) - 1)
        t_prompt, c_prompt = time.perf_counter() - t0, time.thread_time() - c0
        turn, generated = raw.generate(n_gen)
        # the generated tokens stay in the cache, as in a chat
        held = flat + generated
        turn.ttft_ms += t_prompt * 1000
        turn.ttft_cpu_ms += c_prompt * 1000
        turn.prompt_eval = len(flat) - common
        turns.append(turn)
    return turns


# --- CLI start-up ---------------------------------------------------------------------------


_STARTUP_CHILD = """
import contextlib, sys, time
t_spawn = float(sys.argv[1])
import mmchat.repl.loader as loader
spent = [0.0, 0.0]
real_spinner = loader.spinner
def report(self, *a, **k):
    wall = (time.time() - t_spawn - spent[0]) * 1000
    cpu = (time.process_time() - spent[1]) * 1000
    print(f"STARTUP {wall:.1f} {cpu:.1f}", file=sys.stderr, flush=True)
    raise EOFError
@contextlib.contextmanager
def spinner(*a, **k):  # `mmchat run` loads the runtime and the model under its spinner
    w, c = time.time(), time.process_time()
    try:
        with real_spinner(*a, **k):
            yield
    finally:
        spent[0] += time.time() - w
        spent[1] += time.process_time() - c
        # what `mmchat run` imports next anyway; patched to report instead of prompting
        from prompt_toolkit import PromptSession
        PromptSession.prompt = report
loader.spinner = spinner
sys.argv = ["mmchat", "run", *sys.argv[2:]]
from mmchat.cli import main
main()
"""


def cli_start_ms(
    model: Path, mmproj: Path, threads: int, repeats: int
) -> tuple[list[float], list[float]]:
    """``mmchat run`` from process spawn to the moment the prompt is shown, minus the model
    load (llama.cpp's own start-up included in the load): (wall ms, CPU ms) per run. The
    child is a real ``mmchat run`` in a pseudo-terminal whose ``PromptSession.prompt``
    reports the time and exits."""
    import pexpect

    walls, cpus = [], []
    env = dict(os.environ, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    args = [str(model), "--mmproj", str(mmproj), "--threads", str(threads)]
    for _ in range(repeats):
        t0 = time.time()
        child = pexpect.spawn(
            sys.executable,
            ["-c", _STARTUP_CHILD, repr(t0), *args],
            env=env,
            encoding="utf-8",
            timeout=120,
        )
        child.expect(r"STARTUP ([0-9.]+) ([0-9.]+)")
        walls.append(float(child.match.group(1)))
        cpus.append(float(child.match.group(2)))
        child.expect(pexpect.EOF)
    return walls, cpus


# --- report ---------------------------------------------------------------------------------


def report(
    series: list[Series], startup: list[float], args: argparse.Namespace, machine: str
) -> str:
    mm, kept, naive = series
    lines = [
        SECTION,
        "",
        "A five-turn chat about one image (`benchmarks/chat.py`): mmchat's `ChatSession` vs "
        "raw llama-cpp-python calls doing the same work in the same run (see the script's "
        "docstring). Greedy, "
        f"{args.tokens} generated tokens per turn, medians of {args.repeats} runs.",
        "",
        f"Machine: {machine}. Model: {args.label}. Command: `{args.command}`",
        "",
        "Wall-clock times, then (in brackets) the CPU time of the one thread doing the work "
        "(llama.cpp runs in the calling thread with one thread), which is far steadier on a "
        "shared machine.",
        "",
        "| | turn 1 TTFT (image) | turn 5 TTFT | turn 5 prompt tokens evaluated | "
        "decode tokens/s (turns 2-5) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for s in series:
        dec = statistics.median(s.median(t, "decode_tps") for t in range(1, 5))
        dec_cpu = statistics.median(s.median(t, "decode_cpu_tps") for t in range(1, 5))
        lines.append(
            f"| {s.label} | {s.median(0, 'ttft_ms'):.1f} ms ({s.median(0, 'ttft_cpu_ms'):.1f}) "
            f"| {s.median(4, 'ttft_ms'):.1f} ms ({s.median(4, 'ttft_cpu_ms'):.1f}) | "
            f"{s.median(4, 'prompt_eval'):.0f} | {dec:.1f} ({dec_cpu:.1f}) |"
        )
    mm_dec = statistics.median(mm.median(t, "decode_cpu_tps") for t in range(1, 5))
    kept_dec = statistics.median(kept.median(t, "decode_cpu_tps") for t in range(1, 5))
    per_tok_us = (1 / mm_dec - 1 / kept_dec) * 1e6 if mm_dec and kept_dec else float("nan")
    lines += [
        "",
        "Per-turn TTFT (CPU ms, medians): "
        + "; ".join(
            f"{s.label}: " + ", ".join(f"{s.median(t, 'ttft_cpu_ms'):.1f}" for t in range(5))
            for s in series
        ),
        "",
        f"- TTFT overhead vs raw (prefix kept), CPU time: turn 1 "
        f"{mm.median(0, 'ttft_cpu_ms') / kept.median(0, 'ttft_cpu_ms') - 1:+.1%}, turn 5 "
        f"{mm.median(4, 'ttft_cpu_ms') / kept.median(4, 'ttft_cpu_ms') - 1:+.1%} "
        f"({mm.median(4, 'ttft_cpu_ms') - kept.median(4, 'ttft_cpu_ms'):+.2f} ms).",
        f"- Decode, CPU time: mmchat {mm_dec:.1f} vs raw {kept_dec:.1f} tokens/s "
        f"({mm_dec / kept_dec - 1:+.1%}), i.e. {per_tok_us:+.0f} µs per token.",
        f"- Turn 5 vs re-evaluating everything (CPU): {naive.median(4, 'ttft_cpu_ms'):.1f} ms → "
        f"{mm.median(4, 'ttft_cpu_ms'):.1f} ms "
        f"({naive.median(4, 'ttft_cpu_ms') / max(mm.median(4, 'ttft_cpu_ms'), 1e-9):.1f}x "
        "less).",
        "- CLI start to prompt, model load excluded (runtime imports and llama.cpp start-up "
        "count as load): "
        + (
            f"{statistics.median(startup[0]):.0f} ms wall, "
            f"{statistics.median(startup[1]):.0f} ms CPU (runs, wall/CPU: "
            + ", ".join(f"{w:.0f}/{c:.0f}" for w, c in zip(*startup, strict=True))
            + ")."
            if startup[0]
            else "not measured."
        ),
    ]
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    current = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(current):
        new = pattern.sub(lambda _m: text + "\n", current, count=1)
    else:
        new = current.rstrip("\n") + "\n\n" + text
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(new.rstrip("\n") + "\n")
    tmp.replace(RESULTS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a text GGUF (default: a synthetic model)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test fixture itself")
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mmchat-bench-chat",
        help="where the synthetic model is written (kept for the next run)",
    )
    ap.add_argument("--mmproj", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=32, help="tokens generated per turn")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--startup-runs", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    args = ap.parse_args()
    args.command = "python benchmarks/chat.py " + " ".join(sys.argv[1:])

    home = tempfile.mkdtemp(prefix="mmchat-bench-")
    os.environ["MMCHAT_HOME"] = home  # cold caches, no user files touched
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model is not None:
        args.label = args.model.name
    elif args.tiny:
        args.model, args.mmproj = convert_model(FIXTURE, args.workdir, "f32")
        args.label = "tests/fixtures/llava15_hf converted to f32 (tiny: 64 wide, 16 image tokens)"
    else:
        src = scaled_fixture(args.workdir, hidden=768, layers=8, ffn=2048, heads=12)
        args.model, args.mmproj = convert_model(src, args.workdir, "f16")
        args.label = (
            "the llava15_hf fixture grown to a Llama of 768 x 8 layers (f16, ~60M parameters) "
            "with 576 image tokens (336 px, patch 14), random weights"
        )

    from mmchat.runtime import LoadOptions, load_model
    from mmchat.vision import EmbeddingCache, load_image, open_vision

    image = load_image(IMAGE)
    opts = LoadOptions(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=0)
    model = load_model(args.model, args.mmproj, opts)
    raw = Raw(args.model, n_ctx=args.ctx, n_threads=args.threads)

    mm = Series("mmchat")
    kept = Series("raw llama-cpp-python, prefix kept")
    naive = Series("raw llama-cpp-python, re-evaluated")
    for r in range(args.repeats):
        model.reset()
        model.vision.cache.clear()  # turn 1 encodes the image, every repeat
        turns, messages = run_mmchat(model, image, args.tokens)
        mm.turns.append(turns)
        # the same prompts, as token ids and image slots
        prompts = []
        for i in range(len(QUESTIONS)):
            upto = [m for m in messages[: 2 * i + 1]]
            prompts.append(model.build_prompt(upto))
        gens = [t.generated for t in turns]
        for series, keep in ((kept, True), (naive, False)):
            engine = open_vision(
                args.mmproj,
                text_n_embd=model.n_embd,
                n_threads=args.threads,
                cache=EmbeddingCache(0),
            )
            try:

                def encode(slot: Any, engine: Any = engine) -> np.ndarray:
                    return engine.encode(slot.source).embeddings

                series.turns.append(run_raw(raw, prompts, gens, encode, keep_prefix=keep))
            finally:
                engine.close()
        print(
            f"run {r + 1}/{args.repeats}: turn-5 TTFT mmchat {turns[4].ttft_ms:.1f} ms, "
            f"raw {kept.turns[-1][4].ttft_ms:.1f} ms",
            flush=True,
        )
    raw.close()
    model.close()
    startup = cli_start_ms(args.model, args.mmproj, args.threads, args.startup_runs)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}"
    )
    dump = Path(args.workdir) / "last-run.json"
    dump.write_text(
        json.dumps(
            {
                "series": {
                    x.label: [[vars(t) for t in r] for r in x.turns] for x in (mm, kept, naive)
                },
                "startup": startup,
            }
        )
    )
    text = report([mm, kept, naive], startup, args, machine)
    print()
    print(text)
    if args.write:
        write_section(text)
        print(f"updated {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
