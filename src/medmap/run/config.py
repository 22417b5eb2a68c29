"""Run configuration for ``medmap map``: a TOML file validated with pydantic, plus presets.

Precedence: preset (``quick``/``standard``/``full``) < config file < command-line options.
Unknown keys and wrong types are errors naming the key.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from medmap.errors import ConfigError
from medmap.techniques.base import technique_names


def _registered(name: str) -> str:
    """A technique name registered in :mod:`medmap.techniques.base` (checked when validated, so
    a technique registered at run time is accepted too)."""
    names = technique_names()
    if name not in names:
        expected = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}"
        raise PydanticCustomError(
            "literal_error", "Input should be {expected}", {"expected": expected}
        )
    return name


Technique = Annotated[str, AfterValidator(_registered)]
PRESETS = ("quick", "standard", "full")
CAUSAL = ("saliency", "lesion", "patching")  # the stages that run on known targets only


class RunConfig(BaseModel):
    """Everything that determines a run's results (recorded in the manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "smollm2-135m"
    concept_sets: list[str] | None = Field(default=None, description="None = every bundled set")
    techniques: list[Technique] = ["knows", "umap", "saliency", "lesion", "patching"]
    known_only: bool = Field(
        default=True,
        description="causal techniques use only the targets the model knows (the knows stage)",
    )
    min_known: int = Field(
        default=8, ge=1, description="fewer known targets: the set is 'too few known facts'"
    )
    knows_max_items: int | None = Field(
        default=None,
        ge=2,
        description="items per set the knows stage scores (stratified; None: the whole set); "
        "the causal stages draw max_items from its known ones",
    )
    knows_distractors: int = Field(
        default=4, ge=1, description="distractors per target in forced choice (seeded sample)"
    )
    generic_sentences: int | None = Field(
        default=200, ge=1, description="neutral sentences for the lesions' generic damage"
    )
    saliency_objectives: list[Literal["nll", "margin"]] = Field(
        default=["nll", "margin"],
        description="saliency of the answer's NLL and/or of its forced-choice margin",
    )
    max_items: int | None = Field(
        default=None, ge=2, description="items per concept set (stratified)"
    )
    max_templates: int | None = Field(
        default=None, ge=1, description="templates per item for representations"
    )
    umap_max_items: int | None = Field(
        default=None, ge=3, description="items per set for representation maps (None: max_items)"
    )
    max_targets: int | None = Field(
        default=None, ge=1, description="targets per item for the causal techniques (first k)"
    )
    position: Literal["concept", "last"] = "concept"
    umap: bool = True
    n_boot: int = Field(default=200, ge=10)
    saliency_items: int | None = Field(default=None, ge=1, description="items per set for saliency")
    lesion_window: int = Field(default=1, ge=1)
    lesion_k: int = Field(default=5, ge=1, description="top-k accuracy of the lesion metrics")
    patch_positions: list[Literal["last", "concept", "all"]] = ["last", "concept"]
    patch_direction: Literal["denoise", "noise"] = "denoise"
    lesion_sites: list[Literal["block", "attn", "mlp"]] = Field(
        default=["block"], description="what a lesion removes: whole blocks, attention, MLP"
    )
    patch_sites: list[Literal["block", "attn", "mlp"]] = Field(
        default=["block"], description="what patching copies: residual stream, attention, MLP"
    )
    max_pairs: int = Field(default=32, ge=1)
    seed: int = 0
    batch_size: int = Field(default=16, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    device: str | None = None
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, str] | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("techniques")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one technique is needed")
        return list(dict.fromkeys(v))

    @field_validator("saliency_objectives")
    @classmethod
    def _some_objective(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one saliency objective (nll, margin) is needed")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _knows_first(self) -> RunConfig:
        # known-only causal stages read the knows stage: it is part of every such run
        if (
            self.known_only
            and set(self.techniques) & set(CAUSAL)
            and "knows" not in self.techniques
        ):
            object.__setattr__(self, "techniques", ["knows", *self.techniques])
        return self

    @field_validator("lesion_sites", "patch_sites")
    @classmethod
    def _some_site(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one site (block, attn, mlp) is needed")
        return list(dict.fromkeys(v))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist", hint="check the path given to --config"
        ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"config file {path} is not valid TOML: {e}",
            hint="fix the syntax (https://toml.io); keys are listed in docs/config.md",
        ) from None


def preset(name: str) -> dict[str, Any]:
    """The settings of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}", hint=f"use one of {', '.join(PRESETS)}")
    text = (
        resources.files("medmap.run.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    )
    return tomllib.loads(text)


def build_config(
    *, preset_name: str | None = None, config_file: Path | None = None, **overrides: Any
) -> RunConfig:
    """Merge preset, config file and overrides (``None`` overrides are ignored) and validate."""
    data: dict[str, Any] = {}
    if preset_name:
        data.update(preset(preset_name))
    source = "preset"
    if config_file is not None:
        data.update(_read_toml(Path(config_file)))
        source = str(config_file)
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return RunConfig(**data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "config"
        top = str(err["loc"][0]) if err["loc"] else ""
        if top in given:
            source = f"option --{top.replace('_', '-')}"
        kind = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ConfigError(
            f"{source}: {key!r}: {kind}", hint="see docs/config.md for the keys and their types"
        ) from None
