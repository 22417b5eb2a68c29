"""Bundled run presets (TOML)."""
