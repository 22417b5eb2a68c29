"""``medmap plan``: parameters, memory, GPUs, device map and time of runs, before loading."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def plan_cmd(
    configs: Annotated[
        list[Path] | None, typer.Argument(help="run config TOML file(s)", show_default=False)
    ] = None,
    preset: Annotated[str | None, typer.Option(help="quick | standard | full (as for map)")] = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs (per node)")] = 8,
    gpu_mem: Annotated[str, typer.Option("--gpu-mem", help="memory per GPU, e.g. 80GiB")] = "80GiB",
    nodes: Annotated[
        list[int] | None,
        typer.Option("--nodes", help="schedule all configs on this many nodes (repeatable)"),
    ] = None,
    costs: Annotated[
        Path | None, typer.Option("--costs", help="benchmarks/gpu.py --json file (measured)")
    ] = None,
    tflops: Annotated[
        float | None, typer.Option("--tflops", help="GPU throughput to assume, TFLOP/s")
    ] = None,
    mem_tbps: Annotated[
        float | None, typer.Option("--mem-tbps", help="GPU weight-read speed to assume, TB/s")
    ] = None,
    scaling_doc: Annotated[
        Path | None, typer.Option("--scaling-doc", help="write docs/scaling.md for the configs")
    ] = None,
) -> None:
    """Plan runs: parameters, weight memory, activation store, memory, GPUs and time per technique."""
    from medmap.errors import MedmapError
    from medmap.run import plan as P

    if not configs:
        raise MedmapError(
            "plan needs at least one CONFIG", hint="medmap plan configs/paper/qwen3-32b.toml"
        )
    for c in configs:
        if not c.is_file():
            raise MedmapError(f"config file {c} does not exist", hint="check the path")
    plans = P.plan_configs(
        list(configs),
        preset=preset,
        gpus=gpus,
        gpu_mem=P.parse_size(gpu_mem),
        costs_file=costs,
        tflops=tflops,
        mem_tbps=mem_tbps,
    )
    for p in plans:  # one line and exit code 2 if a config does not fit
        P.check_fits(p)
    if scaling_doc is not None:
        command = " ".join(
            ["medmap plan", *map(str, configs)]
            + ([f"--preset {preset}"] if preset else [])
            + [f"--gpus {gpus} --gpu-mem {gpu_mem}"]
            + [f"--nodes {n}" for n in nodes or []]
            + [f"--scaling-doc {scaling_doc}"]
        )
        text = P.scaling_doc(plans, nodes=list(nodes or [1]), gpus_per_node=gpus, command=command)
        scaling_doc.write_text(text, encoding="utf-8")
        typer.echo(f"wrote {scaling_doc}")
        return
    for p in plans:
        typer.echo(P.plan_text(p))
    if len(plans) > 1 or nodes:
        for n in nodes or [1]:
            slots = P.schedule(plans, nodes=n, gpus_per_node=gpus)
            typer.echo(P.schedule_markdown(plans, slots, nodes=n, gpus_per_node=gpus) + "\n")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
