"""The bad-input catalogue (issue 9, docs/errors.md).

Every user error is one line naming the problem and the fix, exits with code 2 and leaves no
partial output. Cases already tested elsewhere (malformed concept files, config validation,
run-directory locks ...) are listed in docs/errors.md with their tests; this file covers the rest,
mostly end to end through the command line (:func:`medmap.cli.main`) on a tiny saved model.
"""

from __future__ import annotations

import errno
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import medmap
from medmap.batching import is_oom, run_with_backoff
from medmap.cli import main
from medmap.errors import MedmapError
from medmap.model.sites import count_hooks
from oom import oom_above
from tiny import make_hf, tokenizer

PROMPT = "A 47-year-old woman presents with chest pain."
LONG = " ".join(["with chest pain"] * 150)  # far more than the tiny models' 256 positions

MINI = """\
name: mini
version: 1
family: drugs
medical: true
labels:
  cls: {kind: categorical}
templates: ["The patient takes {concept} daily.", "{concept} was prescribed."]
items:
  - id: metformin
    concept: metformin
    labels: {cls: biguanide}
    source: "WHO ATC A10BA02"
    targets: [{id: treats, prompt: "{concept} is used to treat", answers: [" diabetes"]}]
  - id: atorvastatin
    concept: atorvastatin
    labels: {cls: statin}
    source: "WHO ATC C10AA05"
    targets: [{id: treats, prompt: "{concept} is used to treat", answers: [" cholesterol"]}]
  - id: simvastatin
    concept: simvastatin
    labels: {cls: statin}
    source: "WHO ATC C10AA01"
    targets: [{id: treats, prompt: "{concept} is used to treat", answers: [" cholesterol"]}]
"""

# Two of its pairs (47 <-> 80) survive the tiny tokenizer (same token length), so patching runs.
PAIRS = """\
name: ages_mini
version: 1
family: ages
medical: true
labels:
  age: {kind: ordinal}
templates: ["A {concept}-year-old woman presents with chest pain."]
items:
  - {id: a47, concept: "47", labels: {age: 47}, source: s, targets: [{id: dose, prompt: "PROMPT", answers: [" mg"]}]}
  - {id: a80, concept: "80", labels: {age: 80}, source: s, targets: [{id: dose, prompt: "PROMPT", answers: [" units"]}]}
  - {id: a12, concept: "12", labels: {age: 12}, source: s, targets: [{id: dose, prompt: "PROMPT", answers: [" g"]}]}
""".replace("PROMPT", "A {concept}-year-old man takes 100")

NO_TARGETS = """\
name: no_targets
version: 1
family: control
medical: false
control_for: drugs
labels: {}
templates: ["I saw a {concept} yesterday."]
items:
  - {id: dog, concept: dog}
  - {id: cat, concept: cat}
  - {id: cow, concept: cow}
"""


# ---------------------------------------------------------------- helpers and fixtures


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """GGUF conversions and hash memos go to a per-test cache (checked to stay empty)."""
    monkeypatch.setenv("MEDMAP_CACHE", str(tmp_path / "cache"))


def cli_error(argv, capsys) -> str:
    """Run the CLI; assert exit code 2, no traceback and exactly one error line; return it."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def assert_error(argv, capsys, what: str, fix: str, *, absent=()) -> str:
    """:func:`cli_error`, and the line names the problem (``what``) and the fix; nothing left."""
    line = cli_error(argv, capsys)
    assert what in line, line
    assert fix in line, line
    for p in absent:
        assert not p.exists(), f"{p} was left behind: {sorted(p.rglob('*')) if p.is_dir() else ''}"
    return line


def not_cache(path) -> list:
    """Entries of ``path`` other than the per-test cache."""
    return sorted(p.name for p in path.iterdir() if p.name != "cache")


def files_under(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def _save(hf, d):
    hf.save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama (3 blocks, d=64, context 256) saved as a safetensors directory."""
    return _save(make_hf("llama"), tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def overflow_dir(tmp_path_factory):
    """Block 1's MLP writes ~6.5e5 into the residual stream: finite in float32, inf in float16.

    Every weight stays far below float16's maximum (65504), so only the activations overflow.
    """
    hf = make_hf("llama")
    with torch.no_grad():
        mlp = hf.model.layers[1].mlp
        mlp.gate_proj.weight.mul_(100)
        mlp.up_proj.weight.mul_(100)
        mlp.down_proj.weight.mul_(1e4)
    assert max(p.abs().max().item() for p in hf.parameters()) < 1000
    return _save(hf, tmp_path_factory.mktemp("models") / "overflow")


def concept_file(tmp_path, text: str, name: str = "set.yaml", mode: str = "w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


# ---------------------------------------------------------------- models and weights


def _variant(tiny_dir, tmp_path, name="model"):
    d = tmp_path / name
    shutil.copytree(tiny_dir, d)
    return d


def _hub_id(tiny_dir, tmp_path, monkeypatch):
    return "acme/med-7b"  # a hub id in no local cache; tests run offline (HF_HUB_OFFLINE=1)


def _no_weights(tiny_dir, tmp_path, monkeypatch):
    d = _variant(tiny_dir, tmp_path)
    (d / "model.safetensors").unlink()
    return d


def _safetensors_truncated(tiny_dir, tmp_path, monkeypatch):
    d = _variant(tiny_dir, tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


def _safetensors_garbage(tiny_dir, tmp_path, monkeypatch):
    d = _variant(tiny_dir, tmp_path)
    (d / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(200_000))
    return d


def _gguf_header_only(tiny_dir, tmp_path, monkeypatch):
    f = tmp_path / "short.gguf"
    f.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(100))
    return f


def _gguf_garbage(tiny_dir, tmp_path, monkeypatch):
    f = tmp_path / "junk.gguf"
    f.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(100_000))
    return f


def _gguf_cut(tiny_dir, tmp_path, monkeypatch):
    """The real SmolLM2 GGUF cut in half: a valid header whose tensor data ends early."""
    from medmap.model.registry import BUNDLED_MODELS

    m = BUNDLED_MODELS["smollm2-135m"]
    if not m.is_installed():
        pytest.skip("bundled model smollm2-135m is not installed")
    src = m.gguf_path()
    f = tmp_path / "cut.gguf"
    with open(src, "rb") as a, open(f, "wb") as b:
        b.write(a.read(src.stat().st_size // 2))
    return f


def _pickle_only(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    d = _variant(tiny_dir, tmp_path)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def _pickle_file(tiny_dir, tmp_path, monkeypatch):
    return _pickle_only(tiny_dir, tmp_path, monkeypatch) / "pytorch_model.bin"


def _remote_code(tiny_dir, tmp_path, monkeypatch):
    d = _variant(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "acme_medical"
    cfg["auto_map"] = {
        "AutoConfig": "modeling_acme.AcmeConfig",
        "AutoModelForCausalLM": "modeling_acme.AcmeLM",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "REMOTE_CODE_RAN"
    (d / "modeling_acme.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return d


def _no_config(tiny_dir, tmp_path, monkeypatch):
    d = _variant(tiny_dir, tmp_path)
    (d / "config.json").unlink()
    return d


MODEL_CASES = {
    # case: (builder, what, fix)
    "hub_id_not_cached_offline": (
        _hub_id,
        "hub model 'acme/med-7b' is not in the local Hugging Face cache",
        "hf download acme/med-7b",
    ),
    "no_weights": (_no_weights, "holds no weights (*.safetensors)", "save_pretrained()"),
    "safetensors_truncated": (_safetensors_truncated, "cannot load weights of", "re-download"),
    "safetensors_garbage": (_safetensors_garbage, "cannot load weights of", "re-download"),
    "gguf_header_only": (_gguf_header_only, "is truncated (108 bytes)", "re-download"),
    "gguf_garbage": (_gguf_garbage, "cannot read GGUF file", "corrupt, truncated"),
    "gguf_cut_in_half": (_gguf_cut, "cannot read GGUF file", "corrupt, truncated"),
    "pickle_weights_without_opt_in": (
        _pickle_only,
        "holds only pickle weights (pytorch_model.bin), which can run arbitrary code",
        "--allow-pickle",
    ),
    "pickle_file_without_opt_in": (
        _pickle_file,
        "is a pickle checkpoint, which can run arbitrary code",
        "--allow-pickle",
    ),
    "remote_code_without_opt_in": (
        _remote_code,
        "needs code from its repository to load",
        "--trust-remote-code only if you trust that code",
    ),
    "directory_without_config": (_no_config, "has no config.json", "bundled alias"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_or_weights(case, tiny_dir, tmp_path, monkeypatch, capsys):
    builder, what, fix = MODEL_CASES[case]
    spec = builder(tiny_dir, tmp_path, monkeypatch)
    out = tmp_path / "out"
    argv = ["capture", "-m", spec, "--out", out, "-p", PROMPT]
    assert_error(argv, capsys, what, fix, absent=[out])
    assert not (tmp_path / "REMOTE_CODE_RAN").exists()  # remote code never ran
    assert files_under(tmp_path / "cache" / "gguf") == []  # nothing half-converted


def test_bad_dtype(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["capture", "-m", tiny_dir, "--out", out, "-p", PROMPT, "--dtype", "float13"]
    assert_error(argv, capsys, "unknown dtype 'float13'", "use one of bf16, bfloat16", absent=[out])
    argv = ["lesion", "-m", tiny_dir, "-c", "ages", "--out", out, "--dtype", "fp8"]
    assert_error(argv, capsys, "unknown dtype 'fp8'", "use one of", absent=[out])
    argv = ["map", "-m", tiny_dir, "--out", out, "--dtype", "float13"]
    assert_error(argv, capsys, "'dtype': Input should be", "docs/config.md", absent=[out])


# ---------------------------------------------------------------- medmap map leaves nothing


@pytest.mark.parametrize(
    ("extra", "what", "fix"),
    [
        (["--config", "BAD_TOML"], "'modle': unknown key", "docs/config.md"),
        (["--max-items", "many"], "Invalid value for '--max-items'", "see `medmap map --help`"),
        (["--techniques", "umap,xray"], "'techniques.1': Input should be", "docs/config.md"),
        (["--model", "llama-9000"], "unknown model 'llama-9000'", "bundled aliases:"),
        (["--concepts", "nonsense"], "unknown concept set 'nonsense'", "bundled sets:"),
        (["--model", "CORRUPT"], "cannot load weights of", "re-download or re-convert"),
        (["--concepts", "NO_TARGETS"], "has no targets", "items with `targets:`"),
        (
            ["--concepts", "TWO_ITEMS", "--techniques", "umap"],
            "has 2 items; representation",
            "add items",
        ),
    ],
    ids=[
        "config-unknown-key",
        "option-wrong-type",
        "unknown-technique",
        "unknown-model",
        "unknown-concept-set",
        "corrupt-weights",
        "set-without-targets",
        "too-few-items",
    ],
)
def test_map_fails_before_creating_the_run_directory(extra, what, fix, tiny_dir, tmp_path, capsys):
    """A failed start leaves no run directory (else the fixed command is refused as a new config)."""
    bad = concept_file(tmp_path, 'modle = "smollm2-135m"\n', "bad.toml")
    corrupt = _safetensors_truncated(tiny_dir, tmp_path, None)
    no_targets = concept_file(tmp_path, NO_TARGETS, "no_targets.yaml")
    two = concept_file(tmp_path, MINI.split("  - id: simvastatin")[0], "two.yaml")
    subst = {"BAD_TOML": bad, "CORRUPT": corrupt, "NO_TARGETS": no_targets, "TWO_ITEMS": two}
    out = tmp_path / "run"
    argv = ["map", "--out", out, "--model", tiny_dir, "--concepts", "ages", "--no-report"]
    argv += [subst.get(a, a) for a in extra]
    if "--techniques" not in extra:
        argv += ["--techniques", "lesion"]
    assert_error(argv, capsys, what, fix, absent=[out])


# ---------------------------------------------------------------- concept files in a run


CONCEPT_CASES = {
    # case: (file name, content, what, fix)
    "wrong_columns": ("c.csv", "id,concept,colour\nx,y,z\n", "row 1: unknown column 'colour'", "allowed: id, concept"),
    "bad_encoding": ("c.csv", "id,concept\nx,caf\xe9\n".encode("latin-1"), "line 2: not UTF-8 text", "save the file as UTF-8"),
    "empty_row": ("c.csv", "id,concept,template\n,,A {concept}.\nx,y,\n,,\n", "row 4 is empty", "delete empty rows"),
    "duplicate_item": ("c.yaml", MINI.replace("id: simvastatin", "id: atorvastatin"), "line 19: item 3 ('atorvastatin'): duplicate item id", "give every item its own id"),
    "template_without_marker": ("c.yaml", MINI.replace("{concept} was prescribed.", "It was prescribed."), "template 'It was prescribed.' must contain the concept marker {concept} exactly once", "docs/concept-format.md"),
    "target_without_marker": ("c.yaml", MINI.replace('prompt: "{concept} is used to treat", answers: [" diabetes"]', 'prompt: "It treats", answers: [" diabetes"]'), "target 'treats': template 'It treats' must contain the concept marker", "docs/concept-format.md"),
    "target_without_answers": ("c.yaml", MINI.replace('[" diabetes"]', "[]"), "line 9: field 'targets.0.answers'", "docs/concept-format.md"),
    "empty_concept_set": ("c.yaml", MINI.split("items:")[0] + "items: []\n", "the concept set has no items", "add items"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONCEPT_CASES))
def test_bad_concept_file_in_a_run(case, tiny_dir, tmp_path, capsys):
    """The malformed files of tests/test_concepts_core.py, fed to run commands: exit 2, no output."""
    name, content, what, fix = CONCEPT_CASES[case]
    p = concept_file(tmp_path, content, name, mode="wb" if isinstance(content, bytes) else "w")
    for cmd in ("lesion", "map"):
        out = tmp_path / f"out-{cmd}"
        argv = [cmd, "-m", tiny_dir, "--concepts", p, "--out", out]
        line = cli_error(argv + (["--no-report"] if cmd == "map" else []), capsys)
        assert what in line and fix in line and str(p) in line, line
        assert not out.exists()


def test_stage_order_broken_in_a_run(tiny_dir, tmp_path, capsys):
    text = """\
name: prog
version: 1
family: progression
medical: true
labels: {series: {kind: categorical}, stage: {kind: ordinal}}
templates: ["The patient has {concept}."]
items:
  - {id: a1, concept: "stage 1 x", labels: {series: x, stage: 1}, source: s}
  - {id: a3, concept: "stage 3 x", labels: {series: x, stage: 3}, source: s}
  - {id: a2, concept: "stage 2 x", labels: {series: x, stage: 2}, source: s}
"""
    p = concept_file(tmp_path, text, "prog.yaml")
    out = tmp_path / "out"
    argv = ["umap", "-m", tiny_dir, "-c", p, "--out", out]
    assert_error(argv, capsys, "line 10: ", "stage order broken in series 'x'", absent=[out])


def test_causal_technique_on_a_set_without_targets(tiny_dir, tmp_path, capsys):
    p = concept_file(tmp_path, NO_TARGETS, "nt.yaml")
    for cmd in ("lesion", "saliency"):
        out = tmp_path / cmd
        argv = [cmd, "-m", tiny_dir, "-c", p, "--out", out]
        assert_error(
            argv,
            capsys,
            "concept set 'no_targets' has no targets",
            "need items with `targets:`",
            absent=[out],
        )


# ---------------------------------------------------------------- prompts and positions


@pytest.mark.parametrize("cmd", ["capture", "umap", "lesion", "saliency", "patch"])
def test_prompt_longer_than_the_model_context(cmd, tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    if cmd == "capture":
        argv = ["capture", "-m", tiny_dir, "--out", out, "-p", PROMPT, "-p", PROMPT + LONG]
    else:
        text = MINI if cmd != "patch" else PAIRS
        # templates for umap, target prompts for the causal techniques
        text = text.replace(" daily.", " daily " + LONG + ".").replace(
            " is used to treat", " is used " + LONG + " to treat"
        )
        text = text.replace("takes 100", LONG + " takes 100")
        argv = [cmd, "-m", tiny_dir, "-c", concept_file(tmp_path, text), "--out", out]
    assert_error(
        argv,
        capsys,
        "longer than the model context of 256",
        "shorten the prompt or use a model with a longer context",
        absent=[out],
    )


def test_no_counterfactual_pair_survives_tokenization(tiny_dir, tmp_path, capsys):
    # metformin / atorvastatin / simvastatin tokenize to different lengths: no pair is kept
    out = tmp_path / "out"
    argv = ["patch", "-m", tiny_dir, "-c", concept_file(tmp_path, MINI), "--out", out]
    assert_error(
        argv,
        capsys,
        "concept set 'mini' yields no counterfactual pairs",
        "equal token length",
        absent=[out],
    )


@pytest.mark.parametrize(
    ("argv", "what", "fix"),
    [
        (
            ["capture", "--position", "first", "-p", PROMPT],
            "unknown position 'first'",
            "use last or mean",
        ),
        (
            ["patch", "-c", "PAIRS", "--positions", "last,first"],
            "unknown patch position 'first'",
            "use --positions with one or more of last, concept, all",
        ),
        (
            ["patch", "-c", "PAIRS", "--direction", "sideways"],
            "unknown direction 'sideways'",
            "use denoise or noise",
        ),
        (
            ["umap", "-c", "PAIRS", "--position", "middle"],
            "unknown position 'middle'",
            "use concept or last",
        ),
        (
            ["capture", "--layers", "0,2,99", "-p", PROMPT],
            "layer index 99 is out of range",
            "this model has residual layers 0..3",
        ),
        (
            ["capture", "--layers", "1,x", "-p", PROMPT],
            "--layers must be comma-separated integers",
            "e.g. --layers 0,6,12",
        ),
        (["lesion", "-c", "PAIRS", "--window", "7"], "lesion window 7 is invalid", "use 1..3"),
        (
            ["capture", "--prompts-file", "MISSING"],
            "does not exist",
            "give --prompts-file a text file",
        ),
        (
            ["capture", "--prompts-file", "LATIN1"],
            "is not UTF-8 text (byte 3)",
            "save the file as UTF-8",
        ),
        (["capture"], "no prompts given", "pass --prompt TEXT"),
    ],
    ids=[
        "capture-position",
        "patch-position",
        "patch-direction",
        "umap-position",
        "layer-out-of-range",
        "layers-not-integers",
        "lesion-window",
        "prompts-file-missing",
        "prompts-file-encoding",
        "no-prompts",
    ],
)
def test_bad_option(argv, what, fix, tiny_dir, tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    subst = {
        "PAIRS": concept_file(tmp_path, PAIRS, "pairs.yaml"),
        "MISSING": tmp_path / "missing.txt",
        "LATIN1": latin,
    }
    out = tmp_path / "out"
    argv = [argv[0], "-m", tiny_dir, "--out", out] + [subst.get(a, a) for a in argv[1:]]
    assert_error(argv, capsys, what, fix, absent=[out])


def test_out_already_holds_a_store(tiny_dir, tmp_path, capsys):
    out = tmp_path / "store"
    assert main(["capture", "-m", str(tiny_dir), "--out", str(out), "-p", PROMPT]) == 0
    before = {p: p.read_bytes() for p in files_under(out)}
    argv = ["capture", "-m", tiny_dir, "--out", out, "-p", "Another prompt."]
    assert_error(argv, capsys, "already holds an activation store", "choose another --out")
    assert {p: p.read_bytes() for p in files_under(out)} == before  # untouched


# ---------------------------------------------------------------- NaN / inf activations


def test_overflow_model_is_finite_in_float32(overflow_dir):
    m = medmap.load_model(overflow_dir)
    acts = medmap.capture(m, [PROMPT])
    assert np.isfinite(acts).all() and np.abs(acts[:, 2]).max() > 65504  # > float16's max


@pytest.mark.parametrize("cmd", ["capture", "lesion", "saliency", "patch"])
def test_float16_overflow_is_reported_with_the_layer(cmd, overflow_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [cmd, "-m", overflow_dir, "--out", out, "--dtype", "float16"]
    argv += ["-p", PROMPT] if cmd == "capture" else ["-c", concept_file(tmp_path, PAIRS)]
    assert_error(
        argv,
        capsys,
        "non-finite activations (NaN/inf) at layer 2",
        "load the model with dtype=bfloat16 or float32",
        absent=[out],
    )


# ---------------------------------------------------------------- out of memory


def test_backoff_halves_the_batch_and_keeps_order():
    seen, fails = [], []

    def process(sl):
        if sl.stop - sl.start > 3:
            fails.append((sl.start, sl.stop))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append((sl.start, sl.stop))

    shrinks = []
    size = run_with_backoff(process, 10, 16, on_shrink=lambda a, b: shrinks.append((a, b)))
    assert size == 2 and shrinks == [(16, 5), (5, 2)]
    assert fails == [(0, 10), (0, 5)]
    assert seen == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]  # every row once, in order


def test_backoff_gives_a_clear_message_at_batch_one():
    def process(sl):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    with pytest.raises(MedmapError, match=r"out of memory with a batch of 1 prompt \(prompt 0\)"):
        run_with_backoff(process, 4, 4, what="prompt", on_shrink=lambda a, b: None)


def test_backoff_leaves_other_errors_alone():
    def process(sl):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_backoff(process, 4, 4)
    assert is_oom(torch.OutOfMemoryError("x")) and is_oom(MemoryError())
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_oom(RuntimeError("expected scalar type Float"))


def test_capture_retries_smaller_batches_with_identical_results(tmp_path, monkeypatch):
    from tiny import make_tiny

    prompts = [PROMPT, "Metformin is a first-line treatment for", "Hi", "An 80-year-old man."] * 3
    m = make_tiny("llama")
    ref2 = medmap.capture(m, prompts, batch_size=2)
    ref8 = medmap.capture(m, prompts, batch_size=8)
    hooks = count_hooks(m.hf)
    calls = oom_above(m, 2, monkeypatch)
    got = medmap.capture(m, prompts, batch_size=8, out=tmp_path / "store")
    assert calls[:3] == [8, 4, 2] and set(calls[3:]) == {2}
    np.testing.assert_array_equal(np.asarray(got), ref2)  # the same batches: bit-identical
    np.testing.assert_allclose(np.asarray(got), ref8, atol=1e-5, rtol=0)
    assert count_hooks(m.hf) == hooks  # failed attempts left no hook behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_capture_out_of_memory_at_batch_one(tiny_dir, tmp_path, monkeypatch, capsys):
    from transformers.models.llama.modeling_llama import LlamaModel

    def forward(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LlamaModel, "forward", forward)
    out = tmp_path / "out"
    argv = ["capture", "-m", tiny_dir, "--out", out, "-p", PROMPT, "-p", "Hi", "--batch-size", "2"]
    assert_error(
        argv,
        capsys,
        "out of memory with a batch of 1 prompt (prompt 0)",
        "load the model in bfloat16 (--dtype bfloat16), shard it",
        absent=[out],
    )
    assert not_cache(tmp_path) == []  # no temporary store left


# ---------------------------------------------------------------- disk full


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_results(tiny_dir, tmp_path, monkeypatch, capsys):
    real = pd.DataFrame.to_parquet

    def half_written(self, path, *a, **k):
        real(self.head(1), path, *a, **k)  # a partial file is on disk when the disk fills up
        _enospc()

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_written)
    out = tmp_path / "out"
    argv = ["lesion", "-m", tiny_dir, "-c", concept_file(tmp_path, MINI), "--out", out]
    assert_error(argv, capsys, "disk full while writing", "free space on that disk")
    assert files_under(out) == []  # the temporary file was removed


def test_disk_full_while_allocating_the_store(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("os.posix_fallocate", _enospc, raising=False)
    out = tmp_path / "out"
    argv = ["capture", "-m", tiny_dir, "--out", out, "-p", PROMPT]
    line = assert_error(argv, capsys, "disk full while writing", "free space", absent=[out])
    assert "activations.npy" in line
    assert not_cache(tmp_path) == []  # no temporary store left


def test_disk_full_while_writing_json(tmp_path, monkeypatch):
    from medmap.run.rundir import write_json_atomic

    monkeypatch.setattr(json, "dump", _enospc)
    with pytest.raises(MedmapError, match=r"disk full while writing .*config\.json") as e:
        write_json_atomic(tmp_path / "config.json", {"a": 1})
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- output directory


@pytest.mark.parametrize("cmd", ["capture", "umap", "saliency", "lesion", "patch", "map"])
def test_output_directory_not_writable(cmd, tiny_dir, tmp_path, monkeypatch, capsys):
    """--out under a regular file (tests run as root, so chmod alone would not stop a write)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = [cmd, "-m", tiny_dir, "--out", afile / "sub"]
    argv += ["-p", PROMPT] if cmd == "capture" else ["--concepts", concept_file(tmp_path, PAIRS)]
    assert_error(
        argv, capsys, f"{afile} is a file, not a directory", "choose --out under a directory"
    )
    assert_error(
        argv[:4] + [afile] + argv[5:], capsys, "is a file, not a directory", "give --out a"
    )
    assert afile.read_text() == "x"
    # permission bits (what chmod 500 does for a normal user)
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr("medmap.run.outputs._writable", lambda d: False)
    argv[4] = ro / "run"
    assert_error(argv, capsys, "is not writable (permission denied", "choose --out in a directory")
    assert list(ro.iterdir()) == []


def _cli_under_oom(cmd: str, module: str, attr: str, monkeypatch, capsys, tmp_path):
    """Run ``medmap CMD`` on a tiny model with ``module.attr`` raising CUDA-style OOM."""
    import importlib

    mod = importlib.import_module(module)  # the package re-exports functions of these names

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(mod, attr, boom)
    d = tmp_path / "m"
    make_hf("llama").save_pretrained(d)
    tokenizer().save_pretrained(d)
    capsys.readouterr()  # drop save_pretrained's progress output
    out = tmp_path / "out"
    code = main([cmd, "--model", str(d), "--concepts", "progression", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert not (out / "results.parquet").exists()
    return lines[0], out


def test_out_of_memory_in_saliency_names_the_item(monkeypatch, capsys, tmp_path):
    """saliency computes one item per pass: no batch to shrink, a one-line error naming it."""
    line, _ = _cli_under_oom(
        "saliency", "medmap.techniques.saliency", "item_loss", monkeypatch, capsys, tmp_path
    )
    assert "out of memory (OutOfMemoryError) in the backward pass of saliency item 0" in line
    assert "--dtype bfloat16" in line and "--device-map auto" in line


def test_out_of_memory_in_lesion_backs_off_to_one_item(monkeypatch, capsys, tmp_path):
    """lesion halves its batch down to one item before it gives up (with a one-line error)."""
    line, out = _cli_under_oom(
        "lesion", "medmap.techniques.lesioning", "_lesion_chunk", monkeypatch, capsys, tmp_path
    )
    assert "out of memory with a batch of 1 item (item 0)" in line
    assert "--dtype bfloat16" in line
    assert list(out.rglob("lesion-*.parquet")) == []  # no cell from the failed attempts


def test_out_of_memory_elsewhere_is_one_line(monkeypatch, capsys, tmp_path):
    """A stage without its own handling (here the representation scores) still gets one line."""
    line, _ = _cli_under_oom(
        "umap", "medmap.techniques.representation.api", "_layer_rows", monkeypatch, capsys, tmp_path
    )
    assert "out of memory (OutOfMemoryError) (lower --batch-size" in line
