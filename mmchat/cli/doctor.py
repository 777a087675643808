"""`mmchat doctor`: print the environment report and exit non-zero when unusable."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from mmchat import doctor as doctor_mod
from mmchat.cli.app import app
from mmchat.console import out, print_error
from mmchat.units import format_bytes


@app.command()
def doctor(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    rpc: str | None = typer.Option(
        None, "--rpc", help="RPC workers to probe, HOST:PORT,... Default: MMCHAT_RPC."
    ),
) -> None:
    """Check the installation: versions, compute devices, native library, model store."""
    report = doctor_mod.collect(rpc=rpc)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        out.print(_render(report))
    if not report.ok:
        if not as_json:
            print_error(report.problems[0])
        raise typer.Exit(1)


def _render(report: doctor_mod.DoctorReport) -> Table:
    table = Table(title="mmchat doctor", show_header=False, title_justify="left")
    table.add_column("item", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("mmchat", report.mmchat_version)
    table.add_row("llama-cpp-python", report.llama_cpp_python or "[red]missing[/]")
    ggml = report.ggml_version or "unknown"
    if report.ggml_commit:
        ggml += f" (commit {report.ggml_commit})"
    table.add_row("ggml", ggml)
    table.add_row("Python", report.python)
    table.add_row("platform", report.platform)
    table.add_row("GPU offload", "yes" if report.gpu_offload else "no (CPU only)")
    if report.native_loaded:
        table.add_row("native vision library", f"[green]loaded[/] from {report.native_library}")
    else:
        table.add_row("native vision library", f"[red]not loaded[/]: {report.native_error}")
    for dev in report.devices:
        mem = (
            f"{format_bytes(dev['memory_free'])} free / {format_bytes(dev['memory_total'])}"
            if dev["memory_total"]
            else "memory not reported"
        )
        table.add_row(
            f"device {dev['index']}: {dev['name']}",
            f"{dev['type']} · {dev['backend']} · {dev['description']} · {mem}",
        )
    if report.rpc_available is not None:
        table.add_row(
            "RPC (multi-machine)",
            "available"
            if report.rpc_available
            else "[yellow]not built in[/] "
            "(reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=on)",
        )
    for worker in report.rpc_workers:
        if "error" in worker:
            table.add_row(f"RPC worker {worker['endpoint']}", f"[red]{worker['error']}[/]")
            continue
        for dev in worker["devices"]:
            table.add_row(
                f"RPC worker {worker['endpoint']} device {dev['index']}",
                f"protocol {worker['version']} · {format_bytes(dev['memory_free'])} free / "
                f"{format_bytes(dev['memory_total'])}",
            )
    if report.cpu_extra_buffers:
        table.add_row("CPU extra buffers (AMX, repack)", report.cpu_extra_buffers)
    free = report.store_free_bytes
    free_text = f"{format_bytes(free)} free" if free is not None else "free space unknown"
    table.add_row("model store", f"{report.store_path} ({free_text})")
    status = "[green]usable[/]" if report.ok else "[red]not usable[/]"
    table.add_row("status", status)
    return table
