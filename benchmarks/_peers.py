"""Peer libraries for the causal benchmarks: nnsight and TransformerLens on a medmap model.

Each peer gets its own deep copy of the HF model: nnsight replaces every module's ``forward``
with a controller and TransformerLens switches the HF model to ``eager`` attention, and neither change may
leak into the model that medmap and the naive loop run on.
"""

from __future__ import annotations

import copy
import functools
import itertools
import statistics
import time


def nnsight_model(model):
    """``(NNsight wrapper, its block list envoy)`` on a private copy of ``model.hf``, or ``None``."""
    try:
        from nnsight import NNsight
    except ImportError:
        print("nnsight not installed: pip install -c constraints-cpu.txt nnsight")
        return None
    nn_model = NNsight(copy.deepcopy(model.hf))
    blocks = functools.reduce(getattr, model.adapter.blocks_path.split("."), nn_model)
    return nn_model, blocks


def tl_bridge(model):
    """A TransformerLens ``TransformerBridge`` on a private copy of ``model.hf``.

    TransformerLens 4 removed ``HookedTransformer``; ``TransformerBridge.boot_transformers``
    wraps an already-loaded HF model (no hub access with ``hf_model=``) and exposes the usual
    hook points (``blocks.{l}.hook_resid_post``, ``run_with_cache``, ``run_with_hooks``). Its
    attention bridge computes attention itself (explicit scores, softmax, pattern hooks) rather
    than through the HF kernel, so the copy's ``attn_implementation`` does not matter.
    Returns ``(bridge, None)`` or ``(None, reason)``.
    """
    try:
        from transformer_lens import TransformerBridge
    except ImportError as e:
        return None, f"transformer-lens not importable: {e}"
    hf = copy.deepcopy(model.hf)
    try:
        bridge = TransformerBridge.boot_transformers(
            hf.config._name_or_path or model.name,
            hf_model=hf,
            tokenizer=copy.deepcopy(model.tokenizer),
            device="cpu",
        )
    except Exception as e:  # record exactly why the peer is unavailable
        return None, f"transformer-lens {tl_version()}: {type(e).__name__}: {e}"
    bridge.eval()
    return bridge, None


def tl_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("transformer-lens")


def nnsight_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("nnsight")


def rotations(names: list[str]):
    """Method orders that rotate every repeat, so slow-machine drift hits all methods alike."""
    return itertools.cycle([names[i:] + names[:i] for i in range(len(names))])


def median_times(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out
