"""Fault injection for the Ray retry tests, installed in every Ray worker by a setup hook.

``install`` wraps :func:`medmap.run.execute.run_cell` (what the Ray tasks call) in the worker. Before each attempt it appends a
line to ``$MEDMAP_TEST_FAULTS/<stage>-<set>.attempts`` and then acts on the stage's mode in
``$MEDMAP_TEST_FAULTS/plan.json``: ``raise-once`` raises on the first attempt, ``crash-once``
kills the worker process on the first attempt (a system failure, as when a node dies) and
``always`` raises on every attempt. Stages without a mode run normally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class InjectedFault(RuntimeError):
    pass


def install() -> None:
    import medmap.run.execute as execute

    real = execute.run_cell
    root = Path(os.environ["MEDMAP_TEST_FAULTS"])

    def run_cell(config, out, stage, name):
        mode = json.loads((root / "plan.json").read_text()).get(stage)
        log = root / f"{stage}-{name}.attempts"
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        attempt = len(log.read_text().splitlines())
        if mode == "always" or (mode == "raise-once" and attempt == 1):
            raise InjectedFault(f"injected fault in {stage}/{name}, attempt {attempt}")
        if mode == "crash-once" and attempt == 1:
            os._exit(1)
        return real(config, out, stage, name)

    execute.run_cell = run_cell
