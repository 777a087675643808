"""Model store commands: ``pull``, ``list``, ``show``, ``rm``, ``cp``, ``create``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from mmchat.cli.app import app
from mmchat.console import out, print_warning
from mmchat.errors import NotFoundError
from mmchat.units import format_bytes


def _ago(ts: float) -> str:
    if not ts:
        return "-"
    delta = max(0.0, time.time() - ts)
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if delta >= secs:
            n = int(delta // secs)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def _iso(ts: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None


# ---------------------------------------------------------------------------- pull
@app.command()
def pull(
    name: str = typer.Argument(..., help="llava, llava:13b, bakllava, hf.co/{org}/{repo}[:quant]"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print what would be downloaded and its size, then stop."
    ),
) -> None:
    """Download a model (text GGUF + projector) into the local store."""
    from mmchat.hub import Puller, RichPullProgress
    from mmchat.hub.pull import hf_offline
    from mmchat.store import open_store, parse_name

    store = open_store()
    mname = parse_name(name)
    if hf_offline() and store.exists(mname):
        rec = store.resolve(mname)
        out.print(f"{rec.name} is present (offline: not checking for updates)", markup=False)
        return
    with RichPullProgress() as progress:
        puller = Puller(store, progress=progress)
        plan = puller.plan(mname)
        out.print(f"pulling {plan.name.full} from {plan.source_label}", markup=False)
        if not plan.files:
            out.print("  nothing to download: converting the checkpoint locally", markup=False)
        width = max((len(f.filename) for f in plan.files), default=0)
        for f in plan.files:
            size = format_bytes(f.size) if f.size is not None else "?"
            state = "  (already present)" if f.present else ""
            out.print(f"  {f.role:<8}{f.filename:<{width}}  {size:>10}{state}", markup=False)
        for note in plan.notes:
            print_warning(note)
        out.print(
            f"total {format_bytes(plan.total_size)}, to download "
            f"{format_bytes(plan.download_size)}",
            markup=False,
        )
        if dry_run:
            return
        rec = puller.pull(plan)
    out.print(
        f"success: {rec.name} (id {rec.id}); chat with: mmchat run {rec.name}",
        markup=False,
        soft_wrap=True,
    )


# ---------------------------------------------------------------------------- list
def _caps(caps: list[str]) -> str:
    return "+".join(caps) if caps else "-"


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the models in the local store."""
    from rich.table import Table

    from mmchat.store import open_store

    store = open_store()
    records = store.list_models(on_error=lambda p, e: print_warning(f"skipping {p}: {e}"))
    if as_json:
        rows = [
            {
                "name": r.name,
                "id": r.id,
                "size": r.size,
                "family": r.family,
                "quant": r.quant,
                "capabilities": r.capabilities,
                "modified": _iso(r.modified),
                "parts": {role: p.get("digest") for role, p in r.parts.items()},
            }
            for r in records
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for col in ("NAME", "ID", "SIZE", "FAMILY", "QUANT", "VISION/AUDIO", "MODIFIED"):
        table.add_column(col, no_wrap=True, justify="right" if col == "SIZE" else "left")
    for r in records:
        table.add_row(
            r.name,
            r.id,
            format_bytes(r.size),
            r.family,
            r.quant,
            _caps(r.capabilities),
            _ago(r.modified),
        )
    out.print(table)


# ---------------------------------------------------------------------------- show
def describe(name: str) -> dict[str, Any]:
    """Everything ``show`` prints, as a dict (also the ``--json`` output)."""
    from mmchat.gguf_meta import read_gguf
    from mmchat.store import open_store
    from mmchat.store.inspect import summarize_model, summarize_projector

    store = open_store()
    rec = store.resolve(name)
    model_info = read_gguf(rec.model_path, role="model")
    model = summarize_model(model_info)
    model.update(
        file=rec.parts["model"].get("filename"),
        digest=rec.parts["model"].get("digest"),
        path=str(rec.model_path),
        size=rec.parts["model"].get("size"),
    )
    projector = None
    if rec.mmproj_path is not None:
        projector = summarize_projector(read_gguf(rec.mmproj_path, role="projector (mmproj)"))
        projector.update(
            file=rec.parts["mmproj"].get("filename"),
            digest=rec.parts["mmproj"].get("digest"),
            path=str(rec.mmproj_path),
            size=rec.parts["mmproj"].get("size"),
        )
    from mmchat.memory import available_memory, estimate

    raw_ctx = rec.params.get("num_ctx")
    n_ctx = raw_ctx if isinstance(raw_ctx, int) else 4096
    est = estimate(rec.model_path, rec.mmproj_path, n_ctx=n_ctx)
    memory = {
        "needed": est.total,
        "weights": est.weights,
        "kv_cache": est.kv_cache,
        "compute": est.compute,
        "n_ctx": n_ctx,
        "available": available_memory(),
    }
    if rec.template:
        template = {"kind": "custom", "text": rec.template}
    elif model["chat_template"]:
        template = {
            "kind": "gguf",
            "text": model_info.get("tokenizer.chat_template"),
        }
    elif rec.template_hint:
        template = {"kind": "builtin", "name": rec.template_hint}
    else:
        template = {"kind": "none"}
    return {
        "name": rec.name,
        "id": rec.id,
        "family": rec.family,
        "capabilities": rec.capabilities,
        "size": rec.size,
        "model": model,
        "projector": projector,
        "template": template,
        "template_hint": rec.template_hint,
        "memory": memory,
        "parameters": rec.params,
        "license": rec.license,
        "source": rec.manifest.get("source", {}),
        "modified": _iso(rec.modified),
    }


def _memory_text(mem: dict[str, Any]) -> str:
    """What the model needs to run (weights + context + compute) against what is free."""
    from mmchat.memory import MemoryEstimate, summary

    est = MemoryEstimate(mem["weights"], mem["kv_cache"], mem["compute"])
    return summary(est, mem["available"], mem["n_ctx"])


def _kv(rows: list[tuple[str, Any]]) -> None:
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for key, value in rows:
        table.add_row("    " + key, "-" if value is None or value == "" else str(value))
    out.print(table)


@app.command()
def show(
    name: str = typer.Argument(..., help="Model name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model's architecture, projector, template, parameters, license and files."""
    from mmchat.store.inspect import format_params

    info = describe(name)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    m = info["model"]
    out.print(f"[bold]{info['name']}[/bold]  id {info['id']}  {format_bytes(info['size'])}")
    out.print("  Model", style="bold", markup=False)
    _kv(
        [
            ("architecture", m["architecture"]),
            ("parameters", format_params(m["parameters"])),
            ("context length", m["context_length"]),
            ("embedding length", m["embedding_length"]),
            ("quantization", m["quant"]),
            ("memory", _memory_text(info["memory"])),
        ]
    )
    p = info["projector"]
    if p is not None:
        out.print("  Projector", style="bold", markup=False)
        tokens = p["tokens_per_image"]
        if tokens is not None and p["anyres"]:
            tokens = f"{tokens} per tile (anyres: several tiles + overview)"
        elif tokens is not None and p.get("max_tiles"):  # NVLM-D / InternVL dynamic tiles
            tokens = f"{tokens} per tile (1-{p['max_tiles']} tiles, + a thumbnail when > 1)"
        _kv(
            [
                ("capabilities", _caps(info["capabilities"])),
                ("projector type", p["projector_type"]),
                ("parameters", format_params(p["parameters"])),
                ("image size", p["image_size"]),
                ("tokens per image", tokens if tokens is not None else "depends on the image"),
                ("output width", p["width"]),
                ("quantization", p["quant"]),
            ]
        )
    t = info["template"]
    out.print("  Template", style="bold", markup=False)
    if t["kind"] in ("custom", "gguf"):
        text = str(t["text"] or "")
        first = text.strip().splitlines()[0] if text.strip() else ""
        more = " ..." if len(text.strip().splitlines()) > 1 else ""
        label = "custom" if t["kind"] == "custom" else "from the GGUF"
        _kv([(label, first[:100] + more)])
    elif t["kind"] == "builtin":
        _kv([("built-in", t["name"])])
    else:
        _kv([("none", "the runtime's default for the architecture")])
    if info["parameters"]:
        out.print("  Parameters", style="bold", markup=False)
        _kv([(k, json.dumps(v)) for k, v in info["parameters"].items()])
    out.print("  License", style="bold", markup=False)
    _kv([("license", info["license"] or "unknown")])
    src = info["source"]
    out.print("  Files", style="bold", markup=False)
    rows = []
    for part in (m, p):
        if part is not None:
            digest = str(part["digest"]).removeprefix("sha256:")[:12]
            rows.append((part["file"] or "-", f"{format_bytes(part['size'])}  sha256:{digest}"))
    if m.get("path"):
        rows.append(("stored in", str(Path(m["path"]).parent)))
    if src.get("type") == "hf":
        rows.append(("source", f"hf.co/{src.get('repo')} @ {str(src.get('revision'))[:12]}"))
    elif src.get("type"):
        rows.append(("source", src.get("type")))
    _kv(rows)


# ---------------------------------------------------------------------------- rm / cp
@app.command()
def rm(names: list[str] = typer.Argument(..., help="Models to remove.")) -> None:
    """Remove models; their files are deleted unless another model uses them."""
    from mmchat.store import open_store

    store = open_store()
    missing: list[str] = []
    for name in names:
        try:
            full, _blobs, freed = store.remove(name)
        except NotFoundError:
            missing.append(name)
            continue
        out.print(f"deleted {full} (freed {format_bytes(freed)})", markup=False)
    if missing:
        raise NotFoundError(f"Not in the store: {', '.join(missing)}")


@app.command()
def cp(
    src: str = typer.Argument(..., help="Existing model."),
    dst: str = typer.Argument(..., help="New name."),
) -> None:
    """Copy a model under a new name (the files are shared, not duplicated)."""
    from mmchat.store import open_store

    rec = open_store().copy(src, dst)
    out.print(f"copied to {rec.name}", markup=False)


# ---------------------------------------------------------------------------- create
@app.command()
def create(
    name: str = typer.Argument(..., help="Name for the new model, e.g. my-llava:q4"),
    model: Path = typer.Option(..., "--model", "-m", help="Text model GGUF file."),
    mmproj: Path | None = typer.Option(None, "--mmproj", help="Projector (mmproj) GGUF file."),
    template: Path | None = typer.Option(None, "--template", help="Jinja chat template file."),
    param: list[str] = typer.Option([], "--param", "-p", help="Default parameter key=value."),
    license: str | None = typer.Option(None, "--license", help="License name or text."),
) -> None:
    """Import local GGUF files as a model (validated; the files are copied)."""
    from mmchat.store import open_store, parse_name
    from mmchat.store.params import load_template, parse_params

    mname = parse_name(name)
    params = parse_params(param)
    template_text = load_template(template) if template is not None else None
    rec = open_store().register(
        mname.full,
        model=model.expanduser(),
        mmproj=mmproj.expanduser() if mmproj is not None else None,
        template=template_text,
        params=params,
        license=license,
        link=False,
        source={
            "type": "create",
            "files": {"model": str(model)} | ({"mmproj": str(mmproj)} if mmproj else {}),
        },
    )
    out.print(
        f"created {rec.name} (id {rec.id}, {format_bytes(rec.size)}); "
        f"chat with: mmchat run {rec.name}",
        markup=False,
        soft_wrap=True,
    )
