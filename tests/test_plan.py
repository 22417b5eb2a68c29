"""``medmap plan``: shapes, parameter counts, memory, GPUs, time model, CLI errors, docs, benchmark."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from medmap.cli import main
from medmap.errors import MedmapError
from medmap.run import plan as P
from medmap.run.config import build_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "paper"
CONFIGS = sorted(p for p in PAPER.glob("*.toml") if p.name != "sweep.toml")
# The issue's list of the paper's models (issue 18 item 1) plus the existing 8B config.
PAPER_MODELS = {
    "meta-llama/Llama-3.3-70B-Instruct",
    "google/gemma-3-27b-it",
    "google/medgemma-27b-text-it",
    "Qwen/Qwen2.5-32B-Instruct",
    "Qwen/Qwen3-32B",
    "openai/gpt-oss-120b",
    "aaditya/Llama3-OpenBioLLM-70B",
    "axiong/PMC_LLaMA_13B",
    "wanglab/ClinicalCamel-70B",
    "Writer/Palmyra-Med-70B-32K",
    "epfl-llm/meditron-70b",
    "FreedomIntelligence/HuatuoGPT-o1-70B",
    "meta-llama/Llama-3.1-8B-Instruct",
}
SIGLIP_SO400M_896 = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
    vision_use_head=False,
)


def hf_config(shape: P.ModelShape):
    """The transformers config of a table entry (Gemma-3-27B-it: with its SigLIP tower)."""
    from transformers import AutoConfig

    kw = dict(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tie_embeddings,
    )
    if shape.is_moe:
        kw.update(num_local_experts=shape.experts, num_experts_per_tok=shape.experts_per_token)
    if shape.extra_params:
        return AutoConfig.for_model("gemma3", text_config=kw, vision_config=SIGLIP_SO400M_896)
    return AutoConfig.for_model(shape.architecture, **kw)


def meta_numel(cfg) -> int:
    """Parameters of the model transformers builds from ``cfg`` (on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    with torch.device("meta"):
        if cfg.model_type == "gemma3":
            model = Gemma3ForConditionalGeneration(cfg)
        else:
            model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(P.shape_table()))
def test_table_param_counts_equal_transformers_and_published(name):
    shape = P.shape_table()[name]
    pc = P.param_count(shape)
    assert pc.total == meta_numel(hf_config(shape)), "shape formula vs transformers' model"
    assert shape.published_params_b and shape.published_source
    assert abs(pc.total / 1e9 / shape.published_params_b - 1) < 0.03, pc.total
    if shape.published_active_b:
        assert abs(pc.active / 1e9 / shape.published_active_b - 1) < 0.03, pc.active


def test_table_has_the_shapes_the_issue_gives():
    t = P.shape_table()
    llama70 = t["meta-llama/Llama-3.3-70B-Instruct"]
    assert (llama70.layers, llama70.hidden, llama70.intermediate, llama70.heads) == (
        80,
        8192,
        28672,
        64,
    )
    assert (llama70.kv_heads, llama70.vocab) == (8, 128256)
    g = t["google/gemma-3-27b-it"]
    assert (g.layers, g.hidden, g.intermediate, g.heads, g.kv_heads, g.head_dim, g.vocab) == (
        62, 5376, 21504, 32, 16, 128, 262208,
    )  # fmt: skip
    q3 = t["Qwen/Qwen3-32B"]
    assert (q3.intermediate, q3.heads, q3.vocab) == (25600, 64, 151936)
    q25 = t["Qwen/Qwen2.5-32B-Instruct"]
    assert (q25.intermediate, q25.heads, q25.vocab) == (27648, 40, 152064)
    oss = t["openai/gpt-oss-120b"]
    assert (oss.layers, oss.hidden, oss.experts, oss.experts_per_token, oss.head_dim) == (
        36, 2880, 128, 4, 64,
    )  # fmt: skip
    assert oss.weight_format == "mxfp4" and oss.vocab == 201088
    pmc = t["axiong/PMC_LLaMA_13B"]
    assert (pmc.layers, pmc.hidden, pmc.intermediate, pmc.kv_heads, pmc.vocab) == (
        40, 5120, 13824, 40, 32000,
    )  # fmt: skip
    for llama2 in ("wanglab/ClinicalCamel-70B", "epfl-llm/meditron-70b"):
        assert t[llama2].vocab in (32000, 32017) and t[llama2].layers == 80
    for llama3 in (
        "aaditya/Llama3-OpenBioLLM-70B",
        "Writer/Palmyra-Med-70B-32K",
        "FreedomIntelligence/HuatuoGPT-o1-70B",
    ):
        assert t[llama3].vocab == 128256 and t[llama3].hidden == 8192


def test_mxfp4_weight_bytes():
    pc = P.param_count(P.shape_table()["openai/gpt-oss-120b"])
    packed, bf16 = P.weight_bytes(pc, "mxfp4"), P.weight_bytes(pc, "bfloat16")
    # experts at 4.25 bits, the rest bf16: the published checkpoint is about 65 GB
    assert 60e9 < packed < 70e9
    assert bf16 == 2 * pc.total and bf16 / packed > 3.5


TINY = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "mistral": {},
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_config_json_of_a_local_dir_counts_like_transformers(tmp_path, arch):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(
        arch, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, **TINY[arch],
    )  # fmt: skip
    cfg.save_pretrained(tmp_path)
    shape = P.model_shape(str(tmp_path))
    assert shape.source.endswith("config.json") and shape.architecture == arch
    assert P.param_count(shape).total == meta_numel(cfg)


def test_multimodal_config_json_counts_the_vision_tower(tmp_path):
    from transformers import AutoConfig

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=320)  # fmt: skip
    vision = dict(SIGLIP_SO400M_896, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56)  # fmt: skip
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision)
    cfg.save_pretrained(tmp_path)
    shape = P.model_shape(str(tmp_path))
    assert shape.extra_params > 0
    assert P.param_count(shape).total == meta_numel(cfg)


def test_unknown_model_and_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(MedmapError, match="knows no shapes for model 'nobody/nothing'"):
        P.model_shape("nobody/nothing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MedmapError, match="lacks the shape key"):
        P.model_shape(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**_llama_dict(), "model_type": "mamba"}))
    with pytest.raises(MedmapError, match="does not know the architecture 'mamba'"):
        P.model_shape(str(tmp_path))
    for bad in ("eighty", "80XB", ""):
        with pytest.raises(MedmapError, match="cannot read the memory size"):
            P.parse_size(bad)
    assert P.parse_size("80GiB") == 80 * 2**30 and P.parse_size("141GB") == 141 * 10**9
    assert P.parse_size("80") == 80 * 2**30


def _llama_dict() -> dict:
    return dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320)  # fmt: skip


def test_technique_work_follows_the_algorithms():
    shape = P.shape_table()["meta-llama/Llama-3.1-8B-Instruct"]
    pc = P.param_count(shape)
    L = shape.layers
    kw = dict(batch_size=8, weight_fmt="bfloat16")
    w = {t: P.technique_work(t, shape, pc, [8], 16.0, **kw) for t in P.TECHNIQUES}
    assert w["umap"].passes == 1
    assert w["lesion"].passes == L + 1  # intact pass + one suffix replay per lesion
    assert w["patching"].passes == L + 3  # clean, corrupt, one replay per residual index 0..L
    assert w["saliency"].passes == 8  # one item per backward
    fwd = 8 * 16 * P.block_flops_per_token(shape, pc, 16.0)
    assert w["umap"].flops == pytest.approx(fwd)
    # the lesion sweep replays on average half the blocks per lesion (prefix reuse)
    assert w["lesion"].flops / fwd == pytest.approx(1 + (L - 1) / 2, rel=0.05)
    patched = P.technique_work("patching", shape, pc, [8], 16.0, positions=3, **kw)
    assert patched.flops > w["patching"].flops  # three stacked positions cost more than two
    # more batches read the weights more often
    assert (
        P.technique_work("umap", shape, pc, [64], 16.0, **kw).bytes_read == 8 * w["umap"].bytes_read
    )


def test_costs_say_what_is_measured_and_what_is_assumed(tmp_path):
    cpu = P.load_costs(device="cpu")
    assert cpu.measured and "measured by benchmarks/gpu.py" in cpu.note
    assert set(cpu.ratio) == set(P.TECHNIQUES) and all(r > 0 for r in cpu.ratio.values())
    data = json.loads(P._costs_path().read_text())
    if not any(r["device"] == "cuda" for r in data["runs"]):
        gpu = P.load_costs(device="cuda")
        assert not gpu.measured and "ASSUMED, not measured" in gpu.note
        assert gpu.flops_per_s == P.ASSUMED_GPU_FLOPS
    given = P.load_costs(device="cuda", tflops=123)
    assert given.flops_per_s == 123e12 and "given on the command line" in given.note
    with pytest.raises(MedmapError, match="does not exist"):
        P.load_costs(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(MedmapError, match="not a benchmarks/gpu.py --json file"):
        P.load_costs(tmp_path / "bad.json")


def test_every_paper_model_has_a_valid_config_with_true_header():
    models = {}
    for path in CONFIGS:
        cfg = build_config(preset_name="full", config_file=path)
        models[cfg.model] = path
        assert cfg.dtype == "bfloat16" and cfg.device_map == "auto"
        shape = P.shape_table()[cfg.model]
        pc = P.param_count(shape)
        head = path.read_text().splitlines()[0]
        params = float(re.search(r"([0-9.]+)B parameters", head).group(1))
        assert params == pytest.approx(pc.total / 1e9, abs=0.051), (path.name, head)
        gb = re.search(r"(?:bf16 weights|MXFP4 experts) ≈ ([0-9.]+) GB", head)
        fmt = "mxfp4" if shape.weight_format == "mxfp4" else "bfloat16"
        assert float(gb.group(1)) == pytest.approx(P.weight_bytes(pc, fmt) / 1e9, abs=0.051), head
    assert set(models) == PAPER_MODELS
    sweep = tomllib.loads((PAPER / "sweep.toml").read_text())
    assert set(sweep["sweep"]["models"]) == PAPER_MODELS


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plans_a_70b_model_on_two_gpus(capsys):
    cfg = PAPER / "llama-3.3-70b-instruct.toml"
    code, out, err = _cli(capsys, cfg, "--preset", "full", "--gpus", "2", "--gpu-mem", "80GiB")
    assert code == 0, err
    assert "70.55 B" in out and "bfloat16 141.1 GB" in out
    assert "GPU 0: embeddings, blocks 0–39; GPU 1: blocks 40–79, norm, lm_head" in out
    for tech in P.TECHNIQUES:
        assert f"| {tech} |" in out
    assert "activation store" in out and "times:" in out


def test_cli_exits_2_with_one_line_when_it_does_not_fit(capsys):
    cfg = PAPER / "llama-3.3-70b-instruct.toml"
    code, out, err = _cli(capsys, cfg, "--preset", "full", "--gpus", "1", "--gpu-mem", "80GiB")
    assert code == 2 and out == ""
    line = err.strip()
    assert "\n" not in line, err
    assert "needs" in line and "more than 1 × 80 GiB hold" in line and "--gpus 2" in line


def test_cli_mxfp4_model_dequantises_only_for_saliency(capsys):
    cfg = PAPER / "gpt-oss-120b.toml"
    code, out, err = _cli(capsys, cfg, "--preset", "full", "--gpus", "4")
    assert code == 0, err
    rows = {r.split("|")[1].strip(): r for r in out.splitlines() if r.startswith("| ")}
    assert "(mxfp4)" in rows["lesion"] and "| 1 |" in rows["lesion"]
    assert "(bfloat16)" in rows["saliency"] and "| 4 |" in rows["saliency"]
    code, out, err = _cli(capsys, cfg, "--preset", "full", "--gpus", "3")
    assert code == 2 and "saliency needs" in err and "--gpus 4" in err


def test_cli_bad_options_are_one_line(capsys, tmp_path):
    cfg = PAPER / "qwen3-32b.toml"
    code, _, err = _cli(capsys, cfg, "--gpu-mem", "lots")
    assert code == 2 and "cannot read the memory size 'lots'" in err
    code, _, err = _cli(capsys, tmp_path / "missing.toml")
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "nobody/nothing"\ndevice_map = "auto"\n')
    code, _, err = _cli(capsys, bad)
    assert code == 2 and "knows no shapes" in err and len(err.strip().splitlines()) == 1


def test_cli_cpu_config_uses_cpu_costs(capsys, tmp_path):
    cfg = tmp_path / "cpu.toml"
    cfg.write_text('model = "smollm2-135m"\n')
    code, out, err = _cli(capsys, cfg, "--preset", "quick")
    assert code == 0, err
    assert "float32" in out and "device map" not in out and "cpu" in out.lower()


def test_schedule_packs_jobs_within_nodes():
    plans = P.plan_configs(
        [PAPER / "llama-3.3-70b-instruct.toml", PAPER / "qwen3-32b.toml"], preset="full"
    )
    for nodes in (1, 2):
        slots = P.schedule(plans, nodes=nodes, gpus_per_node=8)
        # one slot per (model, technique): knows, umap, saliency, lesion, patching, logit_lens
        assert len(slots) == 12 and all(s.node < nodes for s in slots)
        end = max(s.start + s.seconds for s in slots)
        assert end >= sum(s.gpus * s.seconds for s in slots) / (8 * nodes) - 1e-6
        # no GPU runs two jobs at once: at any start time the busy GPUs of a node are <= 8
        for s in slots:
            busy = sum(
                o.gpus
                for o in slots
                if o.node == s.node and o.start <= s.start < o.start + o.seconds
            )
            assert busy <= 8


def test_scaling_doc_is_generated_from_the_planner():
    text = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    m = re.search(r"Generated by `(medmap plan [^`]+)`", text)
    assert m, "docs/scaling.md must say the command that generated it"
    args = m.group(1).split()[2:]
    configs = [ROOT / a for a in args if a.endswith(".toml")]
    assert {build_config(config_file=c).model for c in configs} == PAPER_MODELS
    opt = dict(zip(args[len(configs) :: 2], args[len(configs) + 1 :: 2]))
    nodes = [
        int(v)
        for k, v in zip(args[len(configs) :: 2], args[len(configs) + 1 :: 2])
        if k == "--nodes"
    ]
    plans = P.plan_configs(configs, preset=opt["--preset"], gpus=int(opt["--gpus"]),
                           gpu_mem=P.parse_size(opt["--gpu-mem"]))  # fmt: skip
    assert (
        P.scaling_doc(plans, nodes=nodes, gpus_per_node=int(opt["--gpus"]), command=m.group(1))
        == text
    )


def test_gpu_benchmark_runs_on_cpu_at_reduced_shapes(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--shapes", "reduced",
         "--scale", "64", "--models", "llama-3.1-8b", "--n", "4", "--pairs", "2", "--saliency", "1",
         "--batch-size", "4", "--fit-small", "2", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exactness checks skipped: no CUDA device" in proc.stdout
    data = json.loads(out.read_text())
    run = data["runs"][0]
    assert run["device"] == "cpu" and run["shape"] == "llama-3.1-8b/64" and run["layers"] == 32
    assert set(run["ratio"]) == set(P.TECHNIQUES)
    costs = P.load_costs(out, device="cpu")
    assert costs.measured and costs.flops_per_s == run["flops_per_s"]


def test_gpu_benchmark_exactness_code_runs_against_cpu():
    """The CUDA exactness checks, run against the CPU (no GPU here): identical, bf16 within tolerance."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = gpu.exactness_checks("cpu")
    assert set(out) == {"llama", "gemma3_text", "qwen3"}
    for arch, r in out.items():
        assert r["fp32_ok"] and r["bf16_ok"], (arch, r)
        assert set(r["fp32_max_diff"]) == {"capture", "lesion", "patching", "saliency"}
        assert all(v == 0 for v in r["fp32_max_diff"].values()), r
