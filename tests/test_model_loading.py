import json

import pytest

from edgekv.errors import ModelLoadError, UnsupportedModelError
from edgekv.export.model_loading import load_model, resolve_model_path


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model_path(str(f))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x01" * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(str(f))
    assert not any((tmp_path / "cache").rglob("config.json"))  # nothing half-written kept


def test_hf_directory_without_tokenizer(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path))


def test_unsupported_architecture_directory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path))
