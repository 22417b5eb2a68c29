"""The technique interface, the run object and the public API (issue 14, items 4–6).

Every registered technique drives through the runner; a single-technique command writes the
same run directory as ``medmap map`` restricted to it; finishing a run does not load the model;
no import cycle; ``from medmap import *``; ``medmap models`` fits 80 columns; one bootstrap.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIG = """\
model = "{model}"
concept_sets = ["progression"]
techniques = ["knows", "umap", "saliency", "lesion", "patching", "logit_lens"]
max_items = 6
max_templates = 1
known_only = false
umap = false
n_boot = 10
saliency_items = 2
max_pairs = 2
batch_size = 8
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(SRC)
    return env


# ---------------------------------------------------------------- registry and runner


def test_registry_names_config_and_merge_order():
    from medmap.errors import ConfigError
    from medmap.run.config import build_config
    from medmap.techniques.base import TECHNIQUES, Technique, technique_names

    assert technique_names() == ["knows", "umap", "saliency", "lesion", "patching", "logit_lens"]
    assert build_config(techniques=technique_names()).techniques == technique_names()
    expected = "Input should be 'knows', 'umap', 'saliency', 'lesion', 'patching' or 'logit_lens'"
    with pytest.raises(ConfigError, match=expected):
        build_config(techniques=["xray"])
    feeds = {name: TECHNIQUES[name].map_rows for name in TECHNIQUES}
    assert feeds == {
        "knows": (),
        "logit_lens": (),
        "umap": ("representation",),
        "saliency": ("saliency",),
        "lesion": ("lesion",),
        "patching": ("patching",),
    }
    assert all(isinstance(TECHNIQUES[n], Technique) for n in TECHNIQUES)


def test_a_registered_technique_runs_through_run_map(tmp_path, monkeypatch):
    """One module + one registration: a new technique is planned, run, resumed and finished."""
    from medmap.analysis.results import make_rows
    from medmap.run import execute
    from medmap.run.config import RunConfig
    from medmap.run.runner import run_map
    from medmap.techniques import base
    from tiny import make_tiny

    class Count(base.Technique):
        name = "count-test"
        title = "counts"
        needs_targets = False
        calls: ClassVar[list[str]] = []

        def run_cell(self, model, cell, ctx):
            self.calls.append(cell.key)
            cs = ctx.load_set(cell.concept_set, self)
            row = {"layer": -1, "technique": "count", "metric": "n_items", "value": len(cs.items)}
            return make_rows([row])

        def finish(self, ctx, frames):
            total = sum(float(f["value"].sum()) for f in frames)
            row = {"model": frames[0]["model"].iloc[0], "layer": -1, "concept_set": "all",
                   "technique": "count", "metric": "total", "value": total}  # fmt: skip
            return make_rows([row])

    model = make_tiny("llama")
    monkeypatch.setattr(execute, "model_for", lambda cfg: model)
    base.register(Count())
    try:
        cfg = RunConfig(techniques=["count-test"], concept_sets=["ages", "years"], max_items=4)
        out = run_map(cfg, tmp_path / "run", report=False)
        t = pd.read_parquet(out / "results.parquet")
        assert list(zip(t["concept_set"], t["metric"], t["value"])) == [
            ("ages", "n_items", 4.0), ("years", "n_items", 4.0), ("all", "total", 8.0)
        ]  # fmt: skip
        run_map(cfg, tmp_path / "run", report=False)  # resumed: every cell is found
        assert Count.calls == ["ages", "years"]
        assert json.loads((out / "manifest.json").read_text())["stages"].keys() == {"count-test"}
    finally:
        base.TECHNIQUES._targets.pop("count-test", None)


def test_register_an_instance_and_unknown_name():
    from medmap.errors import MedmapError
    from medmap.techniques import base

    class Echo(base.Technique):
        name = "echo-test"

    try:
        base.register(Echo())
        assert base.get_technique("echo-test").name == "echo-test"
        assert base.technique_names()[-1] == "echo-test"
    finally:
        base.TECHNIQUES._targets.pop("echo-test", None)
    with pytest.raises(MedmapError, match="unknown technique 'nope'"):
        base.get_technique("nope")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny llama saved to disk, a run config for it, and the map run of every technique."""
    import torch

    from medmap.run.config import build_config
    from medmap.run.runner import run_map
    from tiny import make_hf, tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    make_hf("llama", n_layers=3).save_pretrained(d)
    tokenizer().save_pretrained(d)
    cfg_file = d / "run.toml"
    cfg_file.write_text(CONFIG.format(model=d), encoding="utf-8")
    cfg = build_config(config_file=cfg_file)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run_map(cfg, tmp_path_factory.mktemp("map") / "run", report=False)
    finally:
        torch.set_num_threads(threads)
    return cfg, out


def test_every_registered_technique_drives_through_the_runner(tiny_run):
    from medmap.analysis.results import normalize
    from medmap.techniques.base import TECHNIQUES

    cfg, out = tiny_run
    table = pd.read_parquet(out / "results.parquet")
    kmap = pd.read_parquet(out / "knowledge_map.parquet")
    for name in TECHNIQUES:
        part = out / "parts" / name / "progression.parquet"
        assert part.exists(), name
        rows = pd.read_parquet(part)
        assert len(rows) > 0 and set(rows["concept_set"]) == {"progression"}, name
        for map_row in TECHNIQUES[name].map_rows:  # the map rows it says it feeds exist
            got = kmap[(kmap["map"] == map_row) & (kmap["metric"] == "normalised_effect")]
            assert got["value"].notna().any(), (name, map_row)
    # the table is the parts, merged in registry order
    parts = [pd.read_parquet(out / "parts" / n / "progression.parquet") for n in TECHNIQUES]
    pd.testing.assert_frame_equal(table, normalize(pd.concat(parts, ignore_index=True)))
    assert set(table["technique"]) >= {"probe", "saliency", "lesion", "patching"}
    m = json.loads((out / "manifest.json").read_text())
    info = json.loads((out / "model.json").read_text())
    assert m["n_layers"] == info["n_layers"] == 3 and m["d_model"] == info["d_model"]
    assert (out / "findings.parquet").exists() and not (out / ".lock").exists()


def test_technique_cells_equal_the_direct_function_calls(tiny_run):
    """The interface changes no value: each cell equals the public function it wraps, called
    the way the runner's stage functions called it before the interface existed."""
    from medmap.analysis.results import normalize
    from medmap.concepts import load_concepts
    from medmap.run.execute import model_for
    from medmap.techniques import patch_concepts
    from medmap.techniques.knowledge import Choice, forced_choices
    from medmap.techniques.lesioning import (
        generic_damage,
        lesion,
        lesion_knowledge_summary,
        lesion_margins,
        lesion_summary,
    )

    cfg, out = tiny_run
    model = model_for(cfg)
    full = load_concepts("progression")
    cs = full.subset(cfg.max_items, seed=cfg.seed)
    # distractors come from the whole set, as in the knows stage
    every = list(full.targets())
    real, _, _ = forced_choices(every, max_distractors=cfg.knows_distractors, seed=cfg.seed)
    by_id = {(t.item_id, t.target_id): c for t, c in zip(every, real)}
    # known_only = false: the causal stages score the first accepted answer
    choices = [by_id[(t.item_id, t.target_id)] for t in cs.targets()]
    common = {"n_boot": cfg.n_boot, "seed": cfg.seed}
    targets = list(cs.targets())
    les = lesion_summary(
        lesion(
            model, [t.prompt for t in targets], [c.accepted[0] for c in choices], None,
            cfg.lesion_window, batch_size=8, concept_set=cs.name,
            item_ids=[f"{t.item_id}/{t.target_id}" for t in targets],
        ),
        **common,
    )  # fmt: skip
    margins = lesion_margins(
        model, list(cs.targets()), None, cfg.lesion_window,
        choices=[Choice(c.accepted[:1], c.distractors) for c in choices], batch_size=8,
        concept_set=cs.name, seed=cfg.seed,
        generic=generic_damage(model, None, cfg.lesion_window, max_sentences=cfg.generic_sentences),
    )  # fmt: skip
    direct = {
        # the NLL rows of the scored (first accepted) answer are the plain lesion's; the margin,
        # correctness and fact-specific rows come from the forced-choice candidates
        "lesion": pd.concat([les, lesion_knowledge_summary(margins, **common)], ignore_index=True),
        "patching": patch_concepts(
            model, cs, positions=list(cfg.patch_positions), max_pairs=cfg.max_pairs, **common
        ),
    }

    def part(name):  # the cell without its split-half stability rows (tested elsewhere)
        got = pd.read_parquet(out / "parts" / name / "progression.parquet")
        if name == "lesion":  # 6 items × their targets: split halves exist
            assert (got["technique"] == "stability").any()
        return got[got["technique"] != "stability"].reset_index(drop=True)

    for name, want in direct.items():
        got = part(name)
        want = normalize(want.assign(model=model.name, concept_set=cs.name))
        pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=0, atol=1e-9)
    # saliency keeps the first ``saliency_items`` items of the stratified set
    from medmap.techniques.concept_io import concept_targets
    from medmap.techniques.saliency import saliency_items, saliency_summary

    ct = concept_targets(cs, cfg.saliency_items)
    answers = [choices[ct.ids.index(i)].accepted[0] for i in ct.ids]
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run's process (OMP_NUM_THREADS=1): the same float sums
    try:
        items = saliency_items(model, ct.prompts, answers, concept_set=cs.name, item_ids=ct.ids)
    finally:
        torch.set_num_threads(n_threads)
    want = normalize(saliency_summary(items, **common).assign(model=model.name))
    got = part("saliency")
    assert set(got["objective"]) == {"nll", "margin"}
    got = got[got["objective"] == "nll"].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=0, atol=1e-9)


def test_single_technique_run_equals_the_map_restricted_to_it(tiny_run, tmp_path):
    from medmap.run.runner import run_technique

    cfg, out = tiny_run
    single = run_technique(cfg, tmp_path / "lesion", "lesion")
    assert not (single / ".lock").exists()  # the lock was taken and released
    m = json.loads((single / "manifest.json").read_text())
    assert m["config"]["techniques"] == ["lesion"] and m["n_layers"] == 3
    assert json.loads((single / "config.json").read_text())["techniques"] == ["lesion"]
    got = pd.read_parquet(single / "results.parquet")
    ref = pd.read_parquet(out / "results.parquet")
    # the lesion cell's rows: lesion metrics and its split-half stability rows
    mine = (ref["technique"] == "lesion") | (
        (ref["technique"] == "stability") & (ref["label"] == "lesion")
    )
    ref = ref[mine].dropna(axis=1, how="all").reset_index(drop=True)
    pd.testing.assert_frame_equal(got[ref.columns], ref, check_dtype=False)
    items = pd.read_parquet(single / "items.parquet")
    from medmap.concepts import load_concepts
    from medmap.techniques.concept_io import concept_targets

    subset = load_concepts("progression").subset(6, seed=0)  # max_items: stratified, seeded
    assert sorted(items["item_id"].unique()) == sorted(concept_targets(subset).ids)


def test_single_technique_command_writes_lock_and_manifest(tiny_run, tmp_path, monkeypatch):
    """``medmap lesion`` goes through the runner: it takes the run lock and writes a manifest."""
    import medmap.run.rundir as rundir
    from medmap.cli import main

    cfg, _ = tiny_run
    seen = []
    real_enter = rundir.RunLock.__enter__

    def enter(self):
        seen.append(self.path)
        return real_enter(self)

    monkeypatch.setattr(rundir.RunLock, "__enter__", enter)
    out = tmp_path / "cli"
    argv = ["lesion", "-m", cfg.model, "-c", "progression", "--max-items", "4", "--out", str(out)]
    assert main([*argv, "--n-boot", "10"]) == 0
    assert seen == [out / ".lock"] and not (out / ".lock").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["techniques"] == ["lesion"] and m["config"]["max_items"] == 4
    assert m["rows"] == len(pd.read_parquet(out / "results.parquet")) > 0
    assert set(pd.read_parquet(out / "items.parquet")["item_id"].str.split("/").str[0]) <= {
        it.id for it in __import__("medmap").load_concepts("progression").items
    }


def test_finishing_a_run_does_not_load_the_model(tiny_run, monkeypatch):
    import medmap.model.loading as loading
    import medmap.run.execute as ex
    from medmap.run.execute import plan_cells
    from medmap.run.rundir import Run
    from medmap.run.runner import finish_run

    cfg, out = tiny_run

    def no_load(*a, **k):
        raise AssertionError("finish_run loaded the model")

    monkeypatch.setattr(loading, "load_model", no_load)
    monkeypatch.setattr(ex, "_MODELS", {})  # as on a Ray driver: no model in this process
    before = pd.read_parquet(out / "results.parquet")
    finish_run(cfg, Run(out), plan_cells(cfg), "start", report=False)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), before)
    assert json.loads((out / "manifest.json").read_text())["n_layers"] == 3


def test_failed_new_run_leaves_nothing(tmp_path, monkeypatch):
    """A fresh run whose first cell fails with a user error removes what it wrote."""
    from medmap.errors import MedmapError
    from medmap.run import execute, runner
    from medmap.run.config import RunConfig

    def failing(config, out, stage, name, **kw):
        (Path(out) / "cells" / "x").mkdir(parents=True)
        raise MedmapError("bad input")

    monkeypatch.setattr(runner, "preflight", lambda cfg, load: None)
    monkeypatch.setattr(runner, "run_cell", failing)
    monkeypatch.setattr(execute, "concept_sets_for", lambda cfg: ["ages"])
    out = tmp_path / "new"
    with pytest.raises(MedmapError, match="bad input"):
        runner.run_map(RunConfig(techniques=["lesion"]), out, report=False)
    assert not out.exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("x")
    with pytest.raises(MedmapError):
        runner.run_map(RunConfig(techniques=["lesion"]), keep, report=False)
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]  # only the run's own files
    busy = tmp_path / "busy"  # another live run holds the lock: nothing of it is touched
    busy.mkdir()
    (busy / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(MedmapError, match="being written by another medmap run"):
        runner.run_map(RunConfig(techniques=["lesion"]), busy, report=False)
    assert (busy / ".lock").exists()


# ---------------------------------------------------------------- imports and public API


def _module_level_imports(path: Path) -> set[str]:
    """``medmap.*`` modules imported at module level (not under ``if TYPE_CHECKING``, not
    inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("medmap"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medmap"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []))
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)

    visit(tree.body)
    return out


def _modules() -> dict[str, Path]:
    mods = {}
    for p in (SRC / "medmap").rglob("*.py"):
        rel = p.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Module → the medmap modules it imports at load time. A submodule's import of its own
    package (``from pkg import sibling``) is not an edge: the package is already loading."""
    mods = _modules()

    def edge(m: str, t: str) -> bool:
        return t in mods and t != m and not m.startswith(t + ".")

    return {m: {t for t in _module_level_imports(p) if edge(m, t)} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycle_between_modules():
    graph = _import_graph()
    assert graph["medmap.run.runner"] >= {"medmap.run.execute"}
    assert graph["medmap.run.ray"] >= {"medmap.run.config"}
    cycles = _cycles(graph)
    assert cycles == [], cycles


def test_runner_and_ray_do_not_import_each_other():
    """Not even inside functions in one direction: Ray tasks call run.execute."""
    text = (SRC / "medmap" / "run" / "ray.py").read_text()
    assert "medmap.run.runner" not in text
    runner_top = _module_level_imports(SRC / "medmap" / "run" / "runner.py")
    assert not any(m.startswith("medmap.run.ray") for m in runner_top)


def test_star_import_and_every_public_name_resolves():
    code = (
        "import medmap\n"
        "ns = {}\n"
        "exec('from medmap import *', ns)\n"
        "missing = [n for n in medmap.__all__ if n not in ns]\n"
        "assert not missing, missing\n"
        "assert 'ReplaceBlocks' not in medmap.__all__\n"
        "print(len(medmap.__all__))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) >= 30


def test_public_technique_functions_annotate_model():
    import inspect

    import medmap
    from medmap.techniques.base import TECHNIQUES

    funcs = [type(TECHNIQUES[name]).run_cell for name in TECHNIQUES]
    funcs += [medmap.lesion, medmap.patch, medmap.weight_saliency, medmap.representation_map]
    for f in funcs:  # postponed annotations: the name (imported for type checking only)
        assert inspect.get_annotations(f)["model"] == "MedmapModel", f.__qualname__
    assert medmap.relative_depth(3, 12) == 0.25 and np.isnan(medmap.relative_depth(-1, 12))


def test_models_table_fits_80_columns():
    from medmap.model.registry import BUNDLED_MODELS

    env = dict(_env(), COLUMNS="80", TERM="dumb")
    proc = subprocess.run(
        [sys.executable, "-m", "medmap.cli", "models"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80, "\n".join(lines)
    for alias, m in BUNDLED_MODELS.items():  # nothing is cut: every alias and source whole
        assert any(alias in x for x in lines), alias
        assert any(m.hf_name in x for x in lines), m.hf_name
        assert m.architecture in proc.stdout


# ---------------------------------------------------------------- analysis helpers


def test_two_sample_ci_matches_the_draws_it_replaced():
    from medmap.analysis.maps import _two_sample_ci
    from medmap.analysis.stats import two_sample_ci
    from medmap.techniques.summary import specificity_ci

    rng = np.random.default_rng(5)
    a, b = rng.normal(1.0, 1.0, 9), rng.normal(0.2, 2.0, 6)
    # the former inline code of maps._two_sample_ci and summary.specificity_ci, seed 3
    r = np.random.default_rng(3)
    ia, ib = r.integers(0, 9, size=(200, 9)), r.integers(0, 6, size=(200, 6))
    diff = a[ia].mean(axis=1) - b[ib].mean(axis=1)
    want = np.quantile(diff, [0.025, 0.975])
    ratio = np.array([a[i].mean() / b[j].mean() for i, j in zip(ia, ib)])
    want_ratio = np.nanquantile(ratio, [0.025, 0.975])
    est, lo, hi = two_sample_ci(a, b, n_boot=200, seed=3)
    np.testing.assert_allclose([lo, hi], want, rtol=0, atol=1e-12)
    assert est == pytest.approx(a.mean() - b.mean())
    np.testing.assert_allclose(_two_sample_ci(a, b, 200, 3), want, rtol=0, atol=1e-12)
    _, lo_d, hi_d = specificity_ci(a, b, n_boot=200, seed=3)
    np.testing.assert_allclose([lo_d, hi_d], want, rtol=0, atol=1e-12)
    _, lo_r, hi_r = specificity_ci(a, b, kind="ratio", n_boot=200, seed=3)
    np.testing.assert_allclose([lo_r, hi_r], want_ratio, rtol=0, atol=1e-12)


def test_set_roles_come_from_concept_set_metadata(tmp_path):
    from medmap.analysis.maps import CONTROL_SETS, MEDICAL_SETS, bundled_roles, set_roles
    from medmap.concepts import list_concepts, load_concepts

    assert bundled_roles() == {n: load_concepts(n).medical for n in list_concepts()}
    assert set(MEDICAL_SETS) == {"ages", "symptoms", "diseases", "progression", "drugs", "dosages"}
    assert set(CONTROL_SETS) == {"countries", "animals", "occupations", "years"}
    own = tmp_path / "trivia.yaml"
    own.write_text(
        "name: trivia\nversion: 1\nfamily: custom\nmedical: false\n"
        'labels: {kind: {kind: categorical}}\ntemplates: ["About {concept}."]\n'
        "items:\n"
        "  - {id: a, concept: apples, labels: {kind: x}}\n"
        "  - {id: b, concept: pears, labels: {kind: y}}\n",
        encoding="utf-8",
    )
    roles = set_roles(["ages", str(own), "no-such-set"])
    assert roles == {"medical": ["ages"], "control": ["trivia"]}  # medical: false is a control


def test_specificity_rows_are_marked_by_a_column():
    from medmap.analysis.maps import is_specificity, select_rows
    from medmap.analysis.results import make_rows
    from medmap.techniques.summary import specificity_row

    g = pd.DataFrame({"model": "m", "n_layers": 4, "concept_set": "drugs", "delta_nll": [1.0, 2]})
    c = pd.DataFrame({"model": "m", "n_layers": 4, "concept_set": "animals", "delta_nll": [0.5]})
    spec = specificity_row(
        g, c, layer=2, technique="lesion", metric="delta_nll", kind="difference", n_boot=20, seed=0
    )
    assert spec["control_set"] == "animals" and spec["concept_set"] == "drugs-vs-animals"
    plain = {"model": "m", "layer": 2, "relative_depth": 0.5, "technique": "lesion",
             "metric": "delta_nll", "value": 1.0}  # fmt: skip
    t = make_rows([spec, plain | {"concept_set": "a-vs-b-sounding-name"}])
    assert list(is_specificity(t)) == [True, False]
    assert list(select_rows(t, "lesion")["concept_set"]) == ["a-vs-b-sounding-name"]


def test_knowledge_map_round_trips_through_its_parquet(tmp_path):
    from medmap.analysis.maps import KnowledgeMap, knowledge_map
    from medmap.report.synthetic import synthetic_table

    table = synthetic_table("m12", 12)
    km = knowledge_map(table)
    back = KnowledgeMap.from_tidy(km.tidy())
    for name in km.available():
        pd.testing.assert_frame_equal(back.matrix(name), km.matrix(name))
    pd.testing.assert_frame_equal(
        back.summary.reset_index(drop=True), km.summary.reset_index(drop=True), check_dtype=False
    )
    pd.testing.assert_frame_equal(
        back.contrast.reset_index(drop=True), km.contrast.reset_index(drop=True), check_dtype=False
    )
    assert back.available() == km.available() and len(km.contrast) > 0


def test_one_vocabulary_of_positions():
    from typing import get_args

    from medmap.run.config import RunConfig
    from medmap.techniques.base import POSITIONS
    from medmap.techniques.patching import POSITIONS as PATCH
    from medmap.techniques.representation.model import POSITIONS as REPR

    assert set(PATCH) <= set(POSITIONS) and set(REPR) <= set(POSITIONS)
    assert set(get_args(RunConfig.model_fields["position"].annotation)) == set(REPR)
    patch_pos = RunConfig.model_fields["patch_positions"].annotation
    assert set(get_args(get_args(patch_pos)[0])) == set(PATCH)
