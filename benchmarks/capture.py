"""Benchmark: all-layer last-token capture of 128 clinical prompts on a bundled model.

Compares, in one process and on the same batches: a bare HF forward (no hooks, logits only),
``output_hidden_states=True``, ``medmap.capture`` and nnsight doing the same capture (if installed).
Reports wall time per method and its ratio to the bare forward (median of ``--repeats`` runs).

    .venv/bin/python benchmarks/capture.py --model smollm2-135m --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import medmap
from medmap.model.tokens import encode

AGES = [3, 8, 15, 24, 37, 45, 52, 61, 68, 74, 83, 91, 29, 57, 66, 79]
COMPLAINTS = [
    "crushing chest pain radiating to the left arm",
    "a productive cough and fever",
    "sudden weakness of the right arm and slurred speech",
    "polyuria, polydipsia and weight loss",
    "a painful swollen first toe joint",
    "progressive memory loss",
    "epigastric pain after meals",
    "shortness of breath and swollen ankles",
]


def prompts(n: int = 128) -> list[str]:
    out = []
    for i in range(n):
        age, c = AGES[i % len(AGES)], COMPLAINTS[(i // len(AGES)) % len(COMPLAINTS)]
        out.append(f"A {age}-year-old patient presents to the emergency department with {c}.")
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model = medmap.load_model(args.model)
    texts = prompts(args.n)
    batches = [
        encode(model.tokenizer, texts[i : i + args.batch_size]).model_inputs()
        for i in range(0, len(texts), args.batch_size)
    ]

    def bare():
        with torch.inference_mode():
            for b in batches:
                model.hf(**b, use_cache=False)

    base_model = getattr(model.hf, model.hf.base_model_prefix)

    def bare_base():
        with torch.inference_mode():
            for b in batches:
                base_model(**b, use_cache=False)

    def hidden_states():
        with torch.inference_mode():
            for b in batches:
                hs = model.hf(**b, use_cache=False, output_hidden_states=True).hidden_states
                idx = b["attention_mask"].sum(-1) - 1
                torch.stack([h[torch.arange(len(idx)), idx] for h in hs], 1)

    def medmap_capture():
        medmap.capture(model, texts, batch_size=args.batch_size)

    results = {
        "bare forward": timed(bare, args.repeats),
        "bare base (no LM head)": timed(bare_base, args.repeats),
        "output_hidden_states": timed(hidden_states, args.repeats),
        "medmap.capture": timed(medmap_capture, args.repeats),
    }
    try:
        from nnsight import NNsight

        nn_model = NNsight(model.hf)

        def nnsight_capture():
            for b in batches:
                idx = b["attention_mask"].sum(-1) - 1
                ar = torch.arange(len(idx))
                # nnsight 0.8 defers the body: collect into a saved list, not a comprehension.
                with nn_model.trace(**b, use_cache=False):
                    saved = list().save()
                    for layer in nn_model.model.layers:
                        saved.append(layer.output[ar, idx])
                torch.stack(list(saved), 1)

        results["nnsight"] = timed(nnsight_capture, args.repeats)
    except ImportError:
        print("nnsight not installed: pip install -c constraints-cpu.txt nnsight")
    base = results["bare forward"]
    print(f"model={args.model} prompts={args.n} batch={args.batch_size} repeats={args.repeats}")
    for name, t in results.items():
        print(f"{name:24s} {t:8.3f} s   ratio vs bare {t / base:5.2f}x")


if __name__ == "__main__":
    main()
