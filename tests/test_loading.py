"""load_model: local directories, safety defaults, and a clear error for every bad spec."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import medmap
from medmap.cli import main
from medmap.errors import MedmapError, ModelLoadError
from tiny import make_hf, tokenizer


@pytest.fixture
def tiny_dir(tmp_path):
    hf = make_hf("llama")
    d = tmp_path / "tiny-llama"
    hf.save_pretrained(d)
    tokenizer().save_pretrained(d)
    return d, hf


def test_local_directory_roundtrip(tiny_dir):
    d, hf = tiny_dir
    m = medmap.load_model(d, attn_implementation="eager")
    assert (m.n_layers, m.d_model) == (3, 64)
    enc = m.tokenizer("Metformin is a first-line treatment for", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(m.hf(**enc).logits, hf(**enc).logits)
    assert len(m.weights_hash) == 64
    assert not any(p.requires_grad for p in m.hf.parameters())


def test_gguf_cache_tokenizer_is_read_in_one_parse(tmp_path, monkeypatch):
    """A convert_gguf cache directory's tokenizer comes from tokenizer.json directly, with the
    chat template file and the named class's padding side; other directories use AutoTokenizer."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from medmap.model.loading import _load_tokenizer_of

    d = tmp_path / "cache"
    tokenizer().save_pretrained(d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "tokenizer_class": "GemmaTokenizer"})
    )
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    (d / "medmap_source.json").write_text("{}")

    def no_auto(*a, **k):
        raise AssertionError("AutoTokenizer used for a GGUF cache directory")

    with monkeypatch.context() as mp:
        mp.setattr(AutoTokenizer, "from_pretrained", no_auto)
        tok = _load_tokenizer_of(d, "gguf", False)
    assert type(tok) is TokenizersBackend
    assert tok.padding_side == "left"  # GemmaTokenizer's, not the generic default "right"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
    text = "Metformin 500 mg twice daily"
    assert (
        tok(text, return_offsets_mapping=True).data
        == tokenizer()(text, return_offsets_mapping=True).data
    )
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert type(_load_tokenizer_of(d, "dir", False)).__name__ == "GemmaTokenizer"


def test_unknown_alias_lists_aliases():
    with pytest.raises(
        ModelLoadError, match=r"unknown model 'llama-9000'.*gemma3-270m, smollm2-135m"
    ):
        medmap.load_model("llama-9000")


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        medmap.load_model("./no/such/model.gguf")


def test_hub_id_not_cached_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        ModelLoadError, match="not in the local Hugging Face cache.*hf download acme/med-7b"
    ):
        medmap.load_model("acme/med-7b")


def test_corrupt_and_truncated_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMAP_CACHE", str(tmp_path / "cache"))
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelLoadError, match="truncated"):
        medmap.load_model(short)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        medmap.load_model(junk)
    assert not list((tmp_path / "cache").glob("gguf/*"))  # nothing half-converted is left


def test_truncated_safetensors(tiny_dir):
    d, _ = tiny_dir
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        medmap.load_model(d)


def test_pickle_weights_refused_unless_allowed(tmp_path):
    hf = make_hf("llama")
    d = tmp_path / "pickled"
    d.mkdir()
    hf.config.save_pretrained(d)
    tokenizer().save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights .*allow_pickle=True"):
        medmap.load_model(d)
    with pytest.raises(ModelLoadError, match="pickle checkpoint"):
        medmap.load_model(d / "pytorch_model.bin")
    m = medmap.load_model(d, allow_pickle=True, attn_implementation="eager")
    enc = m.tokenizer("Hi there", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(m.hf(**enc).logits, hf(**enc).logits)


def test_remote_code_needs_opt_in(tiny_dir):
    d, _ = tiny_dir
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "acme_medical"
    cfg["auto_map"] = {
        "AutoConfig": "modeling_acme.AcmeConfig",
        "AutoModelForCausalLM": "modeling_acme.AcmeLM",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_acme.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelLoadError, match="needs code from its repository.*trust_remote_code"):
        medmap.load_model(d)


def test_bad_dtype_and_device_conflict(tiny_dir):
    d, _ = tiny_dir
    with pytest.raises(ModelLoadError, match="unknown dtype 'float13'"):
        medmap.load_model(d, dtype="float13")
    with pytest.raises(ModelLoadError, match="either device or device_map"):
        medmap.load_model(d, device="cpu", device_map="auto")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        medmap.load_model(tmp_path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["capture", "-m", "nope", "--out", "OUT", "-p", "hi"], "unknown model 'nope'"),
        (["capture", "-m", "smollm2-135m", "--out", "OUT"], "no prompts given"),
        (["capture", "-m", "./missing-dir", "--out", "OUT", "-p", "x"], "does not exist"),
        (
            ["capture", "-m", "x", "--out", "OUT", "-p", "x", "--layers", "a,b"],
            "comma-separated integers",
        ),
    ],
)
def test_cli_user_errors_exit_2(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medmap.cli",
            "capture",
            "-m",
            "nope",
            "--out",
            str(tmp_path / "o"),
            "-p",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown model 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_errors_are_medmap_errors():
    assert issubclass(ModelLoadError, MedmapError) and MedmapError.exit_code == 2
