"""`mmchat convert`: a LLaVA-family Hugging Face checkpoint -> GGUF model + mmproj."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmchat.cli.app import app
from mmchat.console import err, out, print_warning


def _register(result: Any) -> str | None:
    """Register the converted files in the model store when it exists; return its name."""
    try:
        from mmchat.store import open_store
    except ImportError:
        return None
    store = open_store()
    record = store.register(
        result.name,
        model=result.model_path,
        mmproj=result.mmproj_path,
        template=result.chat_template,
        source={"type": "convert", **result.source},
        family=store_family(result.family),
    )
    return str(getattr(record, "name", result.name))


def store_family(converter_family: str) -> str:
    """The family name the store shows for a converter family: every LLaVA layout is
    "llava" (as the registry names it); the others keep their own (blip2, nvlm_d, neva …)."""
    name = converter_family.lower()
    if name.startswith(("llava", "bakllava")):
        return "llava"
    return name


@app.command()
def convert(
    source: str = typer.Argument(
        ..., metavar="SRC", help="Checkpoint folder or Hugging Face repo id (owner/name)."
    ),
    name: str | None = typer.Option(
        None, "--name", "-n", help="Model name (default: the folder or repo name)."
    ),
    quant: str = typer.Option(
        "q4_k_m",
        "--quant",
        "-q",
        help="Language model type: f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 "
        "q4_k_m q4_k_s q4_1 q4_0 q3_k_l q3_k_m q3_k_s q2_k.",
    ),
    vision_quant: str = typer.Option(
        "f16",
        "--vision-quant",
        help="Vision tower + projector type: f32 f16 bf16 q8_0 q6_k q5_k q5_1 q5_0 q4_k "
        "q4_1 q4_0 q3_k q2_k.",
    ),
    outdir: Path = typer.Option(
        Path("."), "--outdir", "-o", help="Folder for the two GGUF files.", file_okay=False
    ),
    vision_tower: Path | None = typer.Option(
        None,
        "--vision-tower",
        help="Local CLIP tower folder for original LLaVA checkpoints (default: the repo "
        "named by mm_vision_tower).",
    ),
    eva: Path | None = typer.Option(
        None,
        "--eva",
        help="Original LAVIS / MiniGPT releases: eva_vit_g.pth when it is not in SRC.",
        dir_okay=False,
    ),
    qformer: Path | None = typer.Option(
        None,
        "--qformer",
        help="MiniGPT-4 (Vicuna): blip2_pretrained_flant5xxl.pth when it is not in SRC.",
        dir_okay=False,
    ),
    llm: Path | None = typer.Option(
        None,
        "--llm",
        help="Original LAVIS / MiniGPT / OpenFlamingo releases: the language model folder "
        "when it is not a sub-folder of SRC.",
        file_okay=False,
    ),
    threads: int | None = typer.Option(
        None, "--threads", "-t", min=1, help="Quantization threads (default: all cores)."
    ),
    register: bool = typer.Option(
        True, "--register/--no-register", help="Add the result to the local model store."
    ),
) -> None:
    """Convert a LLaVA-family checkpoint to GGUF (language model + mmproj), quantizing both."""
    from mmchat.converters import convert as run_convert

    result = run_convert(
        source,
        outdir=outdir,
        name=name,
        quant=quant,
        vision_quant=vision_quant,
        vision_tower=vision_tower,
        progress=err.is_terminal,
        threads=threads,
        files={k: v for k, v in (("eva", eva), ("qformer", qformer), ("llm", llm)) if v},
    )
    out.print(result.summary_table())
    for note in result.notes:
        print_warning(note)
    out.print(f"model:  {result.model_path}", markup=False, soft_wrap=True)
    out.print(f"mmproj: {result.mmproj_path}", markup=False, soft_wrap=True)
    if register:
        registered = _register(result)
        if registered:
            out.print(
                f"registered as {registered}; chat with: mmchat run {registered}", markup=False
            )
