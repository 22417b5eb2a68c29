"""Command-line options shared by several ``medmap`` commands (typer ``Annotated`` types)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="alias, local dir, .gguf or cached hub id")
]
ConceptsOpt = Annotated[str, typer.Option("--concepts", "-c", help="concept set name or file")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="output directory")]
BootOpt = Annotated[int, typer.Option("--n-boot", min=10, help="bootstrap resamples")]
SeedOpt = Annotated[int, typer.Option("--seed")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="items per forward pass")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32, bfloat16 or float16")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="shard the model over GPUs/CPU with accelerate: auto, balanced or sequential",
    ),
]
