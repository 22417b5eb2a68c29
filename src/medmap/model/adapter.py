"""Find the parts of any Hugging Face causal LM: embedding, decoder blocks, final norm, unembedding.

Discovery is generic (the block list is the ``ModuleList`` whose length is the configured number
of layers; the final norm is the normalisation module that sits beside it; a block's attention
and MLP are its children of those names or classes); :data:`FINAL_NORM_NAMES`,
:data:`ATTN_NAMES`, :data:`MLP_NAMES`, :data:`EXPERT_NAMES` and :data:`ROUTER_NAMES` are the small
tables of spellings. The adapter is the only code in medmap that knows where things sit in an
architecture; it never re-implements a model: it only points at modules of the wrapped
``PreTrainedModel`` (and wraps accelerate's offload hooks, :func:`offloaded_modules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from medmap.errors import MedmapError

# Attribute names used for the final normalisation by the supported families, tried in order.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "final_layernorm")
# A block's attention and MLP (or mixture-of-experts) children, tried in order.
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "moe", "ffn")
# Inside a mixture: the experts (a ModuleList, or one module with fused (n_experts, ...) weights)
# and the router.
EXPERT_NAMES = ("experts",)
ROUTER_NAMES = ("router", "gate")
# Keyword arguments of a block call that are batch-major when their first dimension equals the
# batch size; only these may be repeated when interventions are stacked along the batch.
BATCH_MAJOR = frozenset(
    {
        "attention_mask",
        "causal_mask",
        "position_embeddings",
        "position_ids",
        "encoder_attention_mask",
    }
)
PARAM_KINDS = ("embed", "attn", "mlp", "expert", "router", "norm", "unembed", "other")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model", "dim")


@dataclass(eq=False)
class LayerAdapter:
    """Handles to the parts of a causal LM (no copies; modules are the model's own).

    Attributes:
        model: the HF ``*ForCausalLM`` module.
        embed: token embedding module (its output is scaled inside it for Gemma).
        blocks: the decoder blocks in order, ``len(blocks) == n_layers``.
        blocks_path: dotted path of the block list inside ``model``.
        final_norm: normalisation applied after the last block (``None`` if the model has none).
        unembed: output projection to vocabulary logits.
        logit_softcap: ``config.final_logit_softcapping`` if set (Gemma 2/3), applied after ``unembed``.
        base: the base model (``model.<base_model_prefix>``, the module that returns the
            final-normed ``last_hidden_state``), or ``model`` itself if it has none.
        batch_major: keyword names of block-call arguments that are batch-major
            (:data:`BATCH_MAJOR`).
    """

    model: nn.Module
    embed: nn.Module
    blocks: nn.ModuleList
    blocks_path: str
    final_norm: nn.Module | None
    unembed: nn.Module
    logit_softcap: float | None = None
    base: nn.Module | None = None
    batch_major: frozenset[str] = BATCH_MAJOR
    _kinds: dict[str, tuple[str, int | None]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.base is None:
            prefix = getattr(self.model, "base_model_prefix", "")
            base = getattr(self.model, prefix, None) if prefix else None
            self.base = base if isinstance(base, nn.Module) else self.model

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        cfg = _text_config(self.model.config)
        for key in _WIDTH_KEYS:
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return int(self.embed.weight.shape[1])

    def head(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual stream after the last block: final norm, unembed, softcap.

        ``resid``: ``(..., d_model)`` → ``(..., vocab)``; equals what the HF model computes.
        """
        return self.logits(resid)

    def logits(
        self,
        resid: torch.Tensor,
        positions: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        normed: bool = False,
    ) -> torch.Tensor:
        """Vocabulary logits at chosen positions only (final norm, unembedding, softcap).

        Args:
            resid: residual stream after the last block, ``(batch, seq, d_model)`` (or any
                ``(..., d_model)`` when ``positions`` is ``None``).
            positions: ``None`` = every position (output ``(..., vocab)``); a long tensor of
                ``batch`` column indices, one per row (output ``(batch, vocab)``); a ``(rows,
                cols)`` pair of long tensors (output ``(len(rows), vocab)``); or a boolean mask
                ``(batch, seq)`` (output ``(mask.sum(), vocab)``, row-major order).
            normed: ``resid`` has already been through the final norm (e.g. the base model's
                ``last_hidden_state``): skip it.
        """
        sel = _select(resid, positions)
        h = sel if normed or self.final_norm is None else self.final_norm(sel)
        out = self.unembed(h.to(self.unembed.weight.device))
        if self.logit_softcap:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out

    # -- sub-modules of a block -----------------------------------------------------------
    def attn(self, i: int) -> nn.Module:
        """Block ``i``'s attention sub-module (its output, first element of a tuple, is what
        the block adds to the residual stream, possibly after a post-attention norm)."""
        return _child(
            self.blocks[i], ATTN_NAMES, ("attention", "attn"), "attention", i, "ATTN_NAMES"
        )

    def mlp(self, i: int) -> nn.Module:
        """Block ``i``'s MLP sub-module; for a mixture-of-experts block, the whole mixture
        (router + experts + any shared expert), whose output is the mixture's output."""
        return _child(
            self.blocks[i], MLP_NAMES, ("mlp", "moe", "feedforward"), "MLP", i, "MLP_NAMES"
        )

    def experts(self, i: int) -> nn.Module | None:
        """The experts module of block ``i``'s mixture, ``None`` for a dense MLP."""
        mlp = self.mlp(i)
        for name in EXPERT_NAMES:
            mod = getattr(mlp, name, None)
            if isinstance(mod, nn.Module):
                return mod
        return None

    @property
    def n_experts(self) -> int | None:
        """Experts per mixture-of-experts block (``None`` for a dense model)."""
        cfg = _text_config(self.model.config)
        for key in ("num_local_experts", "num_experts", "n_routed_experts"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0 and self.experts(0) is not None:
                return v
        return None

    # -- parameter taxonomy ---------------------------------------------------------------
    def _kind_table(self) -> dict[str, tuple[str, int | None]]:
        # keyed by qualified name, not tensor id: accelerate swaps offloaded tensors per forward
        if self._kinds is not None:
            return self._kinds
        mod_name = {id(m): n for n, m in self.model.named_modules(remove_duplicate=False)}
        table: dict[str, tuple[str, int | None]] = {}

        def put(mod: nn.Module | None, kind: str, block: int | None) -> None:
            if mod is None or id(mod) not in mod_name:
                return
            prefix = mod_name[id(mod)]
            for pname, _ in mod.named_parameters(remove_duplicate=False):
                table.setdefault(f"{prefix}.{pname}" if prefix else pname, (kind, block))

        put(self.embed, "embed", None)
        for i, blk in enumerate(self.blocks):
            put(self.attn(i), "attn", i)
            experts = self.experts(i)
            if experts is not None:
                put(experts, "expert", i)
                mlp = self.mlp(i)
                for name in ROUTER_NAMES:
                    r = getattr(mlp, name, None)
                    put(r if isinstance(r, nn.Module) else None, "router", i)
            put(self.mlp(i), "mlp", i)  # a dense MLP, or a mixture's shared expert etc.
            for child in blk.modules():
                if _is_norm(child):
                    put(child, "norm", i)
            put(blk, "other", i)
        put(self.final_norm, "norm", None)
        put(self.unembed, "unembed", None)
        for mod in self.model.modules():  # e.g. GPT-2's position embedding
            if isinstance(mod, nn.Embedding):
                put(mod, "embed", None)
        self._kinds = table
        return table

    def _lookup(self, name: str) -> tuple[str, int | None]:
        got = self._kind_table().get(name)
        if got is None:
            self.model.get_parameter(name)  # raises AttributeError for an unknown name
            return ("other", None)
        if got[0] == "unembed" and self.unembed.weight is self.embed.weight:
            return ("embed", None)  # tied: one tensor, reported as the embedding
        return got

    def param_kind(self, name: str) -> str:
        """Part of the model a parameter (qualified name in ``model``) belongs to, from the module
        tree: one of :data:`PARAM_KINDS` (``'embed'``, ``'attn'``, ``'mlp'``, ``'expert'``,
        ``'router'``, ``'norm'``, ``'unembed'``, ``'other'``). Norms inside the attention
        (Qwen3's ``q_norm``) count as attention; a tied output matrix as ``'embed'``.
        """
        return self._lookup(name)[0]

    def param_block(self, name: str) -> int | None:
        """0-based block index of a parameter, ``None`` outside the blocks."""
        return self._lookup(name)[1]

    def expert_index(self, name: str) -> int | None:
        """The expert a parameter belongs to when experts are separate modules
        (``...experts.3.w1.weight`` → 3); ``None`` otherwise (see :meth:`fused_experts`)."""
        if self.param_kind(name) != "expert":
            return None
        m = re.search(r"(?:^|\.)experts\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def fused_experts(self, name: str) -> int | None:
        """Number of experts stacked along dim 0 of an expert parameter whose experts are fused
        into one tensor (transformers 5 GPT-OSS, Qwen3-MoE, Mixtral), else ``None``."""
        if self.param_kind(name) != "expert" or self.expert_index(name) is not None:
            return None
        n = self.n_experts
        p = self.model.get_parameter(name)
        return n if n is not None and p.dim() >= 2 and p.shape[0] == n else None


def _select(resid: torch.Tensor, positions) -> torch.Tensor:
    if positions is None:
        return resid
    if isinstance(positions, tuple):
        rows, cols = positions
        return resid[rows.to(resid.device), cols.to(resid.device)]
    if positions.dtype == torch.bool:
        return resid[positions.to(resid.device)]
    rows = torch.arange(resid.shape[0], device=resid.device)
    return resid[rows, positions.to(resid.device)]


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, nn.LayerNorm | nn.GroupNorm) or "norm" in type(mod).__name__.lower()


def _child(block: nn.Module, names, class_words, what: str, i: int, table: str) -> nn.Module:
    for name in names:
        mod = getattr(block, name, None)
        if isinstance(mod, nn.Module):
            return mod
    for _, mod in block.named_children():
        cls = type(mod).__name__.lower()
        if any(w in cls for w in class_words) and "norm" not in cls:
            return mod
    raise MedmapError(
        f"cannot find the {what} sub-module of block {i} ({type(block).__name__})",
        hint=f"add its attribute name to medmap.model.adapter.{table}",
    )


# -- accelerate offload hooks (the one place that touches accelerate's private attributes) --
def _offload_hooks(module: nn.Module) -> list:
    """accelerate hooks of ``module`` that swap its weights in per forward (``offload=True``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    hooks = getattr(hook, "hooks", None) or [hook]  # SequentialHook or a single hook
    return [h for h in hooks if getattr(h, "offload", False)]


def offloaded_modules(root: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(qualified name, module, recurse)`` for every module whose weights accelerate offloads.

    ``recurse`` tells whether the hook also materialises the sub-modules' weights.
    """
    out = []
    for name, mod in root.named_modules():
        hooks = _offload_hooks(mod)
        if hooks and hasattr(mod, "_old_forward"):
            out.append((name, mod, any(getattr(h, "place_submodules", False) for h in hooks)))
    return out


def wrap_offloaded_forward(mod: nn.Module, wrap: Callable[[Callable], Callable]) -> Callable:
    """Replace the forward that accelerate calls once an offloaded module's weights are in place
    (``_old_forward``) by ``wrap(inner)``; returns ``inner`` for :func:`restore_offloaded_forward`."""
    inner = mod._old_forward
    mod._old_forward = wrap(inner)
    return inner


def restore_offloaded_forward(mod: nn.Module, inner: Callable) -> None:
    """Undo :func:`wrap_offloaded_forward`."""
    mod._old_forward = inner


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _n_layers_from_config(config) -> int | None:
    cfg = _text_config(config)
    for key in _LAYER_COUNT_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def find_layers(model: nn.Module) -> LayerAdapter:
    """Locate embedding, blocks, final norm and unembedding of a HF causal LM.

    Raises :class:`MedmapError` if the module tree has no recognisable block list.
    """
    n_cfg = _n_layers_from_config(model.config)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            if len(kinds) == 1 and (n_cfg is None or len(module) == n_cfg):
                candidates.append((name, module))
    if not candidates:
        raise MedmapError(
            f"cannot find the decoder blocks of {type(model).__name__}",
            hint="medmap supports HF causal LMs whose blocks are a ModuleList of num_hidden_layers entries",
        )
    # The outermost matching list is the decoder stack (inner lists would be experts/heads).
    blocks_path, blocks = min(candidates, key=lambda c: c[0].count("."))

    parent = model.get_submodule(blocks_path.rsplit(".", 1)[0]) if "." in blocks_path else model
    final_norm = None
    for attr in FINAL_NORM_NAMES:
        mod = getattr(parent, attr, None)
        if isinstance(mod, nn.Module):
            final_norm = mod
            break
    if final_norm is None:  # generic fallback: a child of the parent whose class is a norm
        for _, child in parent.named_children():
            if "norm" in type(child).__name__.lower():
                final_norm = child
    embed = model.get_input_embeddings()
    unembed = model.get_output_embeddings()
    if embed is None or unembed is None:
        raise MedmapError(
            f"{type(model).__name__} has no input/output embeddings; is it a causal LM?"
        )
    softcap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    return LayerAdapter(
        model=model,
        embed=embed,
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=final_norm,
        unembed=unembed,
        logit_softcap=float(softcap) if softcap else None,
    )
