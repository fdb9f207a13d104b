"""Model loading and packaging: the bundled model, clear errors, the installed import names, lint."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import adapt_runtime as ar


def test_bundled_model_ships_with_provenance():
    folder = ar.bundled_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "PROVENANCE.md", "SHA256SUMS"):
        assert (folder / name).is_file(), name


def test_llama_alias_loads_offline(monkeypatch):
    """Offline mode on and every network connection refused: the bundled model still loads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    model, tokenizer = ar.load_model("llama")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 5
    assert not model.training and tokenizer.bos_token_id == 1
    assert tokenizer.decode(tokenizer("Once upon a time").input_ids, skip_special_tokens=True) == "Once upon a time"
    assert attempts == []


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "/nonexistent/dir/model"])
def test_unknown_model_is_one_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ar.ModelNotFoundError, match="'llama' works offline"):
        ar.load_model(name)


def test_folder_without_config_is_clear(tmp_path):
    with pytest.raises(ar.ModelNotFoundError, match="config.json"):
        ar.load_model(str(tmp_path))


def test_bad_dtype_is_clear():
    with pytest.raises(ValueError, match="dtype"):
        ar.load_model("llama", dtype="float7")


@pytest.mark.parametrize("name", ["kernels", "serving", "eval"])
def test_only_adapt_runtime_is_top_level(name):
    spec = importlib.util.find_spec(name)
    assert spec is None or "adapt_runtime" not in str(spec.origin or ""), f"a top-level {name!r} is installed"
    assert importlib.util.find_spec(f"adapt_runtime.{name}") is not None


@pytest.mark.skipif(shutil.which("ruff") is None and importlib.util.find_spec("ruff") is None, reason="no ruff")
def test_ruff_clean():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
