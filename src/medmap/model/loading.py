"""Load a causal LM safely and offline: bundled aliases, local directories, GGUF files, cached hub ids.

GGUF weights are dequantised once and cached as safetensors in the user cache directory
(``$MEDMAP_CACHE`` or the platform cache dir), keyed by the GGUF file's SHA-256, so later
loads take a few seconds (BENCHMARKS.md). Pickle checkpoints are refused unless
``allow_pickle=True`` and remote code runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmap.errors import ModelLoadError
from medmap.model.adapter import LayerAdapter, find_layers
from medmap.model.registry import BUNDLED_MODELS

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@dataclass(eq=False)
class MedmapModel:
    """A loaded model: the HF module, its tokenizer and handles to its layers.

    Attributes:
        hf: the ``transformers`` causal LM (eval mode, gradients off for parameters by default).
        tokenizer: its tokenizer (fast tokenizer, offsets available).
        name: alias or path it was loaded from.
        adapter: :class:`LayerAdapter` with embedding, blocks, final norm, unembedding.
        weights_hash: SHA-256 (hex) identifying the weights (GGUF file or safetensors index).
        source: the local path the weights came from.
    """

    hf: Any
    tokenizer: Any
    name: str
    adapter: LayerAdapter
    weights_hash: str = ""
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return self.adapter.d_model

    @property
    def input_device(self) -> torch.device:
        """Device of the input embedding (where token ids must be placed)."""
        return self.adapter.embed.weight.device

    @property
    def max_length(self) -> int | None:
        """Longest context in tokens, if the config says."""
        cfg = (
            self.hf.config.get_text_config()
            if hasattr(self.hf.config, "get_text_config")
            else self.hf.config
        )
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def __repr__(self) -> str:
        return f"MedmapModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model})"


def cache_root() -> Path:
    """Root of medmap's cache (``$MEDMAP_CACHE`` or the platform's user cache dir)."""
    env = os.environ.get("MEDMAP_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("medmap"))


def file_sha256(path: Path, *, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) in the cache to keep reloads fast."""
    st = path.stat()
    memo_dir = cache_root() / "hashes"
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / f"{key}.txt"
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    memo_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(memo, digest)
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype named by ``dtype`` (``None``/``"auto"`` = the default); raises for others."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(sorted(_DTYPES))}"
        ) from None


def gguf_cache_dir(gguf: Path) -> Path:
    """Cache directory of the safetensors copy of ``gguf`` (keyed by its content hash)."""
    return cache_root() / "gguf" / file_sha256(gguf)[:24]


def convert_gguf(gguf: Path, *, progress: bool = True) -> Path:
    """Dequantise a GGUF file once into a safetensors model directory in the cache; return it.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the quantizer state is
    dropped first (the weights are already dequantised to float; tests check that the reloaded
    logits are identical). The directory is written under a temporary name and renamed.
    """
    target = gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        from rich.console import Console

        Console(stderr=True).print(
            f"[dim]dequantising {gguf.name} once into {target} (later loads are fast)…[/]"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # gguf reader / transformers raise many types for a bad file
        raise ModelLoadError(
            f"cannot read GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
            hint="the file is corrupt, truncated or not a supported GGUF architecture",
        ) from e
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.medmap_source_gguf = gguf.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "medmap_source.json").write_text(
            json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}, indent=1)
        )
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# tokenizer_config.json entries that describe how the config was saved, not the tokenizer.
_NOT_TOKENIZER_INIT = (
    "tokenizer_class",
    "is_local",
    "local_files_only",
    "auto_map",
    "name_or_path",
)


def _cached_gguf_tokenizer(path: Path):
    """The tokenizer of a :func:`convert_gguf` cache directory, from one parse of tokenizer.json.

    transformers' model-specific tokenizer classes (e.g. ``GemmaTokenizer``) rebuild their
    backend from the vocabulary and merges they extract from tokenizer.json in Python, which
    parses the file three times (about 3 s for Gemma-3's 262k-token vocabulary). The cache's
    tokenizer.json was written by :func:`convert_gguf` from exactly that rebuilt backend, so the
    generic ``TokenizersBackend`` loading it directly is the same tokenizer (tests compare ids,
    offsets, decoding, special tokens and chat template on every bundled prompt). The class's
    own defaults that live outside tokenizer.json (padding and truncation side) are carried over.
    """
    import transformers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    init = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    cls = getattr(transformers, str(init.get("tokenizer_class")), None)
    for key in _NOT_TOKENIZER_INIT:
        init.pop(key, None)
    for attr in ("padding_side", "truncation_side"):
        if cls is not None and attr not in init:
            init[attr] = getattr(cls, attr)
    template = path / "chat_template.jinja"
    if template.exists() and "chat_template" not in init:
        init["chat_template"] = template.read_text(encoding="utf-8")
    return TokenizersBackend(
        tokenizer_file=str(path / "tokenizer.json"), name_or_path=str(path), **init
    )


def _with_pad_token(tok):
    """``tok`` with its EOS token as padding token if it has none (batched prompts need one)."""
    if getattr(tok, "pad_token_id", None) is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def _load_tokenizer_of(path: Path, kind: str, trust_remote_code: bool):
    """The tokenizer of a resolved model directory (``kind`` from :func:`resolve_spec`)."""
    if kind == "gguf" and (path / "medmap_source.json").exists():
        return _with_pad_token(_cached_gguf_tokenizer(path))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return _with_pad_token(tok)


def _weights_hash_of_dir(path: Path) -> str:
    src = path / "medmap_source.json"
    if src.exists():
        return json.loads(src.read_text())["sha256"]
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}".encode())
        with open(f, "rb") as fh:  # header + first MiB: cheap and changes with any re-save
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _check_local_dir(path: Path, allow_pickle: bool) -> None:
    if not (path / "config.json").exists():
        raise ModelLoadError(
            f"{path} has no config.json",
            hint="point to a Hugging Face model directory, a .gguf file or a bundled alias",
        )
    safet = list(path.glob("*.safetensors"))
    pickles = [
        p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and "training_args" not in p.name
    ]
    if not safet and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({pickles[0].name}), which can run arbitrary code",
            hint="convert them to safetensors, or pass allow_pickle=True / --allow-pickle if you trust the file",
        )
    if not safet and not pickles:
        raise ModelLoadError(
            f"{path} holds no weights (*.safetensors)",
            hint="save the model there with save_pretrained(), or point to the directory holding its weights",
        )


def resolve_spec(spec: str, allow_pickle: bool) -> tuple[str, Path, str]:
    """Return (kind, local path, display name) for a model spec; kind in {'gguf', 'dir'}.

    Checks only what can be checked without loading (the spec exists, safe weight files);
    raises :class:`ModelLoadError` otherwise.
    """
    if spec in BUNDLED_MODELS:
        return "gguf", BUNDLED_MODELS[spec].gguf_path(), spec
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            _check_local_dir(path, allow_pickle)
            return "dir", path, str(path)
        if path.suffix == ".gguf":
            return "gguf", path, str(path)
        if path.suffix == ".safetensors":
            _check_local_dir(path.parent, allow_pickle)
            return "dir", path.parent, str(path.parent)
        if path.suffix in _PICKLE_SUFFIXES:
            if not allow_pickle:
                raise ModelLoadError(
                    f"{path} is a pickle checkpoint, which can run arbitrary code",
                    hint="use safetensors/GGUF weights, or pass allow_pickle=True / --allow-pickle if you trust it",
                )
            _check_local_dir(path.parent, True)
            return "dir", path.parent, str(path.parent)
        raise ModelLoadError(
            f"{path} is not a model directory, .gguf or .safetensors file",
            hint="give a Hugging Face model directory, a .gguf file or a bundled alias",
        )
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".safetensors"))
    if "/" in spec and not looks_like_path and spec.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(spec, local_files_only=True))
        except Exception:
            raise ModelLoadError(
                f"hub model '{spec}' is not in the local Hugging Face cache and medmap runs offline",
                hint=f"fetch it on a machine with network: `hf download {spec}` (then copy the cache), or pass a local directory",
            ) from None
        _check_local_dir(local, allow_pickle)
        return "dir", local, spec
    if looks_like_path:
        raise ModelLoadError(
            f"model path {spec} does not exist",
            hint=f"check the path, or use a bundled alias ({', '.join(sorted(BUNDLED_MODELS))})",
        )
    aliases = ", ".join(sorted(BUNDLED_MODELS))
    raise ModelLoadError(
        f"unknown model '{spec}'",
        hint=f"bundled aliases: {aliases}; or give a local directory, a .gguf file or a cached hub id",
    )


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    dequantize: bool = False,
) -> MedmapModel:
    """Load a causal LM for interpretability work.

    Args:
        spec: bundled alias (``smollm2-135m``, ``gemma3-270m``), local HF directory, ``.gguf``
            file, or hub id present in the local HF cache.
        dtype: ``float32`` (default on CPU), ``bfloat16``, ``float16`` or a torch dtype.
        device: single device to place the model on (default CPU).
        device_map / max_memory: passed to accelerate to shard a large model over GPUs/CPU/disk
            (``"auto"``, ``"balanced"`` or an explicit map); excludes ``device``.
        offload_folder: where accelerate keeps weights mapped to ``"disk"``.
        allow_pickle: allow ``*.bin``/``*.pt`` checkpoints (unsafe: pickle can run code).
        trust_remote_code: allow model code from the checkpoint's repository.
        attn_implementation: e.g. ``"eager"`` or ``"sdpa"`` (transformers' default otherwise).
        dequantize: unpack MXFP4 checkpoints (GPT-OSS experts) to ``dtype`` while loading, as the
            gradient techniques need (saliency). Where MXFP4 kernels exist (GPU with Triton),
            transformers otherwise keeps the experts packed; without them it dequantises anyway.
            Memory: about 3.8x the packed expert weights in bf16 (docs/sites.md).

    Raises:
        ModelLoadError: the spec cannot be resolved or the weights cannot be read safely.
    """
    from transformers import AutoModelForCausalLM

    spec = str(spec)
    t0 = time.perf_counter()
    kind, path, name = resolve_spec(spec, allow_pickle)
    source = path
    if kind == "gguf":
        if path.stat().st_size < 1024:
            raise ModelLoadError(
                f"GGUF file {path} is truncated ({path.stat().st_size} bytes)",
                hint="re-download the file (or reinstall the bundled model's package)",
            )
        path = convert_gguf(path)
    torch_dtype = resolve_dtype(dtype) or torch.float32
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": not allow_pickle or any(path.glob("*.safetensors")),
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dequantize and _quant_method(path) == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    if device_map is not None:
        if device is not None:
            raise ModelLoadError("give either device or device_map, not both")
        kwargs["device_map"] = device_map
        if max_memory:
            # TOML/JSON keys are strings; accelerate wants GPU indices as ints.
            kwargs["max_memory"] = {
                int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()
            }
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = _load_tokenizer_of(path, kind, trust_remote_code)
    except ModelLoadError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"model {name} needs code from its repository to load",
                hint="pass trust_remote_code=True / --trust-remote-code only if you trust that code",
            ) from e
        raise ModelLoadError(
            f"cannot load weights of {name}: {type(e).__name__}: {msg[:200]}",
            hint="the weights may be corrupt or truncated; re-download or re-convert them",
        ) from e
    if device is not None and device_map is None:
        hf.to(device)
    hf.eval()
    hf.requires_grad_(False)
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(
            f"tokenizer of {name} is not a fast tokenizer; medmap needs character offsets",
        )
    adapter = find_layers(hf)
    return MedmapModel(
        hf=hf,
        tokenizer=tokenizer,
        name=name,
        adapter=adapter,
        weights_hash=file_sha256(source) if kind == "gguf" else _weights_hash_of_dir(path),
        source=str(source),
        info={"load_seconds": time.perf_counter() - t0, "kind": kind, "weights_dir": str(path)},
    )


def _quant_method(path: Path) -> str | None:
    """``quantization_config.quant_method`` of a checkpoint directory's config.json, if any."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return q.get("quant_method") if isinstance(q, dict) else None


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """The (fast) tokenizer of a model spec, without loading its weights."""
    kind, path, name = resolve_spec(str(spec), allow_pickle=False)
    if kind == "gguf":
        path = convert_gguf(path)
    try:
        return _load_tokenizer_of(path, kind, trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {name}: {type(e).__name__}") from e


def wrap_model(hf, tokenizer, name: str = "model") -> MedmapModel:
    """Wrap an already-loaded HF causal LM and tokenizer (e.g. a test model) as a MedmapModel."""
    hf.eval()
    _with_pad_token(tokenizer)
    return MedmapModel(hf=hf, tokenizer=tokenizer, name=name, adapter=find_layers(hf))
