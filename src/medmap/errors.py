"""User-facing errors.

Every problem caused by the user's input (a model spec, a concept file, a config, an output
directory) raises :class:`MedmapError`. The CLI prints its one-line message and exits with
code 2; programming errors keep their traceback.
"""

from __future__ import annotations


class MedmapError(Exception):
    """A problem with the user's input, explained in one line (what is wrong and how to fix it)."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class ConceptFileError(MedmapError):
    """A concept file is malformed; the message names the file, the row/line and the field."""


class ModelLoadError(MedmapError):
    """A model spec cannot be resolved or its weights cannot be read safely."""


class ConfigError(MedmapError):
    """A run configuration is invalid."""
