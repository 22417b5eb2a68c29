"""``medmap calibrate`` and ``medmap edit-test``: experiments that test the techniques themselves.

``calibrate`` plants fictional facts into chosen blocks and asks each technique to find them
(:mod:`medmap.experiments.calibrate`); ``edit-test`` unlearns a set's facts in the blocks a
map ranks highest vs random vs lowest-ranked blocks (:mod:`medmap.experiments.edit_test`).
Edits stay in memory; the model on disk is never written.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from medmap.cli.options import BatchOpt, BootOpt, DtypeOpt, ModelOpt, OutOpt, SeedOpt
from medmap.errors import MedmapError

console = Console(stderr=True)


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise MedmapError(
            f"{option} must be comma-separated integers, got {text!r}", hint=f"e.g. {option} 6,12"
        ) from None
    if not out:
        raise MedmapError(f"{option} is empty", hint=f"e.g. {option} 6,12")
    return out


def _words(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def calibrate_cmd(
    model: ModelOpt,
    out: OutOpt,
    blocks: Annotated[
        str, typer.Option(help="comma-separated 0-based blocks to plant into, e.g. 6,12,18,24")
    ],
    facts: Annotated[int, typer.Option("--facts", min=2, help="planted facts per block")] = 8,
    steps: Annotated[int, typer.Option(min=1, help="training steps per edit")] = 20,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate of the edit")] = 1e-3,
    techniques: Annotated[str, typer.Option(help="lesion,saliency,patching")] = (
        "lesion,saliency,patching"
    ),
    sites: Annotated[str, typer.Option(help="mlp,block")] = "mlp,block",
    control_set: Annotated[
        str, typer.Option("--control-set", help="real facts checked for collateral ('' = none)")
    ] = "countries",
    seed: SeedOpt = 0,
    n_boot: BootOpt = 1000,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = None,
) -> None:
    """Plant fictional facts into chosen blocks and score how well each technique finds them."""
    from medmap.experiments.calibrate import CalibrateConfig, calibrate
    from medmap.experiments.report import calibration_section
    from medmap.model.loading import load_model
    from medmap.run.outputs import check_out_dir

    cfg = CalibrateConfig(
        blocks=_ints(blocks, "--blocks"), n_facts=facts, steps=steps, lr=lr,
        techniques=_words(techniques), sites=_words(sites), control_set=control_set or None,
        seed=seed, batch_size=batch_size, n_boot=n_boot,
    )  # fmt: skip
    check_out_dir(out)
    m = load_model(model, dtype=dtype)
    table, summary, checks, _ = calibrate(m, cfg, out, progress=lambda s: console.print(s))
    calibration_section(out, write=True)
    learned = checks["heldout_learned"].round(2).tolist()
    console.print(f"held-out facts learned per planted block {list(cfg.blocks)}: {learned}")
    s = summary[(summary["metric"] == "accuracy_pm1") & (summary["label"] == "null_subtracted")]
    for _, r in s.iterrows():
        console.print(
            f"{r['technique']:<22} {r['site']:<6} ±1 accuracy {r['value']:.2f} "
            f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}] (n={r['n']}, random block {r['baseline']:.2f})"
        )
    console.print(f"[bold green]done[/]: {out}/calibration.parquet")


def edit_test_cmd(
    model: ModelOpt,
    out: OutOpt,
    concepts: Annotated[str, typer.Option("--concepts", "-c", help="set to unlearn")] = "drugs",
    choose: Annotated[str, typer.Option(help="map,random,least")] = "map,random,least",
    k: Annotated[int, typer.Option("--k", min=1, help="blocks edited")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="seeds (fact splits)")] = 3,
    draws: Annotated[int, typer.Option(min=1, help="random draws per seed")] = 5,
    steps: Annotated[int, typer.Option(min=1, help="unlearning steps")] = 20,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam learning rate")] = 1e-4,
    retain_weight: Annotated[float, typer.Option(min=0.0, help="weight of the retain NLL")] = 1.0,
    controls: Annotated[str, typer.Option(help="control sets")] = "countries,animals",
    max_items: Annotated[int, typer.Option("--max-items", min=2, help="items per set")] = 24,
    part: Annotated[str, typer.Option(help="mlp or block: what of each block is trained")] = "mlp",
    seed: SeedOpt = 0,
    n_boot: BootOpt = 1000,
    batch_size: BatchOpt = 8,
    dtype: DtypeOpt = None,
) -> None:
    """Unlearn a set's facts in map-chosen vs random vs lowest-ranked blocks; compare."""
    from medmap.experiments.edit_test import EditTestConfig, edit_test
    from medmap.experiments.report import edit_test_section
    from medmap.model.loading import load_model
    from medmap.run.outputs import check_out_dir

    cfg = EditTestConfig(
        concepts=concepts, choose=_words(choose), k=k, seeds=seeds, draws=draws, steps=steps,
        lr=lr, retain_weight=retain_weight, controls=_words(controls), max_items=max_items,
        part=part, seed=seed, batch_size=batch_size, n_boot=n_boot,
    )  # fmt: skip
    check_out_dir(out)
    m = load_model(model, dtype=dtype)
    _, summary = edit_test(m, cfg, out, progress=lambda s: console.print(s))
    edit_test_section(out, write=True)
    s = summary[summary["metric"] == "selectivity"]
    for _, r in s.iterrows():
        console.print(
            f"{r['label']:<18} selectivity {r['value']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
            f" nats (n={r['n']})"
        )
    console.print(f"[bold green]done[/]: {out}/edit_test.parquet")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
    app.command("edit-test")(edit_test_cmd)
