"""Benchmark: loading a bundled GGUF model the first time (dequantise + cache) and again (cache).

Every load runs in a fresh Python process with an empty (first) or warm (second) private medmap
cache, so nothing is shared through the OS page cache of an earlier in-process load except what
a real second run would also find. Reported per model: the first load, the median of
``--repeats`` second loads (time inside ``medmap.load_model`` with torch and transformers
already imported, i.e. model + tokenizer; and the whole process including those imports), and
the ratio second / first, measured in one run.

    .venv/bin/python benchmarks/load.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, time
t0 = time.perf_counter()
import torch, transformers, medmap
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
m = medmap.load_model({spec!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "dtype": str(m.hf.dtype)}}))
"""


# Where a second load's time goes, timed with plain transformers on the cached directory.
BREAKDOWN = """
import json, time
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
from medmap.model.loading import _load_tokenizer_of, convert_gguf, resolve_spec
logging.disable_progress_bar()
d = convert_gguf(resolve_spec({spec!r}, allow_pickle=False)[1])
t0 = time.perf_counter()
cfg = AutoConfig.from_pretrained(d)
AutoModelForCausalLM._model_mapping[type(cfg)]  # imports the architecture's modeling module
t1 = time.perf_counter()
AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
t2 = time.perf_counter()
_load_tokenizer_of(d, "gguf", False)  # what load_model does: one parse of tokenizer.json
t3 = time.perf_counter()
AutoTokenizer.from_pretrained(d)  # for comparison: transformers' model-specific class
t4 = time.perf_counter()
print(json.dumps({{"import_modeling_s": t1 - t0, "weights_s": t2 - t1, "tokenizer_s": t3 - t2,
                  "auto_tokenizer_s": t4 - t3}}))
"""


def _load_once(spec: str, cache: str, code: str = CHILD) -> dict:
    env = dict(os.environ, MEDMAP_CACHE=cache, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code.format(spec=spec)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("model          first load s   second load s (load_model / whole process)   ratio")
    for spec in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="medmap-load-bench-") as cache:
            first = _load_once(spec, cache)
            seconds = [_load_once(spec, cache) for _ in range(args.repeats)]
            parts = [_load_once(spec, cache, BREAKDOWN) for _ in range(args.repeats)]
        load = statistics.median(s["load_s"] for s in seconds)
        proc = statistics.median(s["process_s"] for s in seconds)
        each = ", ".join(f"{s['load_s']:.2f}" for s in seconds)
        print(
            f"{spec:14s} {first['load_s']:10.1f}   {load:10.2f} / {proc:5.2f}"
            f"   (per repeat {each})   {load / first['load_s']:.3f}x   [{first['dtype']}]"
        )
        med = {k: statistics.median(p[k] for p in parts) for k in parts[0] if k.endswith("_s")}
        print(
            f"{'':14s} second load split (median): import of the modeling module "
            f"{med['import_modeling_s']:.2f} s, weights {med['weights_s']:.2f} s, "
            f"tokenizer {med['tokenizer_s']:.2f} s "
            f"(AutoTokenizer on the same directory: {med['auto_tokenizer_s']:.2f} s)"
        )


if __name__ == "__main__":
    main()
