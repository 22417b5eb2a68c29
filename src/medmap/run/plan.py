"""``medmap plan``: parameters, memory, GPUs and time of a run, before anything is loaded.

From a run config and the model's shapes (its ``config.json`` when the model is a local
directory or in the local Hugging Face cache, else the shipped table ``model_shapes.toml``; never
a download) the planner computes:

* parameters (total, active per token for mixture-of-experts models) and weight memory per dtype
  (MXFP4 expert weights counted at 4.25 bits: 4-bit values plus one 8-bit scale per 32);
* the work of each technique under the config: prompts, tokens, forward passes (from the
  bundled concept sets and the config's item budgets);
* device memory per technique: weights (MXFP4 stays packed for the forward-only techniques and
  is dequantised to bf16 for weight saliency, which needs gradients) plus activations, caches
  and live gradients, and from it the GPUs needed and the device map;
* time per technique from a cost model ``t = weight bytes read / B + FLOP / F`` per forward
  pass, where ``F`` (FLOP/s) and ``B`` (bytes/s) are fitted to bare forward passes measured by
  ``benchmarks/gpu.py``, and a per-technique ratio (measured time / modelled time, also from
  ``benchmarks/gpu.py``) covers what the model leaves out (hooks, small kernels, tokenising).

Everything here is an estimate. What is measured and where it was measured is carried in
:class:`Costs` and printed with every plan; numbers that are assumptions (GPU throughput when no
GPU measurement is available, per-GPU memory reserve, characters per token) are labelled so.
Units: bytes, FLOP, seconds, unless a name says otherwise.

This module imports only the standard library at module level (``benchmarks/gpu.py`` uses its
cost model on machines without pydantic); reading a run config imports :mod:`medmap.run.config`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from medmap.errors import MedmapError

GIB = 1024**3
GB = 1e9
TECHNIQUES = ("umap", "saliency", "lesion", "patching")
#: Bits per MXFP4 weight: a 4-bit value plus an 8-bit shared scale per block of 32.
MXFP4_BITS = 4.25
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Assumed, not measured: device memory per GPU that weights and activations cannot use (CUDA
#: context, cuBLAS workspace, allocator fragmentation).
GPU_RESERVE = 2 * GIB
#: Assumed GPU throughput when the costs file holds no CUDA measurement (H100-class, bf16):
#: dense bf16 peak is ~990 TFLOP/s and HBM3 3.35 TB/s; these are ~40 % and ~60 % of that.
ASSUMED_GPU_FLOPS = 400e12
ASSUMED_GPU_BYTES_PER_S = 2.0e12
#: Assumed read speed of the weights from a (shared) filesystem when a worker loads a model.
ASSUMED_LOAD_BYTES_PER_S = 2.0e9
#: Answer tokens per causal item (targets are short completions: " type 2 diabetes").
TARGET_TOKENS = 4


# --------------------------------------------------------------------------------------------
# Shapes and parameter counts


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model (one decoder stack, optional extras).

    ``intermediate`` is the dense MLP width, or the width of one expert when ``experts > 0``.
    ``weight_format`` is ``"bf16"`` or ``"mxfp4"`` (MXFP4 expert weights, bf16 elsewhere).
    ``extra_params``: parameters loaded with the model outside the decoder (a vision tower).
    """

    name: str
    architecture: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    experts: int = 0
    experts_per_token: int = 0
    weight_format: str = "bf16"
    attention_bias: bool = False
    mlp_bias: bool = False
    extra_params: int = 0
    extra_params_what: str = ""
    published_params_b: float | None = None
    published_active_b: float | None = None
    published_source: str = ""
    based_on: str = ""
    source: str = ""

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


#: Per-architecture structure: norms per block, q/k norms, biases (transformers' modules).
_ARCH: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "phi3": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma3_text": {"norms": 4, "qk_norm": True},
    "gemma2": {"norms": 4},
    "gpt_oss": {"qkv_bias": True, "o_bias": True, "sinks": True, "expert_bias": True},
}


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a model (numbers of scalars, not bytes)."""

    layers: int
    per_block: int
    block_experts: int
    embedding: int
    unembedding: int
    final_norm: int
    extra: int
    experts: int = 0
    experts_per_token: int = 0

    @property
    def blocks(self) -> int:
        return self.per_block * self.layers

    @property
    def experts_total(self) -> int:
        return self.block_experts * self.layers

    @property
    def total(self) -> int:
        return self.blocks + self.embedding + self.unembedding + self.final_norm + self.extra

    @property
    def block_active(self) -> int:
        """Block parameters one token goes through (all but the unchosen experts), per block."""
        if not self.experts:
            return self.per_block
        dense = self.per_block - self.block_experts
        return dense + self.block_experts * self.experts_per_token // self.experts

    @property
    def active(self) -> int:
        """Parameters used per token: active block parameters plus the unembedding matrix."""
        head = self.unembedding or self.embedding
        return self.block_active * self.layers + head + self.final_norm


def _structure(shape: ModelShape) -> dict[str, Any]:
    if shape.architecture not in _ARCH:
        raise MedmapError(
            f"the planner does not know the architecture {shape.architecture!r} of {shape.name}",
            hint=f"known: {', '.join(sorted(_ARCH))}",
        )
    return _ARCH[shape.architecture]


def param_count(shape: ModelShape) -> ParamCount:
    """Parameters of ``shape``, counted as transformers builds the model (tests check exactly)."""
    s = _structure(shape)
    d, ff, hd = shape.hidden, shape.intermediate, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    attn = d * q + 2 * d * kv + q * d
    if s.get("qkv_bias") or shape.attention_bias:
        attn += q + 2 * kv
    if s.get("o_bias") or shape.attention_bias:
        attn += d
    if s.get("qk_norm"):
        attn += 2 * hd
    if s.get("sinks"):
        attn += shape.heads
    norms = s.get("norms", 2) * d
    if shape.is_moe:
        e = shape.experts
        experts = e * 3 * d * ff + (e * (2 * ff + d) if s.get("expert_bias") else 0)
        router = e * d + (e if s.get("expert_bias") else 0)
        mlp = experts + router
    else:
        experts = 0
        mlp = 3 * d * ff + ((2 * ff + d) if shape.mlp_bias else 0)
    return ParamCount(
        layers=shape.layers,
        per_block=attn + mlp + norms,
        block_experts=experts,
        embedding=shape.vocab * d,
        unembedding=0 if shape.tie_embeddings else shape.vocab * d,
        final_norm=d,
        extra=shape.extra_params,
        experts=shape.experts,
        experts_per_token=shape.experts_per_token,
    )


def weight_bytes(pc: ParamCount, fmt: str) -> int:
    """Bytes of the weights in ``fmt``: ``float32``, ``bfloat16``/``float16`` or ``mxfp4``
    (MXFP4 experts, bf16 for everything else)."""
    if fmt == "mxfp4":
        return int(pc.experts_total * MXFP4_BITS / 8) + 2 * (pc.total - pc.experts_total)
    return DTYPE_BYTES[fmt] * pc.total


def _siglip_params(v: dict[str, Any]) -> int:
    h, i, n = (
        v.get("hidden_size", 768),
        v.get("intermediate_size", 3072),
        v.get("num_hidden_layers", 12),
    )
    p, img, ch = v.get("patch_size", 16), v.get("image_size", 224), v.get("num_channels", 3)
    layer = 4 * (h * h + h) + (h * i + i) + (i * h + h) + 4 * h
    return n * layer + ch * p * p * h + h + (img // p) ** 2 * h + 2 * h


def shape_from_hf_config(cfg: dict[str, Any], name: str, source: str) -> ModelShape:
    """A :class:`ModelShape` from a ``config.json`` dict (multimodal configs: the text model
    plus the vision tower as ``extra_params``)."""
    extra, what = 0, ""
    text = cfg
    if "text_config" in cfg and isinstance(cfg["text_config"], dict):
        text = {**cfg["text_config"]}
        text.setdefault("model_type", f"{cfg.get('model_type', '')}_text")
        vision = cfg.get("vision_config")
        if isinstance(vision, dict):
            extra = _siglip_params(vision) + vision.get("hidden_size", 0) * (
                text.get("hidden_size", 0) + 1
            )
            what = "vision tower and projector"
    arch = str(text.get("model_type", ""))
    try:
        d = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        shape = ModelShape(
            name=name,
            architecture=arch,
            layers=int(text["num_hidden_layers"]),
            hidden=d,
            intermediate=int(text.get("moe_intermediate_size") or text["intermediate_size"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or d // heads),
            vocab=int(text["vocab_size"]),
            tie_embeddings=bool(
                cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            ),
            experts=int(text.get("num_local_experts") or text.get("num_experts") or 0),
            experts_per_token=int(text.get("num_experts_per_tok") or 0),
            weight_format="mxfp4"
            if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4"
            else "bf16",
            attention_bias=bool(text.get("attention_bias", False)) and arch != "gpt_oss",
            mlp_bias=bool(text.get("mlp_bias", False)),
            extra_params=extra,
            extra_params_what=what,
            source=source,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise MedmapError(
            f"{source} lacks the shape key {e} the planner needs",
            hint="point the config's model at a complete Hugging Face config.json",
        ) from None
    _structure(shape)
    return shape


def shape_table() -> dict[str, ModelShape]:
    """The shipped table of model shapes (``medmap/run/model_shapes.toml``), by model id."""
    text = resources.files("medmap.run").joinpath("model_shapes.toml").read_text(encoding="utf-8")
    out = {}
    for name, row in tomllib.loads(text)["models"].items():
        row = dict(row)
        out[name] = ModelShape(name=name, source="medmap's shape table (model_shapes.toml)", **row)
    return out


def _cached_config_json(model: str) -> Path | None:
    """``config.json`` of a hub id in the local Hugging Face cache (never downloads)."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    found = try_to_load_from_cache(model, "config.json")
    return Path(found) if isinstance(found, str) else None


def model_shape(model: str) -> ModelShape:
    """Shapes of ``model``: its ``config.json`` (local directory or HF cache), else the table.

    Raises :class:`MedmapError` when neither knows the model.
    """
    path = Path(model).expanduser()
    cfg_path = path / "config.json" if path.is_dir() else None
    if cfg_path is None or not cfg_path.exists():
        cfg_path = _cached_config_json(model)
    table = shape_table()
    if cfg_path is not None and cfg_path.exists():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MedmapError(
                f"cannot read {cfg_path}: {e}", hint="fix or re-download the config.json"
            ) from None
        shape = shape_from_hf_config(cfg, model, str(cfg_path))
        known = table.get(model)
        if known is not None:  # keep the published figures for the comparison
            shape = replace(
                shape,
                published_params_b=known.published_params_b,
                published_active_b=known.published_active_b,
                published_source=known.published_source,
                based_on=known.based_on,
            )
        return shape
    if model in table:
        return table[model]
    if path.exists():
        raise MedmapError(
            f"{model} has no config.json",
            hint="point the config's model at a Hugging Face model directory",
        )
    raise MedmapError(
        f"the planner knows no shapes for model {model!r} (not a local directory, not in the local "
        "Hugging Face cache, not in the shape table)",
        hint=f"use a local model directory, or one of: {', '.join(sorted(table))}",
    )


# --------------------------------------------------------------------------------------------
# Work per technique


@dataclass(frozen=True)
class StageWork:
    """The work of one technique over the run's concept sets.

    ``counts``: per concept set, the number of prompts (umap), items (lesion, saliency) or
    pairs (patching; an upper bound: the tokenizer drops pairs of unequal token length).
    ``tokens``: estimated tokens per prompt (mean, including BOS; answers included for causal
    techniques).
    """

    technique: str
    counts: tuple[int, ...]
    tokens: float

    @property
    def n(self) -> int:
        return sum(self.counts)


def _tokens(texts_chars: list[int], chars_per_token: float) -> float:
    if not texts_chars:
        return 0.0
    return sum(math.ceil(c / chars_per_token) + 1 for c in texts_chars) / len(texts_chars)


def _trimmed_targets(cs, max_targets: int | None) -> list:
    """The rendered targets of ``cs`` with at most ``max_targets`` per item (the runner's
    ``RunContext.trim_targets``)."""
    per_item: dict[int, int] = {}
    rows = []
    for t in cs.targets():
        per_item[t.item_index] = per_item.get(t.item_index, 0) + 1
        if max_targets is None or per_item[t.item_index] <= max_targets:
            rows.append(t)
    return rows


def run_work(cfg: Any, chars_per_token: float) -> dict[str, StageWork]:
    """Per technique of ``cfg`` (a :class:`medmap.run.config.RunConfig`), its :class:`StageWork`,
    following the runner's subsets (``max_items``, ``umap_max_items``, ``max_templates``,
    ``max_targets``, ``saliency_items``, ``max_pairs``)."""
    from medmap.concepts import counterfactual_pairs, list_concepts, load_concepts

    names = list(cfg.concept_sets or list_concepts())
    loaded = {name: load_concepts(name) for name in names}
    out: dict[str, StageWork] = {}
    for tech in cfg.techniques:
        counts, chars = [], []
        for name in names:
            cs = loaded[name]
            cap = cfg.umap_max_items if tech == "umap" and cfg.umap_max_items else cfg.max_items
            if cap is not None and len(cs.items) > cap:
                cs = cs.subset(cap, seed=cfg.seed)
            if tech == "umap":
                prompts = list(cs.render())
                if cfg.max_templates is not None:
                    kept = [p for p in prompts if p.template_index < cfg.max_templates]
                    have = {p.item_index for p in kept}
                    kept += [
                        p
                        for p in {p.item_index: p for p in reversed(prompts)}.values()
                        if p.item_index not in have
                    ]
                    prompts = kept
                counts.append(len(prompts))
                chars += [len(p.text) for p in prompts]
            elif tech in ("knows", "logit_lens"):  # every candidate answer is a sequence
                src = loaded[name] if tech == "knows" else cs
                if tech == "knows" and cfg.knows_max_items and len(src.items) > cfg.knows_max_items:
                    src = src.subset(cfg.knows_max_items, seed=cfg.seed)
                for t in _trimmed_targets(src, cfg.max_targets):
                    n_cand = len(t.answers) + cfg.knows_distractors + 1  # + moved answers
                    counts.append(n_cand)
                    chars += [len(t.prompt) + len(t.answers[0])] * n_cand
            elif tech in ("lesion", "saliency"):
                rows = _trimmed_targets(cs, cfg.max_targets)
                if tech == "saliency" and cfg.saliency_items is not None:
                    keep = set(sorted({t.item_index for t in rows})[: cfg.saliency_items])
                    rows = [t for t in rows if t.item_index in keep]
                n = len(rows)
                if tech == "lesion":  # every forced-choice candidate, + neutral text once a run
                    n *= 1 + cfg.knows_distractors
                    if name == names[0]:
                        n += cfg.generic_sentences or 0
                else:  # one backward pass per item and objective
                    n *= len(cfg.saliency_objectives)
                counts.append(n)
                chars += [len(t.prompt) + len(t.answers[0]) for t in rows]
            else:
                pairs = list(counterfactual_pairs(cs, None, max_pairs=cfg.max_pairs, seed=cfg.seed))
                counts.append(len(pairs))
                chars += [len(p.clean.prompt) for p in pairs]
        if tech in ("knows", "logit_lens"):
            counts = [sum(counts)]
        out[tech] = StageWork(tech, tuple(counts), _tokens(chars, chars_per_token))
    return out


# --------------------------------------------------------------------------------------------
# Costs (measured) and the time model


@dataclass(frozen=True)
class Costs:
    """Throughput of one device class and per-technique ratios.

    ``flops_per_s`` / ``bytes_per_s``: fitted to bare forward passes (``t = bytes/B + FLOP/F``).
    ``ratio``: per technique, measured time / modelled time at the benchmark's shapes.
    ``measured``: whether ``flops_per_s``/``bytes_per_s`` come from a measurement on this class
    of device; ``note`` says where every number came from.
    """

    device: str
    flops_per_s: float
    bytes_per_s: float
    ratio: dict[str, float]
    measured: bool
    note: str
    chars_per_token: float = 3.5
    peak_over_weights: dict[str, float] = field(default_factory=dict)


def _costs_path() -> Any:
    return resources.files("medmap.run").joinpath("costs.json")


def load_costs(
    path: str | os.PathLike | None = None,
    *,
    device: str = "cuda",
    tflops: float | None = None,
    mem_tbps: float | None = None,
) -> Costs:
    """Costs for ``device`` (``"cuda"`` or ``"cpu"``) from a ``benchmarks/gpu.py --json`` file
    (default: the measurements shipped with medmap).

    When the file has no measurement for ``device`` (or ``tflops``/``mem_tbps`` are given), the
    throughput is the assumption :data:`ASSUMED_GPU_FLOPS` / :data:`ASSUMED_GPU_BYTES_PER_S` (or
    the given values) and the technique ratios come from the measurement that exists; the note
    says so.
    """
    src = Path(path) if path is not None else _costs_path()
    try:
        data = json.loads(src.read_text(encoding="utf-8"))
        runs = data["runs"]
    except FileNotFoundError:
        raise MedmapError(
            f"costs file {src} does not exist", hint="write one with benchmarks/gpu.py --json FILE"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise MedmapError(
            f"costs file {src} is not a benchmarks/gpu.py --json file",
            hint="rerun benchmarks/gpu.py",
        ) from None
    if not runs:
        raise MedmapError(f"costs file {src} holds no measurements", hint="rerun benchmarks/gpu.py")
    same = [r for r in runs if r["device"] == device]
    base = (same or [r for r in runs if r["device"] == "cuda"] or runs)[-1]
    cpt = float(data.get("chars_per_token", 3.5))
    where = f"{base['device_name']}, {base['dtype']}, shapes {base['shape']}, {base['date']}"
    ratio = {k: float(v) for k, v in base["ratio"].items()}
    peak = {k: float(v) for k, v in base.get("peak_over_weights", {}).items()}
    if same and tflops is None and mem_tbps is None:
        note = (
            f"throughput ({base['flops_per_s'] / 1e12:.3g} TFLOP/s, {base['bytes_per_s'] / 1e9:.3g} "
            f"GB/s) and technique ratios measured by benchmarks/gpu.py on {where}"
        )
        return Costs(device, base["flops_per_s"], base["bytes_per_s"], ratio, True, note, cpt, peak)
    f = tflops * 1e12 if tflops else ASSUMED_GPU_FLOPS
    b = mem_tbps * 1e12 if mem_tbps else ASSUMED_GPU_BYTES_PER_S
    given = "given on the command line" if (tflops or mem_tbps) else "ASSUMED, not measured"
    note = (
        f"throughput {f / 1e12:.0f} TFLOP/s and {b / 1e12:.1f} TB/s {given}; technique ratios "
        f"measured by benchmarks/gpu.py on {where}"
    )
    return Costs(device, f, b, ratio, False, note, cpt, peak)


@dataclass(frozen=True)
class Work:
    """Modelled work of a technique: FLOP, weight bytes read, forward passes, tokens."""

    flops: float = 0.0
    bytes_read: float = 0.0
    passes: int = 0
    tokens: float = 0.0

    def __add__(self, o: Work) -> Work:
        return Work(
            self.flops + o.flops,
            self.bytes_read + o.bytes_read,
            self.passes + o.passes,
            self.tokens + o.tokens,
        )

    def seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Modelled time: weight bytes read at ``bytes_per_s`` plus FLOP at ``flops_per_s``."""
        return self.bytes_read / bytes_per_s + self.flops / flops_per_s


def block_flops_per_token(shape: ModelShape, pc: ParamCount, seq: float) -> float:
    """FLOP of one token through all blocks at context ``seq`` (matmuls + attention scores)."""
    return 2 * pc.block_active * pc.layers + 4 * seq * shape.heads * shape.head_dim * pc.layers


def head_flops_per_token(shape: ModelShape) -> float:
    """FLOP of the logits of one position (the unembedding matmul)."""
    return 2 * shape.hidden * shape.vocab


def technique_work(
    technique: str,
    shape: ModelShape,
    pc: ParamCount,
    counts: tuple[int, ...] | list[int],
    tokens: float,
    *,
    batch_size: int,
    weight_fmt: str,
    positions: int = 2,
    window: int = 1,
) -> Work:
    """Modelled :class:`Work` of ``technique`` over sets of ``counts`` prompts/items/pairs.

    capture/umap: one pass of the blocks per batch (no logits). lesion: per batch one intact
    pass, then for every lesion only the blocks after it, logits at the answer tokens.
    patching: clean and corrupt passes per batch, then per residual layer ``l`` the blocks after
    ``l`` on the ``positions`` stacked copies, logits at the last token. saliency: per item one
    forward and one backward (2x the forward's FLOP, weights read again, gradients written).
    """
    wb = weight_bytes(pc, weight_fmt)
    head_b = wb * (pc.unembedding or pc.embedding) / pc.total
    block_b = wb * pc.blocks / pc.total
    expert_b = (
        wb * pc.experts_total / pc.total
        if weight_fmt != "mxfp4"
        else pc.experts_total * MXFP4_BITS / 8
    )
    dense_b = block_b - expert_b

    def blocks_read(n_tok: float) -> float:
        """Block weight bytes a pass over ``n_tok`` tokens reads (MoE: only the experts hit)."""
        if not pc.experts:
            return block_b
        hit = 1 - (1 - pc.experts_per_token / pc.experts) ** max(n_tok, 1)
        return dense_b + expert_b * hit

    fb = block_flops_per_token(shape, pc, tokens)
    fh = head_flops_per_token(shape)
    n_layers = pc.layers
    total = Work()
    for n in counts:
        if n <= 0:
            continue
        batches = math.ceil(n / batch_size)
        tok = n * tokens
        per_pass = tok / batches  # tokens of one batch
        if technique in ("umap", "knows"):  # knows: forward passes over candidate sequences
            total += Work(tok * fb, batches * blocks_read(per_pass), batches, tok)
        elif technique == "logit_lens":  # + two heads (logit, tuned lens) per answer position
            heads = 2 * n * TARGET_TOKENS * (n_layers + 1)
            total += Work(
                tok * fb + heads * fh,
                batches * (blocks_read(per_pass) + (n_layers + 1) * head_b),
                batches,
                tok,
            )
        elif technique == "lesion":
            n_les = n_layers - window + 1
            suffix = (n_layers - window) * (n_layers - window + 1) / 2 / n_layers  # in stacks
            heads = (n_les + 1) * n * TARGET_TOKENS
            total += Work(
                tok * fb * (1 + suffix) + heads * fh,
                batches * (blocks_read(per_pass) * (1 + suffix) + (n_les + 1) * head_b),
                batches * (n_les + 1),
                tok * (1 + n_les),
            )
        elif technique == "patching":
            suffix = (n_layers + 1) / 2  # sum over l = 0..L of (L - l) / L
            heads = 2 * n + (n_layers + 1) * positions * n
            read = 2 * blocks_read(per_pass) + blocks_read(positions * per_pass) * suffix
            total += Work(
                2 * tok * fb + positions * tok * fb * suffix + heads * fh,
                batches * (read + (n_layers + 3) * head_b),
                batches * (n_layers + 3),
                tok * (2 + positions * (n_layers + 1)),
            )
        elif technique == "saliency":
            # backward: the weights again and every gradient (whole expert tensors) written
            total += Work(
                3 * (tok * fb + n * TARGET_TOKENS * fh),
                n * (blocks_read(tokens) + 2 * block_b + 3 * head_b),
                n,
                tok,
            )
        else:
            raise ValueError(technique)
    return total


# --------------------------------------------------------------------------------------------
# Memory and GPUs


def technique_extra_bytes(
    technique: str,
    shape: ModelShape,
    pc: ParamCount,
    tokens: float,
    *,
    batch_size: int,
    act_bytes: int,
    positions: int = 2,
) -> int:
    """Device bytes a technique needs beyond the weights (estimate, see docs/scaling.md).

    One block's working set for ``N`` tokens: ``N × (8 d + 3 ff_active) × act_bytes`` plus the
    attention scores ``N × heads × seq × 4`` (eager/math attention; flash attention needs less).
    lesion keeps every block's input for a batch, patching those of the clean and the corrupt
    run; saliency runs one item with the activations kept for the backward pass and at most one
    block's (or the embedding's) gradients alive (medmap frees each gradient once reduced).
    """
    d, seq = shape.hidden, math.ceil(tokens)
    ff = shape.intermediate * max(shape.experts_per_token, 1)

    def working(n_tok: int) -> float:
        return n_tok * (8 * d + 3 * ff) * act_bytes + n_tok * shape.heads * seq * 4

    bt = batch_size * seq
    record = (pc.layers + 1) * bt * d * act_bytes
    if technique == "umap":
        extra = working(bt) + batch_size * (pc.layers + 1) * d * 4
    elif technique in ("knows", "logit_lens"):
        extra = working(bt) + batch_size * TARGET_TOKENS * shape.vocab * 4
    elif technique == "lesion":
        extra = working(bt) + record + batch_size * TARGET_TOKENS * shape.vocab * 4
    elif technique == "patching":
        extra = working(positions * bt) + 2 * record + 2 * positions * batch_size * shape.vocab * 4
    elif technique == "saliency":
        saved = seq * pc.layers * (10 * d + 4 * ff) * act_bytes
        grads = max(pc.per_block, pc.embedding) * act_bytes
        extra = working(seq) + saved + grads + 2 * seq * shape.vocab * 4
    else:
        raise ValueError(technique)
    return int(extra)


def parse_size(text: str) -> int:
    """Bytes of ``"80GiB"``, ``"80GB"``, ``"141 GB"``, ``"512MiB"`` (a bare number is GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise MedmapError(
            f"cannot read the memory size {text!r}", hint="write it like 80GiB, 80GB or 141GB"
        )
    value, unit = float(m.group(1)), m.group(2).upper().rstrip("B")
    if not unit:
        return int(value * GIB)
    base = 1024 if unit.endswith("I") else 1000
    return int(value * base ** "KMGT".index(unit[0]) * base)


def gpus_needed(weights: int, extra: int, gpu_mem: int) -> int:
    """GPUs of ``gpu_mem`` bytes that hold ``weights`` sharded evenly plus ``extra`` on each
    (conservative: the whole working set is counted on every GPU); 0 if none can."""
    usable = gpu_mem - GPU_RESERVE - extra
    if usable <= 0:
        return 0
    return max(1, math.ceil(weights / usable))


def device_map_text(shape: ModelShape, n_gpus: int) -> str:
    """What accelerate's balanced ``device_map = "auto"`` does for ``n_gpus`` (block ranges)."""
    n = shape.layers
    parts = []
    for g in range(n_gpus):
        lo, hi = round(g * n / n_gpus), round((g + 1) * n / n_gpus) - 1
        what = []
        if g == 0:
            what.append("embeddings" + (" + vision" if shape.extra_params else ""))
        what.append(f"blocks {lo}–{hi}")
        if g == n_gpus - 1:
            what.append("norm, lm_head" + (" (tied)" if shape.tie_embeddings else ""))
        parts.append(f"GPU {g}: {', '.join(what)}")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class TechniquePlan:
    """One technique of a plan. Bytes and seconds; ``gpus`` = 0 means it fits on none."""

    technique: str
    weight_fmt: str
    weights: int
    extra: int
    n: int
    tokens_per_item: float
    tokens: float
    passes: int
    seconds: float
    gpus: int


@dataclass(frozen=True)
class Plan:
    """Everything ``medmap plan`` prints for one config."""

    name: str
    model: str
    shape: ModelShape
    params: ParamCount
    dtype: str
    weights_by_dtype: dict[str, int]
    activation_store: int
    largest_store: int
    techniques: tuple[TechniquePlan, ...]
    gpu_mem: int
    gpus_given: int
    costs: Costs
    on_gpu: bool

    @property
    def gpus(self) -> int:
        """GPUs the run needs when one process runs every technique (the largest need)."""
        return max(t.gpus for t in self.techniques)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.techniques)

    def fits(self) -> bool:
        return all(0 < t.gpus <= self.gpus_given for t in self.techniques)


def plan_run(
    cfg: Any,
    *,
    name: str = "",
    gpus: int = 8,
    gpu_mem: int = 80 * GIB,
    costs: Costs | None = None,
    work: dict[str, StageWork] | None = None,
    shape: ModelShape | None = None,
) -> Plan:
    """The :class:`Plan` of run config ``cfg`` on ``gpus`` GPUs of ``gpu_mem`` bytes each.

    A run on CPU (neither ``device`` nor ``device_map`` set to a GPU) is planned with CPU costs.
    """
    shape = shape or model_shape(cfg.model)
    pc = param_count(shape)
    dev = str(cfg.device or "")
    on_gpu = dev.startswith("cuda") or (cfg.device_map is not None and not dev)
    costs = costs or load_costs(device="cuda" if on_gpu else "cpu")
    dtype = cfg.dtype or ("bfloat16" if on_gpu else "float32")
    work = work if work is not None else run_work(cfg, costs.chars_per_token)
    act_bytes = DTYPE_BYTES[dtype]
    positions = len(cfg.patch_positions)
    techs = []
    for tech in cfg.techniques:
        sw = work[tech]
        # MXFP4 stays packed for forward-only techniques; gradients need real bf16 weights.
        fmt = "mxfp4" if shape.weight_format == "mxfp4" and tech != "saliency" else dtype
        if shape.weight_format == "mxfp4" and tech == "saliency" and dtype == "float16":
            fmt = "bfloat16"
        w = weight_bytes(pc, fmt)
        extra = technique_extra_bytes(
            tech, shape, pc, sw.tokens, batch_size=cfg.batch_size, act_bytes=act_bytes,
            positions=positions,
        )  # fmt: skip
        wk = technique_work(
            tech, shape, pc, sw.counts, sw.tokens, batch_size=cfg.batch_size, weight_fmt=fmt,
            positions=positions, window=cfg.lesion_window,
        )  # fmt: skip
        secs = wk.seconds(costs.flops_per_s, costs.bytes_per_s) * costs.ratio.get(tech, 1.0)
        techs.append(
            TechniquePlan(
                tech, fmt, w, extra, sw.n, sw.tokens, wk.tokens, wk.passes, secs,
                gpus_needed(w, extra, gpu_mem),
            )
        )  # fmt: skip
    store = 0
    largest = 0
    if "umap" in work:
        per_set = [c * (pc.layers + 1) * shape.hidden * 4 for c in work["umap"].counts]
        store, largest = sum(per_set), max(per_set, default=0)
    fmts = ["float32", "bfloat16"] + (["mxfp4"] if shape.weight_format == "mxfp4" else [])
    return Plan(
        name=name or shape.name,
        model=cfg.model,
        shape=shape,
        params=pc,
        dtype=dtype,
        weights_by_dtype={f: weight_bytes(pc, f) for f in fmts},
        activation_store=store,
        largest_store=largest,
        techniques=tuple(techs),
        gpu_mem=gpu_mem,
        gpus_given=gpus,
        costs=costs,
        on_gpu=on_gpu,
    )


def check_fits(plan: Plan) -> None:
    """Raise :class:`MedmapError` (one line, exit code 2) if a technique cannot fit the GPUs."""
    if not plan.on_gpu:
        return
    # the technique that needs the most GPUs first (0 = fits on none: worst)
    for t in sorted(plan.techniques, key=lambda t: -(t.gpus or 10**9)):
        if 0 < t.gpus <= plan.gpus_given:
            continue
        need = t.weights + t.extra
        mem = _gib(plan.gpu_mem)
        if t.gpus == 0:
            hint = (
                f"its working set alone ({_gb(t.extra)}) exceeds one GPU: lower batch_size "
                "or use GPUs with more memory"
            )
        else:
            hint = f"use --gpus {t.gpus} or more, or GPUs with more memory than {mem}"
        raise MedmapError(
            f"{plan.name}: {t.technique} needs {_gb(need)} of GPU memory (weights {_gb(t.weights)} "
            f"in {t.weight_fmt} + {_gb(t.extra)}), more than {plan.gpus_given} × {mem} hold",
            hint=hint,
        )


# --------------------------------------------------------------------------------------------
# Several runs on a cluster


@dataclass(frozen=True)
class Slot:
    """One scheduled job: a (model, technique) on ``gpus`` GPUs of ``node`` from ``start``."""

    model: str
    technique: str
    node: int
    gpus: int
    start: float
    seconds: float


def schedule(
    plans: list[Plan],
    *,
    nodes: int,
    gpus_per_node: int,
    load_bytes_per_s: float = ASSUMED_LOAD_BYTES_PER_S,
) -> list[Slot]:
    """Longest-first greedy schedule of every (model, technique) job onto ``nodes`` nodes.

    Each job needs its technique's GPU count on one node and loads the model once (weights read
    at ``load_bytes_per_s``, an assumption). This is how ``medmap sweep --ray`` spreads cells
    when every technique of a model is one job; Ray's per-set cells pack a little tighter.
    """
    jobs = []
    for p in plans:
        for t in p.techniques:
            if not 0 < t.gpus <= gpus_per_node:
                raise MedmapError(
                    f"{p.name}: {t.technique} needs {t.gpus or 'more than'} GPUs of {_gib(p.gpu_mem)}, "
                    f"more than one node's {gpus_per_node}",
                    hint="raise --gpus (GPUs per node) or use GPUs with more memory",
                )
            jobs.append((t.seconds + t.weights / load_bytes_per_s, p.name, t))
    free = [[0.0] * gpus_per_node for _ in range(nodes)]
    out = []
    for secs, name, t in sorted(jobs, key=lambda j: (-j[0], j[1], j[2].technique)):
        best = None
        for ni, node in enumerate(free):
            order = sorted(range(gpus_per_node), key=lambda g, node=node: node[g])
            chosen = order[: t.gpus]
            start = max(node[g] for g in chosen)
            if best is None or start < best[0]:
                best = (start, ni, chosen)
        start, ni, chosen = best
        for g in chosen:
            free[ni][g] = start + secs
        out.append(Slot(name, t.technique, ni, t.gpus, start, secs))
    return out


# --------------------------------------------------------------------------------------------
# Formatting


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.95 * GB else f"{n / 1e6:.0f} MB"


def _gib(n: float) -> str:
    """A GPU's memory, in GiB as GPUs are sold ("80 GB" cards hold 80 GiB)."""
    return f"{n / GIB:.0f} GiB" if n % GIB == 0 else f"{n / GIB:.1f} GiB"


def _dur(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _b(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def plan_markdown(plan: Plan, *, heading: str = "###") -> str:
    """Markdown of one plan (the sections of docs/scaling.md and of ``medmap plan --markdown``)."""
    s, pc = plan.shape, plan.params
    lines = [f"{heading} {plan.name} (`{plan.model}`)", ""]
    arch = f"{s.architecture}, {s.layers} blocks, d_model {s.hidden}, {s.heads} heads ({s.kv_heads} kv)"
    if s.is_moe:
        arch += f", {s.experts} experts ({s.experts_per_token} per token, width {s.intermediate})"
    else:
        arch += f", MLP {s.intermediate}"
    arch += f", vocab {s.vocab}" + (", tied embeddings" if s.tie_embeddings else "")
    lines.append(
        f"- shapes: {arch}; from {s.source}" + (f"; based on {s.based_on}" if s.based_on else "")
    )
    pub = ""
    if s.published_params_b:
        pub = f" (published {s.published_params_b:g} B: {s.published_source})"
    active = f"; active per token {_b(pc.active)}" if s.is_moe else ""
    extra = f"; incl. {_b(pc.extra)} {s.extra_params_what}" if pc.extra else ""
    lines.append(f"- parameters: {_b(pc.total)}{pub}{active}{extra}")
    w = ", ".join(f"{k} {_gb(v)}" for k, v in plan.weights_by_dtype.items())
    lines.append(f"- weights: {w}")
    if "umap" in [t.technique for t in plan.techniques]:
        lines.append(
            f"- activation store (float32, all layers, on disk): {_gb(plan.activation_store)} in all, "
            f"largest concept set {_gb(plan.largest_store)}"
        )
    lines += [
        "",
        "| technique | items | tokens / item | forward passes | weights on GPU | + activations | GPUs | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in plan.techniques:
        unit = {"umap": "prompts", "patching": "pairs"}.get(t.technique, "items")
        upto = "≤ " if t.technique == "patching" else ""
        lines.append(
            f"| {t.technique} | {upto}{t.n} {unit} | {t.tokens_per_item:.0f} | {t.passes} | "
            f"{_gb(t.weights)} ({t.weight_fmt}) | {_gb(t.extra)} | {t.gpus or '–'} | {_dur(t.seconds)} |"
        )
    lines.append(f"| **run** | | | | | | **{plan.gpus or '–'}** | **{_dur(plan.seconds)}** |")
    lines.append("")
    if plan.on_gpu and plan.gpus:
        lines.append(
            f"- device map ({plan.gpus} × {_gib(plan.gpu_mem)}): {device_map_text(s, plan.gpus)}"
        )
        fmts = {t.weight_fmt for t in plan.techniques}
        if s.weight_format == "mxfp4" and len(fmts) > 1:
            fwd = (
                max(t.gpus for t in plan.techniques if t.technique != "saliency")
                if len(plan.techniques) > 1
                else plan.gpus
            )
            lines.append(
                f"- MXFP4: the forward-only techniques keep the packed experts ({fwd} GPU(s)); "
                f"saliency dequantises them to bf16 (+{_gb(plan.weights_by_dtype['bfloat16'] - plan.weights_by_dtype['mxfp4'])}): "
                "run it as its own job (`--techniques saliency`) to keep the others on fewer GPUs. "
                "Packed MXFP4 needs transformers' MXFP4 kernels (triton + kernels on a "
                "Hopper-class GPU); without them transformers dequantises on load and every "
                "technique needs the bf16 weights"
            )
    return "\n".join(lines)


def plan_text(plan: Plan) -> str:
    """The plan as ``medmap plan`` prints it (the markdown, and where the costs came from)."""
    return plan_markdown(plan, heading="##") + f"\n- times: {plan.costs.note}\n"


def schedule_markdown(
    plans: list[Plan], slots: list[Slot], *, nodes: int, gpus_per_node: int
) -> str:
    """Markdown summary of a :func:`schedule`: makespan, GPU hours and the job table."""
    end = max((s.start + s.seconds for s in slots), default=0.0)
    gpu_h = sum(s.gpus * s.seconds for s in slots) / 3600
    total = nodes * gpus_per_node
    lines = [
        f"{nodes} node(s) × {gpus_per_node} GPUs: all jobs finish after **{_dur(end)}** "
        f"({gpu_h:.0f} GPU-hours of work, {gpu_h * 3600 / max(end, 1) / total:.0%} of the GPUs busy).",
        "",
        "| model | technique | node | GPUs | start | duration (incl. load) |",
        "|---|---|---|---|---|---|",
    ]
    for s in sorted(slots, key=lambda s: (s.node, s.start, s.model)):
        lines.append(
            f"| {s.model} | {s.technique} | {s.node} | {s.gpus} | {_dur(s.start)} | {_dur(s.seconds)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Entry points (the CLI and docs/scaling.md)


def plan_configs(
    paths: list[Path],
    *,
    preset: str | None = None,
    gpus: int = 8,
    gpu_mem: int = 80 * GIB,
    costs_file: str | os.PathLike | None = None,
    tflops: float | None = None,
    mem_tbps: float | None = None,
) -> list[Plan]:
    """A :class:`Plan` per run config file (validated like ``medmap map --config``)."""
    from medmap.run.config import build_config

    if gpus < 1:
        raise MedmapError(
            f"--gpus {gpus}: at least one GPU is needed", hint="give --gpus 1 or more"
        )
    if gpu_mem <= GPU_RESERVE:
        raise MedmapError(
            f"--gpu-mem {_gib(gpu_mem)} is below the {_gib(GPU_RESERVE)} reserved per GPU",
            hint="give the GPU's memory, e.g. --gpu-mem 80GiB",
        )
    plans = []
    costs: dict[str, Costs] = {}
    works: dict[str, dict[str, StageWork]] = {}
    for path in paths:
        cfg = build_config(preset_name=preset, config_file=Path(path))
        dev = str(cfg.device or "")
        kind = (
            "cuda" if dev.startswith("cuda") or (cfg.device_map is not None and not dev) else "cpu"
        )
        if kind not in costs:
            costs[kind] = load_costs(costs_file, device=kind, tflops=tflops, mem_tbps=mem_tbps)
        # the work depends on the concept budgets only, not on the model: count it once
        key = json.dumps(
            cfg.model_dump(exclude={"model", "dtype", "device", "device_map", "max_memory"}),
            sort_keys=True,
            default=str,
        )
        if key not in works:
            works[key] = run_work(cfg, costs[kind].chars_per_token)
        plans.append(
            plan_run(
                cfg, name=Path(path).stem, gpus=gpus, gpu_mem=gpu_mem, costs=costs[kind],
                work=works[key],
            )
        )  # fmt: skip
    return plans


_DOC_HEAD = """# Scaling plan: the paper's models at full size

<!-- Generated by `{command}`; edit src/medmap/run/plan.py, not this file. -->

Every number below comes from `medmap plan` (`src/medmap/run/plan.py`), which computes them from
the run config, the `full` preset and the model's shapes (its `config.json` when the model is in
the local Hugging Face cache, otherwise medmap's shape table `src/medmap/run/model_shapes.toml`;
nothing is downloaded). Check one config on your hardware before a run:

```bash
medmap plan configs/paper/llama-3.3-70b-instruct.toml --preset full --gpus 2 --gpu-mem 80GiB
```

It exits with code 2 and one line naming the technique, the memory it needs and the GPUs that
would hold it when the config does not fit the given GPUs.

## What is computed, what is measured, what is assumed

* **Computed exactly**: parameter counts (tests build every model at full size on PyTorch's
  meta device and compare: equal to the last parameter; within 1 % of the published counts) and
  weight bytes (bf16: 2 bytes per parameter; MXFP4 experts: 4.25 bits per parameter).
* **Counted from the concept sets**: prompts, causal items and (at most) counterfactual pairs
  per technique under the preset's budgets. Tokens per prompt are estimated from characters
  ({cpt:.2f} characters per token: measured with the two bundled tokenizers on every bundled
  prompt; the real tokenizers of the paper's models differ somewhat).
* **Estimated**: device memory beyond the weights (activations, the lesion/patching block-input
  caches, live gradients; formulas in `technique_extra_bytes`), with {reserve} per GPU
  reserved (assumed) for the CUDA context and allocator slack.
* **Time**: a forward pass costs `weight bytes / B + FLOP / F`; each technique's passes and
  FLOP follow from its algorithm (prefix reuse of the lesion and patching sweeps included,
  `technique_work`), times a per-technique ratio measured by `benchmarks/gpu.py` (measured
  time / modelled time). A model split over GPUs by `device_map` runs its blocks one GPU after
  the other, so it computes at one GPU's throughput. {costs_note}. **The times are estimates**; rerun
  `python benchmarks/gpu.py --json gpu.json` on the GPU and `medmap plan --costs gpu.json` to
  replace the assumed throughput with a measured one.
* **MXFP4** (GPT-OSS-120B): the forward-only techniques keep the packed expert weights; weight
  saliency needs gradients, so its weights are dequantised to bf16 on load and it runs as a job
  of its own on more GPUs.

## Summary ({gpus} × {mem} GPUs per node, `full` preset, bf16)

| model | params | weights (bf16) | GPUs: umap / saliency / lesion / patching | est. time |
|---|---|---|---|---|
"""

_DOC_TAIL = """
## How runs are spread

medmap runs one model per process. A model larger than one GPU is sharded by accelerate
(`device_map = "auto"` plus `max_memory`, see `configs/paper/`); many (model × technique ×
concept set) cells run as Ray tasks (`medmap map --ray ADDRESS`, `medmap sweep FILE`), each
writing its own Parquet part atomically into a run directory on a shared filesystem. A re-run
skips finished parts; Ray retries failed tasks (`max_retries=2`, both a task that raises and a
task whose worker process dies), and a cell that still fails ends the run with a one-line
error naming the cell. The schedules above treat each (model, technique) as one job on the
GPUs its technique needs and add one model load per job (weights read at an assumed
{load:.0f} GB/s); Ray's per-concept-set cells pack somewhat tighter.

**When the weights do not fit on the GPUs.** Give `max_memory` a CPU entry (and `offload_folder`
for `"disk"`): accelerate keeps the overflow blocks in CPU RAM or on disk and copies each onto
the GPU for its forward. All four techniques work on such a model and give the same numbers as
an unsplit one (`tests/test_device_map.py`). It is slow (every forward streams the offloaded
weights over PCIe or from disk); `medmap plan` does not plan offloaded runs and reports such a
config as not fitting.

**Out of memory.** Capture, lesion and patching halve a batch that runs out of memory and retry
the same items; the smaller size is kept for the rest of the run. Saliency runs one item per
backward pass, so out of memory there is reported with the item's index.

## Starting the cluster

```bash
# head node (shared filesystem mounted at /shared on every node)
ray start --head --port=6379 --num-gpus=8
# each worker node
ray start --address=HEAD_IP:6379 --num-gpus=8
# driver, anywhere on the cluster
medmap sweep configs/paper/sweep.toml --ray auto
medmap compare /shared/runs/* --out /shared/runs/compare
```

Every node needs the same medmap version and the models in its local HF cache
(`HF_HOME` on the shared filesystem works) — medmap never downloads at run time.
"""


def scaling_doc(plans: list[Plan], *, nodes: list[int], gpus_per_node: int, command: str) -> str:
    """docs/scaling.md: summary, one schedule per entry of ``nodes``, every model's plan."""
    costs = plans[0].costs
    text = _DOC_HEAD.format(
        command=command,
        cpt=costs.chars_per_token,
        reserve=_gib(GPU_RESERVE),
        costs_note=costs.note[0].upper() + costs.note[1:],
        gpus=gpus_per_node,
        mem=_gib(plans[0].gpu_mem),
    )
    for p in plans:
        by = {t.technique: t.gpus for t in p.techniques}
        g = " / ".join(str(by.get(t, "–")) for t in TECHNIQUES)
        w = _gb(p.weights_by_dtype["bfloat16"])
        if "mxfp4" in p.weights_by_dtype:
            w += f" (MXFP4: {_gb(p.weights_by_dtype['mxfp4'])})"
        text += f"| {p.name} | {_b(p.params.total)} | {w} | {g} | {_dur(p.seconds)} |\n"
    for n in nodes:
        slots = schedule(plans, nodes=n, gpus_per_node=gpus_per_node)
        where = "one node" if n == 1 else f"{n} nodes with Ray"
        text += f"\n## All models on {where}\n\n"
        text += schedule_markdown(plans, slots, nodes=n, gpus_per_node=gpus_per_node) + "\n"
    text += "\n## Per model\n\n"
    text += "\n\n".join(plan_markdown(p) for p in plans) + "\n"
    return text + _DOC_TAIL.format(load=ASSUMED_LOAD_BYTES_PER_S / 1e9)
