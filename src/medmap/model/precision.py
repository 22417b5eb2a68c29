"""Is a reduced-precision run (bf16/fp16) close enough to float32?

Runs the same prompts through the model in float32 and in the reduced dtype and compares, per
residual layer, the captured activations (cosine similarity and relative L2 error) and the
next-token log-probabilities at the last token (max absolute difference, nats). A run in bf16
is trusted when every layer's mean cosine similarity is at least ``min_cosine`` and the
log-probabilities differ by at most ``max_logprob_diff``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from medmap.techniques.capture import capture

DEFAULT_PROMPTS = (
    "A 47-year-old woman presents with chest pain radiating to the left arm.",
    "Metformin is a first-line treatment for",
    "Stage G3a chronic kidney disease means an eGFR between",
    "The capital of France is",
)


def _last_logprobs(model, prompts: Sequence[str]) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for p in prompts:
            enc = model.tokenizer(p, return_tensors="pt").to(model.input_device)
            logits = model.hf(**enc).logits[0, -1].float()
            out.append(torch.log_softmax(logits, -1).cpu().numpy())
    return np.stack(out)


def compare_precision(
    reference,
    reduced,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    *,
    min_cosine: float = 0.99,
    max_logprob_diff: float = 0.5,
) -> pd.DataFrame:
    """Per residual layer: ``cosine`` (mean over prompts, last token), ``rel_l2``; plus a row
    ``layer = -1`` with ``logprob_max_abs_diff`` over the top-20 reference tokens; column ``ok``.

    ``reference``/``reduced``: the same model loaded as float32 and as bf16/fp16.
    """
    a = capture(reference, list(prompts), position="last").astype(np.float64)
    b = capture(reduced, list(prompts), position="last").astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    rel = np.linalg.norm(a - b, axis=-1) / (np.linalg.norm(a, axis=-1) + 1e-30)
    rows = [
        {
            "layer": layer,
            "cosine": float(cos[:, layer].mean()),
            "rel_l2": float(rel[:, layer].mean()),
            "ok": bool(cos[:, layer].mean() >= min_cosine),
        }
        for layer in range(a.shape[1])
    ]
    la, lb = _last_logprobs(reference, prompts), _last_logprobs(reduced, prompts)
    top = np.argsort(-la, axis=-1)[:, :20]
    diff = float(np.abs(np.take_along_axis(la, top, -1) - np.take_along_axis(lb, top, -1)).max())
    rows.append({"layer": -1, "logprob_max_abs_diff": diff, "ok": bool(diff <= max_logprob_diff)})
    return pd.DataFrame(rows)
