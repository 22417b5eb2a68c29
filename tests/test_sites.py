"""Sub-module sites in the config, the command line and the knowledge map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medmap.analysis.maps import knowledge_map
from medmap.analysis.results import make_rows
from medmap.errors import ConfigError, MedmapError
from medmap.run.config import build_config
from test_causal_resume import fake_cli  # noqa: F401  (fixture: tiny model + fake set)


def _lesion_rows(cset: str, site: str | None, values: list[float], n: int = 4) -> list[dict]:
    rows = []
    for layer, v in zip(range(1, n + 1), values):
        r = {
            "model": "m",
            "layer": layer,
            "relative_depth": layer / n,
            "concept_set": cset,
            "technique": "lesion",
            "metric": "delta_nll",
            "value": v,
            "window": 1,
        }
        if site is not None:
            r["site"] = site
        rows.append(r)
    return rows


def test_map_shows_submodule_rows_only_when_run_and_keeps_the_block_rows():
    block = _lesion_rows("drugs", "block", [4, 2, 1, 0]) + _lesion_rows(
        "animals", "block", [0, 1, 2, 4]
    )
    before = knowledge_map(make_rows(block))
    assert list(before.matrix("lesion", "m").index) == ["drugs", "animals"]
    attn = _lesion_rows("drugs", "attn", [0, 0, 3, 1]) + _lesion_rows("drugs", "mlp", [1, 0, 0, 0])
    after = knowledge_map(make_rows(block + attn))
    m = after.matrix("lesion", "m")
    assert list(m.index) == ["drugs", "drugs / attn", "drugs / mlp", "animals"]
    np.testing.assert_allclose(m.loc["drugs / attn"].to_numpy(), [0, 0, 1, 1 / 3])
    np.testing.assert_allclose(m.loc["drugs"].to_numpy(), before.matrix("lesion", "m").loc["drugs"])
    # the combined map and the contrast use the block rows only: unchanged by the extra sites
    pd.testing.assert_frame_equal(after.matrix("combined", "m"), before.matrix("combined", "m"))
    pd.testing.assert_frame_equal(after.contrast, before.contrast)
    # tables written before the site column: block rows
    old = knowledge_map(make_rows(_lesion_rows("drugs", None, [4, 2, 1, 0])))
    assert list(old.matrix("lesion", "m").index) == ["drugs"]


def test_patching_transfer_rows_per_site():
    rows = []
    for site in ("block", "mlp"):
        for pos, vals in (("concept", [1.0, 0.5, 0.0]), ("last", [0.0, 0.5, 1.0])):
            for layer, v in zip((1, 2, 3), vals):
                rows.append(
                    {
                        "model": "m", "layer": layer, "relative_depth": layer / 3,
                        "concept_set": "drugs", "technique": "patching", "metric": "restored",
                        "value": v if site == "block" else v / 2, "position": pos,
                        "direction": "denoise", "site": site,
                    }
                )  # fmt: skip
    m = knowledge_map(make_rows(rows)).matrix("patching", "m")
    assert list(m.index) == ["drugs", "drugs / mlp"]
    np.testing.assert_allclose(m.loc["drugs"].to_numpy(), [0, 1, 1])


def test_config_sites():
    cfg = build_config()
    assert cfg.lesion_sites == ["block"] and cfg.patch_sites == ["block"]
    cfg = build_config(lesion_sites=["attn", "mlp", "attn"], patch_sites=["mlp"])
    assert cfg.lesion_sites == ["attn", "mlp"] and cfg.patch_sites == ["mlp"]
    with pytest.raises(ConfigError, match="lesion_sites"):
        build_config(lesion_sites=["heads"])
    with pytest.raises(ConfigError, match="patch_sites"):
        build_config(patch_sites=[])


def test_cli_site_option_is_checked_before_loading(tmp_path):
    from medmap.cli import main
    from medmap.cli.causal import _sites

    assert _sites("attn, mlp,attn") == ["attn", "mlp"]
    with pytest.raises(MedmapError, match="unknown site 'heads'"):
        _sites("block,heads")
    args = ["-m", "nope", "-c", "drugs", "-o", str(tmp_path / "o"), "--site", "heads"]
    assert main(["lesion", *args]) == 2 and main(["patch", *args]) == 2


def test_cli_lesion_and_patch_sites(fake_cli, tmp_path):  # noqa: F811
    """``--site attn,mlp`` runs through config and technique: rows carry the site and equal
    the library call."""
    from medmap.cli import main
    from medmap.techniques import lesion
    from test_causal_resume import PROMPTS, TARGETS

    out = tmp_path / "les"
    args = ["lesion", "-m", "x", "-c", "fake", "--max-items", "2", "-o", str(out), "--n-boot"]
    assert main([*args, "20", "--site", "attn,mlp"]) == 0
    tidy = pd.read_parquet(out / "results.parquet")
    items = pd.read_parquet(out / "items.parquet")
    assert set(tidy["site"]) == {"attn", "mlp"} and set(items["site"]) == {"attn", "mlp"}
    ref = lesion(fake_cli, PROMPTS[:2], TARGETS[:2], site="mlp")
    got = items[items["site"] == "mlp"].sort_values(["layer", "item"])
    np.testing.assert_allclose(got["nll_lesioned"], ref["nll_lesioned"], rtol=1e-6)
    pargs = ["patch", "-m", "x", "-c", "fake", "--max-pairs", "2", "-o", str(tmp_path / "p")]
    assert main([*pargs, "--n-boot", "20", "--site", "block,attn"]) == 0
    pt = pd.read_parquet(tmp_path / "p" / "results.parquet")
    pt = pt[pt["technique"] == "patching"]  # without the split-half stability rows (layer -1)
    assert set(pt["site"]) == {"block", "attn"}
    assert set(pt.loc[pt["site"] == "attn", "layer"]) == {1, 2, 3}
    assert set(pt.loc[pt["site"] == "block", "layer"]) == {0, 1, 2, 3}


def test_nested_traces_each_swallow_only_their_own_stop():
    import torch

    from medmap.model.sites import Trace, count_hooks
    from medmap.model.tokens import encode
    from tiny import make_tiny

    m = make_tiny("qwen3")
    inp = encode(m.tokenizer, ["A dog is a mammal."]).model_inputs()
    outer = Trace(m.adapter, ["resid_pre.1"], stop_after="resid_pre.1")
    inner = Trace(m.adapter, ["mlp_out.0", "mlp_out.2"])
    with torch.no_grad(), outer, inner:
        m.hf(**inp)
        raise AssertionError("the forward pass should have stopped")  # pragma: no cover
    assert set(inner.values) == {inner.sites[0]} and count_hooks(m.hf) == 0
    with torch.no_grad(), Trace(m.adapter, ["mlp_out.2"]) as full:
        m.hf(**inp)
    assert outer["resid_pre.1"].shape == full["mlp_out.2"].shape  # read before the stop
