"""Benchmark: representation maps (UMAP + scores + detectors) of every layer, every concept set.

Target: for SmolLM2-135M (31 residual layers) over all bundled concept sets, the analysis
(scores, detectors, UMAP) takes < 5 minutes on 2 cores. Capture (forward passes) is timed
separately. UMAP's numba JIT compilation (~10-20 s, once per process) is done in a warm-up and
reported on its own line.

    .venv/bin/python benchmarks/represent.py                       # real model, all sets
    .venv/bin/python benchmarks/represent.py --sets ages,drugs --max-items 60
    .venv/bin/python benchmarks/represent.py --synthetic           # no model: synthetic arrays

``--synthetic`` times the analysis on random activations of the real shapes (items x templates
x 31 layers x 576 dims) for the sets' sizes, for machines without the concept sets or the model.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _warm_up() -> float:
    from medmap.techniques.representation.embed import embed_layers

    t0 = time.perf_counter()
    z = np.random.default_rng(0).normal(size=(20, 5))
    embed_layers([z])
    return time.perf_counter() - t0


def _synthetic(n_items: int, n_templates: int, n_layers: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    n_classes = 8
    cls = rng.integers(0, n_classes, n_items)
    centers = rng.normal(size=(n_classes, d))
    acts = rng.normal(size=(n_items * n_templates, n_layers + 1, d)).astype(np.float32)
    item_index = np.tile(np.arange(n_items), n_templates)
    acts += np.linspace(0, 2, n_layers + 1)[None, :, None] * centers[cls][item_index][:, None, :]
    labels = {
        "specialty": [f"s{c}" for c in cls],
        "mechanism": [f"m{c}" for c in rng.integers(0, 15, n_items)],
        "age": list(rng.integers(0, 100, n_items)),
    }
    return acts, labels, item_index, np.repeat(np.arange(n_templates), n_items)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sets", default=None, help="comma-separated concept sets (default: all)")
    ap.add_argument("--max-items", type=int, default=None)
    ap.add_argument("--max-templates", type=int, default=None)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--synthetic-sets", type=int, default=8)
    ap.add_argument("--synthetic-items", type=int, default=100)
    ap.add_argument("--synthetic-templates", type=int, default=8)
    args = ap.parse_args()

    from medmap.techniques.representation import analyse_activations

    print(f"umap numba warm-up (JIT): {_warm_up():.1f} s")
    total_analysis = total_capture = 0.0
    if args.synthetic:
        for s in range(args.synthetic_sets):
            acts, labels, item_index, tpl = _synthetic(
                args.synthetic_items, args.synthetic_templates, 30, 576, s
            )
            t0 = time.perf_counter()
            res = analyse_activations(
                acts,
                labels,
                item_index=item_index,
                template_index=tpl,
                n_layers=30,
                concept_set=f"synthetic{s}",
                n_boot=args.n_boot,
                token_counts=np.ones(args.synthetic_items, dtype=int),
            )
            dt = time.perf_counter() - t0
            total_analysis += dt
            print(f"synthetic{s}: {args.synthetic_items} items, {len(res.table)} rows, {dt:.1f} s")
    else:
        import medmap
        from medmap.concepts import list_concepts, load_concepts
        from medmap.techniques.capture import capture
        from medmap.techniques.representation import representation_map
        from medmap.techniques.representation.model import rendered_prompts

        model = medmap.load_model(args.model)
        names = args.sets.split(",") if args.sets else [str(n) for n in list_concepts()]
        for name in names:
            cs = load_concepts(name)
            if args.max_items is not None and len(cs.items) > args.max_items:
                cs = cs.subset(args.max_items, seed=0)
            prompts = rendered_prompts(cs, args.max_templates)
            t0 = time.perf_counter()
            acts = capture(model, [p.text for p in prompts], position=[p.span for p in prompts])
            t1 = time.perf_counter()
            res = representation_map(
                model,
                cs,
                activations=acts,
                max_templates=args.max_templates,
                n_boot=args.n_boot,
                progress=False,
            )
            t2 = time.perf_counter()
            total_capture += t1 - t0
            total_analysis += t2 - t1
            print(
                f"{name}: {len(cs.items)} items, {len(prompts)} prompts, capture {t1 - t0:.1f} s, "
                f"analysis {t2 - t1:.1f} s, {len(res.table)} rows"
            )
        print(f"capture total: {total_capture:.1f} s")
    verdict = "OK" if total_analysis < 300 else "OVER the 5-minute target"
    print(f"analysis total (scores + detectors + UMAP): {total_analysis:.1f} s ({verdict})")


if __name__ == "__main__":
    main()
