"""Find the parts of any Hugging Face causal LM: embedding, decoder blocks, final norm, unembedding.

Discovery is generic (the block list is the ``ModuleList`` whose length is the configured number
of layers; the final norm is the normalisation module that sits beside it); :data:`FINAL_NORM_NAMES`
is the small table of exceptions and spellings. The adapter never re-implements a model: it
only points at modules of the wrapped ``PreTrainedModel``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medmap.errors import MedmapError

# Attribute names used for the final normalisation by the supported families, tried in order.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_norm", "norm_f", "final_layernorm")
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
    """

    model: nn.Module
    embed: nn.Module
    blocks: nn.ModuleList
    blocks_path: str
    final_norm: nn.Module | None
    unembed: nn.Module
    logit_softcap: float | None = None

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
        h = self.final_norm(resid) if self.final_norm is not None else resid
        logits = self.unembed(h.to(self.unembed.weight.device))
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


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
