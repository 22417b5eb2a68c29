"""scripts/measure_knows.py: the summary and the docs table it prints (synthetic knows rows)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_knows.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("measure_knows", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(model, cset, known, first, n_candidates=5, n_accepted=1, control=None):
    control = control if control is not None else [False] * len(known)
    n_candidates = pd.Series(n_candidates, index=range(len(known)), dtype=int)
    return pd.DataFrame(
        {
            "model": model,
            "concept_set": cset,
            "known": known,
            "known_norm": known,
            "first_token_known": first,
            "n_candidates": n_candidates,
            "n_accepted": n_accepted,
            "chance": n_accepted / n_candidates,
            "control_known": control,
            "control_n_candidates": n_candidates,
            "control_chance": n_accepted / n_candidates,
        }
    )


def test_summary_and_table(script):
    a = _rows("m1", "ages", [True, True, True, False], [True, False, False, False],
              control=[True, False, False, False])  # fmt: skip
    # one target without a distractor: left out of n/known, but counted in first_token (as the
    # CLI prints it)
    b = _rows("m1", "drugs", [True, False], [True, True], n_candidates=[3, 1], n_accepted=1)
    c = _rows("m2", "ages", [False, False, False, True], [False] * 4)
    s = script.summarise(pd.concat([a, b, c], ignore_index=True))
    r = s.set_index(["model", "concept_set"])
    assert r.loc[("m1", "ages"), "known"] == 0.75
    assert r.loc[("m1", "ages"), "control"] == 0.25
    assert r.loc[("m1", "ages"), "first_token"] == 0.25
    assert r.loc[("m1", "ages"), "n"] == 4
    assert r.loc[("m1", "drugs"), "n"] == 1
    assert r.loc[("m1", "drugs"), "known"] == 1.0
    assert r.loc[("m1", "drugs"), "first_token"] == 1.0
    assert r.loc[("m2", "ages"), "known"] == 0.25
    md = script.markdown(s, ["m1", "m2"], ["ages", "drugs", "years"]).splitlines()
    assert md[0].startswith("| set | n | m1 known |") and "m2 known" in md[0]
    assert len(md) == 4  # header, rule, ages, drugs (years has no rows)
    # 0.75 ± 1.96*sqrt(.75*.25/4) = 42 points; chance 20 %; moved 25 %; first 25 %
    assert md[2] == "| ages | 4 | 75% ± 42 | 20% | 25% | 25% | 25% ± 42 | 20% | 0% | 0% |"
    assert md[3].startswith("| drugs | 1 | 100% ± 0 | 33% |") and md[3].endswith("– | – | – | – |")
