"""Benchmark: medmap's four techniques on random-initialised models at real shapes, and exactness.

Two models built from configs (random weights, no download): Llama-3.1-8B (32 blocks, width
4096) and a 70B-width Llama (width 8192, MLP 28672, 64 heads, vocab 128256) with fewer blocks
so that it fits one 141 GB GPU. For each, in bf16 on the GPU, on the same prompts and batches:

* a bare forward (``model.hf(**batch)``, logits at every position) at two sizes (batch 1 and
  ``--batch-size``), from which the planner's throughput ``F`` (FLOP/s) and ``B`` (weight
  bytes/s) are fitted (``t = bytes/B + FLOP/F`` per pass, :mod:`medmap.run.plan`);
* ``medmap.capture`` (all layers), ``medmap.lesion`` (every block), ``medmap.patch`` (every
  residual layer × last/concept/all) and ``medmap.weight_saliency`` (every parameter);
* items per second of each, its time against a bare forward of the same items, its time
  against the planner's model (the ratio ``medmap plan`` multiplies by), and on CUDA the peak
  allocated memory against the weights.

On CUDA it first checks exactness on tiny random models (llama, gemma3_text, qwen3): CUDA fp32
equal to CPU fp32 within 1e-4 (activations of every layer, lesion ΔNLL, patching logit
differences, saliency shares), and bf16 within ``medmap.compare_precision``'s tolerance. On a
machine without CUDA those checks are skipped with a message.

Without a GPU, ``--shapes reduced`` keeps every model's layer structure (blocks, heads,
kv-heads) and divides the widths and vocabulary by ``--scale``, in float32 on the CPU:

    .venv/bin/python benchmarks/gpu.py --device cpu --shapes reduced --json out.json   # 4 min CPU
    python benchmarks/gpu.py --json gpu.json                                           # on a GPU

Imports only torch, transformers, tokenizers, numpy, pandas and medmap's technique modules (no
pydantic, umap-learn, duckdb or plotly), so it runs on the GPU machine of pitfalls.md item 13.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a bare checkout works too

import medmap  # noqa: E402
from medmap.model.loading import wrap_model  # noqa: E402
from medmap.run import plan as P  # noqa: E402

# Real shapes (Llama-3.1-8B; Llama-3.3-70B widths with --wide-layers blocks).
SHAPES = {
    "llama-3.1-8b": dict(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8),
    "llama-70b-width": dict(layers=40, hidden=8192, intermediate=28672, heads=64, kv_heads=8),
}
VOCAB = 128256
HEAD_DIM = 128

# Clinical facts (prompt, answer) and counterfactual pairs that differ in one word.
FACTS = [
    ("metformin is a first line treatment for", "diabetes"),
    ("atorvastatin is prescribed to lower", "cholesterol"),
    ("insulin is a hormone produced by the", "pancreas"),
    ("aspirin inhibits the enzyme", "cyclooxygenase"),
    ("a heart attack is also called a myocardial", "infarction"),
    ("the kidneys filter waste from the", "blood"),
    ("asthma is a chronic disease of the", "airways"),
    ("levothyroxine is used to treat an underactive", "thyroid"),
    ("warfarin is an oral", "anticoagulant"),
    ("parkinson disease affects the", "brain"),
    ("hypertension means high blood", "pressure"),
    ("the capital of france is", "paris"),
]
DRUGS = [
    ("metformin", "diabetes"),
    ("insulin", "diabetes"),
    ("warfarin", "thrombosis"),
    ("salbutamol", "asthma"),
    ("levothyroxine", "hypothyroidism"),
    ("amoxicillin", "infection"),
    ("omeprazole", "reflux"),
    ("atorvastatin", "cholesterol"),
    ("lisinopril", "hypertension"),
    ("sertraline", "depression"),
]
PAIR_TEMPLATE = "a 63 year old patient who takes {c} every morning is most likely being treated for"
CAPTURE_TEMPLATE = "a {age} year old patient presents to the emergency department with {what}"
COMPLAINTS = ["chest pain", "a productive cough", "slurred speech", "weight loss", "ankle swelling"]


def tokenizer():
    """A word-level fast tokenizer over the benchmark's words (offsets work; pairs keep length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>", "<bos>", "<eos>", "<unk>"}
    texts = [p + " " + a for p, a in FACTS] + [
        PAIR_TEMPLATE.format(c=c) + " " + a for c, a in DRUGS
    ]
    texts += [CAPTURE_TEMPLATE.format(age=a, what=w) for a in range(100) for w in COMPLAINTS]
    for t in texts:
        words.update(t.split())
    vocab = {
        w: i
        for i, w in enumerate(
            ["<pad>", "<bos>", "<eos>", "<unk>"]
            + sorted(words - {"<pad>", "<bos>", "<eos>", "<unk>"})
        )
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def shape_of(name: str, scale: int, layers: int | None) -> P.ModelShape:
    """The planner's shape of a benchmark model; ``scale`` > 1 divides widths and vocabulary."""
    s = dict(SHAPES[name])
    if layers is not None and name == "llama-70b-width":
        s["layers"] = layers
    hd = HEAD_DIM // scale
    return P.ModelShape(
        name=f"{name}" + (f"/{scale}" if scale > 1 else ""),
        architecture="llama",
        layers=s["layers"],
        hidden=s["heads"] * hd,
        intermediate=s["intermediate"] // scale,
        heads=s["heads"],
        kv_heads=s["kv_heads"],
        head_dim=hd,
        vocab=VOCAB // scale,
        tie_embeddings=False,
        source="benchmarks/gpu.py",
    )


def build(shape: P.ModelShape, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-initialised Llama of ``shape`` on ``device`` (initialised there: no CPU copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    hf.requires_grad_(False)
    return wrap_model(hf.eval(), tokenizer(), name=shape.name)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up; also the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_of(fn, device: str) -> int | None:
    """Peak allocated CUDA bytes during one more ``fn()`` (None on CPU, where it is not run)."""
    if not device.startswith("cuda"):
        return None  # no allocator statistics on CPU (and RSS is process-wide)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def workload(n: int, n_pairs: int):
    cap = [CAPTURE_TEMPLATE.format(age=10 + (7 * i) % 90, what=COMPLAINTS[i % 5]) for i in range(n)]
    facts = (FACTS * (n // len(FACTS) + 1))[:n]
    pairs = []
    for i in range(n_pairs):
        (c1, a1), (c2, a2) = DRUGS[i % len(DRUGS)], DRUGS[(i + 3) % len(DRUGS)]
        p1, p2 = PAIR_TEMPLATE.format(c=c1), PAIR_TEMPLATE.format(c=c2)
        start = p1.index(c1)
        pairs.append(
            (p1, p2, " " + a1, " " + a2, ((start, start + len(c1)), (start, start + len(c2))))
        )
    return cap, [p for p, _ in facts], [" " + a for _, a in facts], pairs


def bench_model(shape, args, device, dtype, dtype_name) -> dict:
    """Every timing of one model (see the module docstring); returns the JSON record."""
    t0 = time.perf_counter()
    model = build(shape, device, dtype)
    build_s = time.perf_counter() - t0
    pc = P.param_count(shape)
    wbytes = sum(p.numel() * p.element_size() for p in model.hf.parameters())
    tok = model.tokenizer
    B = args.batch_size
    cap, prompts, targets, pairs = workload(args.n, args.pairs)
    positions = ["last", "concept", "all"]
    n_tok = lambda texts: statistics.mean(len(tok(t)["input_ids"]) for t in texts)  # noqa: E731
    t_cap, t_fact, t_pair = (
        n_tok(cap),
        n_tok([p + t for p, t in zip(prompts, targets)]),
        n_tok([p[0] for p in pairs]),
    )

    def bare(texts, bs):
        def run():
            with torch.inference_mode():
                for i in range(0, len(texts), bs):
                    enc = tok(texts[i : i + bs], return_tensors="pt", padding=True).to(device)
                    model.hf(**enc, use_cache=False)

        return run

    res: dict = {
        "shape": shape.name,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "params": pc.total,
    }
    # throughput fit: batch 1 and batch B over the same capture prompts
    t1, _ = timed(bare(cap[: args.fit_small], 1), device, args.repeats)
    tb, _ = timed(bare(cap, B), device, args.repeats)
    fb = P.block_flops_per_token(shape, pc, t_cap) + P.head_flops_per_token(shape)
    f_small, f_big = args.fit_small * t_cap * fb, len(cap) * t_cap * fb
    p_small, p_big = args.fit_small, math.ceil(len(cap) / B)
    # t = passes * W / Bw + flops / F, two equations
    det = p_small * f_big - p_big * f_small
    inv_bw = (t1 * f_big - tb * f_small) / det / wbytes
    inv_f = (p_small * tb - p_big * t1) / det
    if inv_bw <= 0 or inv_f <= 0:  # noise: attribute all to FLOP, weights at the small-batch rate
        inv_f = tb / f_big
        inv_bw = max(t1 - f_small * inv_f, 1e-9 * t1) / (p_small * wbytes)
    F, Bw = 1 / inv_f, 1 / inv_bw
    res.update(flops_per_s=F, bytes_per_s=Bw, bare_batch1_s=t1, bare_s=tb, build_s=build_s)

    # bare forwards of each technique's own items (the "against a bare forward" baseline)
    fact_texts = [p + t for p, t in zip(prompts, targets)]
    pair_texts = [p[0] for p in pairs]
    sal_texts = fact_texts[: args.saliency]
    base = {  # (function, items, tokens per item, batch size)
        "umap": (bare(cap, B), len(cap), t_cap, B),
        "lesion": (bare(fact_texts, B), len(fact_texts), t_fact, B),
        "saliency": (bare(sal_texts, 1), len(sal_texts), t_fact, 1),
        "patching": (bare(pair_texts, B), len(pair_texts), t_pair, B),
    }

    def bare_model_s(n: int, tokens: float, bs: int) -> float:
        """The planner's time of a bare forward (all weights per pass, logits at every token)."""
        flops = (
            n
            * tokens
            * (P.block_flops_per_token(shape, pc, tokens) + P.head_flops_per_token(shape))
        )
        return math.ceil(n / bs) * wbytes / Bw + flops / F

    sal_p, sal_t = prompts[: args.saliency], targets[: args.saliency]
    runs = {
        "umap": (lambda: medmap.capture(model, cap, batch_size=B), [len(cap)], t_cap, len(cap)),
        "lesion": (lambda: medmap.lesion(model, prompts, targets, batch_size=B), [len(prompts)], t_fact, len(prompts)),
        "patching": (
            lambda: medmap.patch(
                model, [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs],
                [p[3] for p in pairs], positions=positions, batch_size=B, concept_spans=[p[4] for p in pairs],
            ),
            [len(pairs)], t_pair, len(pairs),
        ),
        "saliency": (lambda: medmap.weight_saliency(model, sal_p, sal_t, n_boot=10), [len(sal_p)], t_fact, len(sal_p)),
    }  # fmt: skip
    res["technique"] = {}
    for tech, (fn, counts, tokens, n_items) in runs.items():
        # technique and bare forward interleaved (order alternating) so that load drift on a
        # shared machine hits both alike; the ratios are medians of per-repeat ratios
        bare_fn, bn, bt, bbs = base[tech]
        out = fn()
        bare_fn()
        t_tech, t_bare = [], []
        for r in range(args.repeats):
            for which in ("tech", "bare") if r % 2 == 0 else ("bare", "tech"):
                sync(device)
                t0 = time.perf_counter()
                out = fn() if which == "tech" else (bare_fn() or out)
                sync(device)
                (t_tech if which == "tech" else t_bare).append(time.perf_counter() - t0)
        secs, bare_s = statistics.median(t_tech), statistics.median(t_bare)
        vs_bare = statistics.median(a / b for a, b in zip(t_tech, t_bare))
        work = P.technique_work(
            tech, shape, pc, counts, tokens, batch_size=B, weight_fmt=dtype_name,
            positions=len(positions),
        )  # fmt: skip
        modelled = work.seconds(F, Bw)
        # measured / modelled, with the throughput taken from the adjacent bare forwards
        ratio = vs_bare * bare_model_s(bn, bt, bbs) / modelled
        peak = peak_of(fn, device)
        row = {
            "seconds": secs,
            "items": n_items,
            "items_per_s": n_items / secs,
            "tokens_per_s": n_items * tokens / secs,
            "bare_forward_s": bare_s,
            "vs_bare_forward": vs_bare,
            "modelled_s": modelled,
            "ratio": ratio,
            "repeats": args.repeats,
            "peak_bytes": peak,
            "peak_over_weights": None if peak is None else peak / wbytes,
        }
        if tech == "saliency":
            row["peak_grad_bytes"] = int(out.attrs.get("peak_grad_bytes", 0))
        res["technique"][tech] = row
        print(
            f"  {tech:9s} {secs:8.2f} s  {n_items / secs:8.1f} items/s  {row['tokens_per_s']:9.0f} tok/s  "
            f"x{row['vs_bare_forward']:5.2f} bare forward  x{row['ratio']:5.2f} modelled"
            + (
                ""
                if peak is None
                else f"  peak {peak / 2**30:6.1f} GiB = {row['peak_over_weights']:.2f}x weights"
            ),
            flush=True,
        )
    res["weights_bytes"] = wbytes
    return res


def exactness(device: str) -> dict:
    """Tiny random models: CUDA fp32 == CPU fp32 (1e-4) and bf16 within compare_precision."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        print(
            "exactness checks skipped: no CUDA device (they compare CUDA with CPU; run this on a GPU)"
        )
        return {"skipped": "no CUDA device"}
    return exactness_checks(device)


def exactness_checks(device: str) -> dict:
    """The checks of :func:`exactness` against ``device`` (tests run them with ``"cpu"``)."""
    import numpy as np
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must be fp32 for a 1e-4 comparison
    torch.backends.cudnn.allow_tf32 = False
    out = {}
    cap, prompts, targets, pairs = workload(8, 4)
    for arch in ("llama", "gemma3_text", "qwen3"):
        kw = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            vocab_size=len(tokenizer()), pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )  # fmt: skip
        if arch == "gemma3_text":
            kw["sliding_window"] = 4
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(arch, **kw), attn_implementation="eager"
        )
        ref = wrap_model(hf.eval(), tokenizer(), name=f"tiny-{arch}")
        import copy

        gpu = wrap_model(copy.deepcopy(hf).to(device).eval(), tokenizer(), name=f"tiny-{arch}")
        half = wrap_model(
            copy.deepcopy(hf).to(device, torch.bfloat16).eval(), tokenizer(), name=f"tiny-{arch}"
        )
        diffs = {}
        a, b = medmap.capture(ref, cap), medmap.capture(gpu, cap)
        diffs["capture"] = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
        la, lb = medmap.lesion(ref, prompts, targets), medmap.lesion(gpu, prompts, targets)
        diffs["lesion"] = float((la["delta_nll"] - lb["delta_nll"]).abs().max())
        args = (
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            [p[2] for p in pairs],
            [p[3] for p in pairs],
        )
        spans = [p[4] for p in pairs]
        pa = medmap.patch(ref, *args, positions=["last", "concept"], concept_spans=spans)
        pb = medmap.patch(gpu, *args, positions=["last", "concept"], concept_spans=spans)
        diffs["patching"] = float((pa["logit_diff_patched"] - pb["logit_diff_patched"]).abs().max())
        sa = medmap.weight_saliency(ref, prompts[:4], targets[:4], n_boot=10)
        sb = medmap.weight_saliency(gpu, prompts[:4], targets[:4], n_boot=10)
        diffs["saliency"] = (
            float((sa["value"] - sb["value"]).abs().max()) if "value" in sa else float("nan")
        )
        prec = medmap.compare_precision(ref, half)
        ok32 = all(v <= 1e-4 or math.isnan(v) for v in diffs.values())
        ok16 = bool(prec["ok"].all())
        out[arch] = {"fp32_max_diff": diffs, "fp32_ok": ok32, "bf16_ok": ok16}
        print(
            f"  {arch:12s} CUDA fp32 vs CPU: {diffs} -> {'ok' if ok32 else 'FAIL'}; bf16 compare_precision: {'ok' if ok16 else 'FAIL'}"
        )
    return out


def chars_per_token() -> dict:
    """Characters per token of every bundled concept prompt with each bundled tokenizer."""
    from medmap.concepts import list_concepts, load_concepts
    from medmap.model.loading import load_tokenizer

    texts = []
    for name in list_concepts():
        cs = load_concepts(name)
        texts += [p.text for p in cs.render()] + [t.prompt + t.answers[0] for t in cs.targets()]
    out = {}
    for alias in ("smollm2-135m", "gemma3-270m"):
        tok = load_tokenizer(alias)
        n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        out[alias] = sum(len(t) for t in texts) / n
    return {"chars_per_token": min(out.values()), "by_tokenizer": out, "texts": len(texts)}


def cpu_name() -> str:
    """The CPU's model name and core count (``/proc/cpuinfo`` on Linux)."""
    import os

    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"model name\s*:\s*(.+)", info).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--shapes",
        choices=["real", "reduced"],
        default=None,
        help="default: real on CUDA, reduced on CPU",
    )
    ap.add_argument("--scale", type=int, default=16, help="width divisor for --shapes reduced")
    ap.add_argument("--models", default="llama-3.1-8b,llama-70b-width")
    ap.add_argument("--wide-layers", type=int, default=40, help="blocks of the 70B-width model")
    ap.add_argument(
        "--n", type=int, default=None, help="items per technique (default 128 GPU / 12 CPU)"
    )
    ap.add_argument(
        "--pairs", type=int, default=None, help="patching pairs (default 64 GPU / 6 CPU)"
    )
    ap.add_argument(
        "--saliency", type=int, default=None, help="saliency items (default 16 GPU / 4 CPU)"
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 GPU / 8 CPU")
    ap.add_argument(
        "--fit-small", type=int, default=8, help="batch-1 passes for the throughput fit"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 3 GPU / 2 CPU)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument(
        "--chars-per-token", action="store_true", help="also measure it (CPU, bundled tokenizers)"
    )
    ap.add_argument(
        "--json", type=Path, default=None, help="write the figures (the planner's costs format)"
    )
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(
            "--device cuda but torch.cuda.is_available() is False (use --device cpu --shapes reduced)"
        )
    args.shapes = args.shapes or ("real" if cuda else "reduced")
    scale = args.scale if args.shapes == "reduced" else 1
    args.n = args.n or (128 if cuda else 12)
    args.pairs = args.pairs or (64 if cuda else 6)
    args.saliency = args.saliency or (16 if cuda else 4)
    args.batch_size = args.batch_size or (32 if cuda else 8)
    args.repeats = args.repeats or (3 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = "bfloat16" if cuda else "float32"
    dtype = getattr(torch, dtype_name)
    name = torch.cuda.get_device_name(args.device) if cuda else cpu_name()
    print(
        f"device={args.device} ({name}) dtype={dtype_name} shapes={args.shapes} scale={scale} "
        f"torch={torch.__version__} threads={torch.get_num_threads()}",
        flush=True,
    )
    t_start = time.perf_counter()
    report: dict = {"exactness": {} if args.skip_exactness else exactness(args.device), "runs": []}
    for m in args.models.split(","):
        shape = shape_of(m, scale, args.wide_layers)
        print(
            f"{shape.name}: {shape.layers} blocks, width {shape.hidden}, {P.param_count(shape).total / 1e9:.3f} B params",
            flush=True,
        )
        r = bench_model(shape, args, args.device, dtype, dtype_name)
        gc.collect()  # the model is gone with bench_model's frame: give its memory back
        if cuda:
            torch.cuda.empty_cache()
        r.update(
            device="cuda" if cuda else "cpu",
            device_name=name,
            dtype=dtype_name,
            date=dt.date.today().isoformat(),
            command=" ".join(sys.argv),
            ratio={k: v["ratio"] for k, v in r["technique"].items()},
            peak_over_weights={
                k: v["peak_over_weights"]
                for k, v in r["technique"].items()
                if v["peak_over_weights"]
            },
        )
        report["runs"].append(r)
        print(
            f"  fitted throughput: {r['flops_per_s'] / 1e12:.3g} TFLOP/s, weights read at {r['bytes_per_s'] / 1e9:.3g} GB/s",
            flush=True,
        )
    if args.chars_per_token:
        report.update(chars_per_token())
        print(f"characters per token: {report['by_tokenizer']} on {report['texts']} bundled texts")
    report["wall_s"] = time.perf_counter() - t_start
    print(f"total {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    bad = [
        a
        for a, r in report["exactness"].items()
        if isinstance(r, dict) and not (r["fp32_ok"] and r["bf16_ok"])
    ]
    if bad:
        sys.exit(f"exactness checks FAILED for {', '.join(bad)} (see above)")


if __name__ == "__main__":
    main()
