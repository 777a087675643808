"""``convert()``: a LLaVA-family checkpoint -> text GGUF + mmproj GGUF, in one pass each.

Every tensor is read, transformed, quantized and written in turn (the next one is read
while the current one is quantized), so memory holds about two tensors at a time whatever
the size of the model. Both files are written under temporary names in the output folder
and renamed at the very end; after any failure (including Ctrl-C) the temporaries are
removed and nothing exists under a final name.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType

from mmchat.errors import UserError

from . import quant as Q
from .families import Family, FamilyPlan, TensorJob, detect_family, detect_folder_family
from .families.base import read_json
from .families.neva import NevaFamily, nemo_source
from .source import resolve_source
from .tokenizer import Vocab, load_vocab

ProgressFn = Callable[[str, int], None]  # (tensor name, source bytes done)


@dataclass
class PartSummary:
    part: str
    path: Path
    n_tensors: int
    n_bytes: int
    source_bytes: int
    types: dict[str, int]
    seconds: float = 0.0


@dataclass
class ConversionResult:
    name: str
    model_path: Path
    mmproj_path: Path
    quant: str
    vision_quant: str
    family: str
    architecture: str
    source: dict[str, Any]
    chat_template: str | None
    template_source: str
    parts: list[PartSummary]
    seconds: float
    n_image_tokens: int
    notes: list[str] = field(default_factory=list)

    @property
    def source_bytes(self) -> int:
        return sum(p.source_bytes for p in self.parts)

    def summary_table(self) -> Any:
        from rich.table import Table

        table = Table(title=f"Converted {self.name} in {self.seconds:.1f} s", title_justify="left")
        table.add_column("part")
        table.add_column("file", overflow="fold")
        table.add_column("tensors", justify="right")
        table.add_column("size", justify="right")
        table.add_column("types")
        table.add_column("time", justify="right")
        for p in self.parts:
            types = ", ".join(f"{t} x{n}" for t, n in sorted(p.types.items(), key=lambda x: -x[1]))
            table.add_row(
                p.part,
                p.path.name,
                str(p.n_tensors),
                human_bytes(p.n_bytes),
                types,
                f"{p.seconds:.1f} s",
            )
        return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


_NAME_OK = re.compile(r"[^A-Za-z0-9._-]+")


def default_name(folder: Path, repo_id: str | None) -> str:
    base = repo_id.split("/")[-1] if repo_id else folder.name
    return _NAME_OK.sub("-", base).strip("-.").lower() or "model"


# --- GGUF writing -------------------------------------------------------------------------


@dataclass
class _Planned:
    job: TensorJob
    type: GGMLQuantizationType
    nbytes: int


def _plan_types(
    jobs: list[TensorJob], choose: Callable[[TensorJob], GGMLQuantizationType]
) -> list[_Planned]:
    out = []
    for j in jobs:
        t = choose(j)
        out.append(_Planned(j, t, Q.nbytes_for(t, j.shape)))
    return out


def _write_tensor(writer: GGUFWriter, data: np.ndarray) -> None:
    """One tensor's bytes into the open file (a seam for tests injecting write errors)."""
    writer.write_tensor_data(data)


def _write_file(
    path: Path,
    arch: str,
    add_kv: Callable[[GGUFWriter], None],
    planned: list[_Planned],
    *,
    pool: ThreadPoolExecutor,
    reader: ThreadPoolExecutor,
    progress: ProgressFn | None,
) -> None:
    writer = GGUFWriter(path, arch)
    try:
        add_kv(writer)
        for p in planned:
            writer.add_tensor_info(
                p.job.name, p.job.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        pending: Future[np.ndarray] | None = None
        for i, p in enumerate(planned):
            data = pending.result() if pending is not None else p.job.load()
            pending = reader.submit(planned[i + 1].job.load) if i + 1 < len(planned) else None
            if tuple(data.shape) != tuple(p.job.shape):
                raise RuntimeError(f"{p.job.name}: loaded shape {data.shape} != {p.job.shape}")
            encoded = Q.encode(data, p.type, pool=pool)
            del data
            _write_tensor(writer, encoded)
            del encoded
            if progress is not None:
                progress(p.job.name, p.job.source_bytes)
        assert writer.fout is not None
        for fh in writer.fout:
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        writer.close()


def _text_kv(
    plan: FamilyPlan, vocab: Vocab, name: str, tq: Q.TextQuant, repo: str | None, quantized: bool
) -> Callable[[GGUFWriter], None]:
    hp = plan.text

    def add(w: GGUFWriter) -> None:
        w.add_type("model")
        w.add_name(name)
        w.add_file_type(int(tq.ftype))
        if quantized:
            w.add_quantization_version(GGML_QUANT_VERSION)
        if repo:
            w.add_source_url(f"https://huggingface.co/{repo}")
            w.add_string("general.source.huggingface.repository", repo)
        w.add_string(
            "general.description", f"{plan.architecture} language model (converted by mmchat)"
        )
        w.add_vocab_size(hp.n_vocab)
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_rope_dimension_count(hp.rope_dim or hp.head_dim)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        if hp.head_dim * hp.n_head != hp.n_embd:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
        if hp.gguf_arch in ("nemotron", "stablelm", "gptneox", "mpt"):  # LayerNorm models
            w.add_layer_norm_eps(hp.rms_eps)
        else:
            w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_rope_freq_base(hp.rope_theta)
        if hp.rope_scaling is not None:
            from gguf import RopeScalingType

            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(hp.rope_scaling[1])
        if hp.sliding_window:
            w.add_sliding_window(hp.sliding_window)
        w.add_tokenizer_model(vocab.model)
        if vocab.pre:
            w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        if vocab.model == "llama":
            w.add_token_scores(vocab.scores)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        w.add_token_types(vocab.types)
        if vocab.bos_id is not None:
            w.add_bos_token_id(vocab.bos_id)
        if vocab.eos_id is not None:
            w.add_eos_token_id(vocab.eos_id)
        if vocab.unk_id is not None:
            w.add_unk_token_id(vocab.unk_id)
        if vocab.pad_id is not None:
            w.add_pad_token_id(vocab.pad_id)
        if hp.add_space_prefix is not None:
            w.add_add_space_prefix(hp.add_space_prefix)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(vocab.add_eos)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        w.add_bool("mmchat.tokenizer.legacy_spaces", plan.legacy_spaces)
        if plan.space_after_image is not None:
            w.add_bool("mmchat.tokenizer.space_after_image", plan.space_after_image)
        for key, value in plan.text_kv:
            _add_value(w, key, value)

    return add


def _add_value(w: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, bytes):
        w.add_array(key, value)  # uint8 array
    elif isinstance(value, (list, tuple)) and value and all(isinstance(x, str) for x in value):
        w.add_array(key, [str(x) for x in value])
    elif isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value):
        w.add_array(key, [int(x) for x in value])
    elif isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) for x in value):
        w.add_array(key, [float(x) for x in value])
    else:
        raise TypeError(f"cannot write metadata {key!r} of type {type(value).__name__}")


def _vision_kv(
    plan: FamilyPlan, name: str, vq: GGMLQuantizationType
) -> Callable[[GGUFWriter], None]:
    v = plan.vision

    def add(w: GGUFWriter) -> None:
        w.add_type("mmproj")
        w.add_name(f"{name} vision encoder and projector")
        w.add_description(v.description(name))
        w.add_file_type(int(Q.VISION_FTYPES[vq]))
        if vq not in Q.FLOAT_TYPES:
            w.add_quantization_version(GGML_QUANT_VERSION)
        for key, value in v.kv():
            _add_value(w, key, value)
        for key, value in plan.vision_kv:
            _add_value(w, key, value)

    return add


# --- the conversion -------------------------------------------------------------------------


def _os_error(exc: OSError, outdir: Path) -> UserError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"Not enough disk space in {outdir} to write the GGUF files ({why})")
    return UserError(f"Cannot write to {outdir}: {why}")


@contextmanager
def _temp_paths(finals: list[Path]) -> Iterator[list[Path]]:
    tag = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"
    temps = [f.with_name(f".{f.name}.{tag}.partial") for f in finals]
    try:
        yield temps
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise


def convert(
    source: str | Path,
    *,
    outdir: Path,
    name: str | None = None,
    quant: str = "q4_k_m",
    vision_quant: str = "f16",
    vision_tower: Path | None = None,
    progress: bool | ProgressFn = False,
    threads: int | None = None,
    files: Mapping[str, Path] | None = None,
) -> ConversionResult:
    """Convert a supported checkpoint (folder or Hugging Face repo id) to two GGUF files.

    ``files``: for an original release without config.json (LAVIS, MiniGPT-4, MiniGPT-v2),
    the published parts that are not in the folder: ``eva`` (eva_vit_g.pth), ``qformer``
    (blip2_pretrained_flant5xxl.pth), ``llm`` (the language model folder).

    Returns the paths, the chosen name and a summary. Raises :class:`UserError` for
    anything the user can fix; never leaves a file under a final name after a failure.
    """
    t0 = time.perf_counter()
    tq = Q.parse_text_quant(quant)
    vq = Q.parse_vision_quant(vision_quant)
    nemo = nemo_source(source)
    config: dict[str, Any] = {}
    family: Family
    if nemo is not None:  # a NeMo .nemo archive or NeMo 2.0 folder (NeVA)
        folder, repo, family = nemo, None, NevaFamily()
    else:
        folder, repo = resolve_source(source)
        cfg_path = folder / "config.json"
        if cfg_path.is_file():
            config = read_json(cfg_path)
            family = detect_family(config)
        else:
            family = detect_folder_family(folder, files)
    if files and (config or nemo is not None):  # an original release checks its own parts
        flags = ", ".join(f"--{k}" for k in files)
        raise UserError(
            f"{flags}: only for original LAVIS / MiniGPT-4 releases (a folder without "
            "config.json), not for this checkpoint"
        )
    plan = family.plan(folder, config, vision_tower=vision_tower)
    vocab = plan.vocab or load_vocab(
        plan.tokenizer_dir,
        vocab_size=plan.text.n_vocab,
        config_ids=plan.config_ids,
        default_template=plan.default_template,
    )
    if plan.add_bos is not None:
        vocab.add_bos = plan.add_bos
    name = name or default_name(folder.with_suffix("") if nemo else folder, repo)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
        raise UserError(f"Invalid model name {name!r}: use letters, digits, '.', '_', '-', ':'")
    file_stem = name.replace(":", "-").replace("/", "-")

    hp = plan.text
    n_gqa = hp.n_head // max(1, hp.n_head_kv)
    text_planned = _plan_types(
        plan.text_tensors,
        lambda j: Q.text_tensor_type(
            tq, j.name, j.shape, n_layer=hp.n_layer, n_gqa=n_gqa, tied_output=hp.tied_embeddings
        ),
    )
    vis_planned = _plan_types(
        plan.vision_tensors, lambda j: Q.vision_tensor_type(vq, j.name, j.shape)
    )
    text_quantized = any(p.type not in Q.FLOAT_TYPES for p in text_planned)

    outdir = Path(outdir).expanduser()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, outdir) from exc
    if not outdir.is_dir():
        raise UserError(f"The output path {outdir} is not a folder")
    model_final = outdir / f"{file_stem}-{tq.name}.gguf"
    mmproj_final = outdir / f"mmproj-{file_stem}-{vision_quant.strip().lower()}.gguf"
    need = sum(p.nbytes for p in text_planned + vis_planned) + 64 * 1024 * 1024
    try:
        free = shutil.disk_usage(outdir).free
    except OSError:
        free = need
    if free < need:
        raise UserError(
            f"Not enough disk space in {outdir}: the GGUF files need about "
            f"{human_bytes(need)}, {human_bytes(free)} is free"
        )

    bar = None
    report: ProgressFn | None = None
    if callable(progress):
        report = progress
    elif progress:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from mmchat.console import err

        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        total = sum(p.job.source_bytes for p in text_planned + vis_planned)
        task = bar.add_task(f"Converting {name}", total=total)

        def report(tensor: str, n: int) -> None:
            bar.update(task, advance=n)

    n_threads = threads or Q.default_threads()
    parts: list[PartSummary] = []
    tv = time.perf_counter()
    try:
        if bar is not None:
            bar.start()
        with (
            _temp_paths([mmproj_final, model_final]) as (mmproj_tmp, model_tmp),
            ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="quant") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") as reader,
        ):
            try:
                _write_file(
                    mmproj_tmp,
                    "clip",
                    _vision_kv(plan, name, vq),
                    vis_planned,
                    pool=pool,
                    reader=reader,
                    progress=report,
                )
                tt = time.perf_counter()
                _write_file(
                    model_tmp,
                    plan.text.gguf_arch,
                    _text_kv(plan, vocab, name, tq, repo, text_quantized),
                    text_planned,
                    pool=pool,
                    reader=reader,
                    progress=report,
                )
                te = time.perf_counter()
                os.replace(model_tmp, model_final)
                try:
                    os.replace(mmproj_tmp, mmproj_final)
                except BaseException:
                    model_final.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise _os_error(exc, outdir) from exc
    finally:
        if bar is not None:
            bar.stop()

    def counts(planned: list[_Planned]) -> dict[str, int]:
        return dict(Counter(p.type.name for p in planned))

    parts.append(
        PartSummary(
            "language model",
            model_final,
            len(text_planned),
            model_final.stat().st_size,
            sum(p.job.source_bytes for p in text_planned),
            counts(text_planned),
            te - tt,
        )
    )
    parts.append(
        PartSummary(
            "vision + projector",
            mmproj_final,
            len(vis_planned),
            mmproj_final.stat().st_size,
            sum(p.job.source_bytes for p in vis_planned),
            counts(vis_planned),
            tt - tv,
        )
    )
    src: dict[str, Any] = {"family": plan.family, "architecture": plan.architecture}
    if repo:
        src["repo"] = repo
    else:
        src["path"] = str(folder)
    if plan.vision_source and plan.vision_source != "checkpoint":
        src["vision_tower"] = plan.vision_source
    src["quant"] = tq.name
    src["vision_quant"] = vision_quant.strip().lower()
    return ConversionResult(
        name=name,
        model_path=model_final,
        mmproj_path=mmproj_final,
        quant=tq.name,
        vision_quant=vision_quant.strip().lower(),
        family=plan.family,
        architecture=plan.architecture,
        source=src,
        chat_template=vocab.chat_template,
        template_source=vocab.template_source,
        parts=parts,
        seconds=time.perf_counter() - t0,
        n_image_tokens=plan.vision.n_image_tokens,
        notes=plan.notes + vocab.notes,
    )


__all__ = ["ConversionResult", "LlamaFileType", "PartSummary", "convert"]
