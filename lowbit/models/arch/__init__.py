"""The architecture registry: one file per family in this package, each declaring `ARCHITECTURE` (or a tuple
`ARCHITECTURES`); every consumer asks here (`architecture_for`) instead of keeping a list of its own.
Adding a family = adding a file; it is found by scanning the package."""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any

from lowbit.errors import UnsupportedArchitecture
from lowbit.models.arch.base import Architecture

__all__ = ["Architecture", "architecture_for", "architecture_for_gguf", "all_architectures", "supported_families"]


@lru_cache(maxsize=1)
def all_architectures() -> tuple[Architecture, ...]:
    found: list[Architecture] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += list(getattr(module, "ARCHITECTURES", ())) or [module.ARCHITECTURE]
    return tuple(found)


@lru_cache(maxsize=1)
def _by_model_type() -> dict[str, Architecture]:
    return {t: a for a in all_architectures() for t in a.model_types}


def supported_families() -> str:
    return ", ".join(sorted(_by_model_type()))


def architecture_for(model_or_type: Any) -> Architecture:
    """The architecture of a model, a config, or a config.json model_type; a clear error naming the
    supported ones otherwise."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None)
    arch = _by_model_type().get(model_type)
    if arch is None:
        raise UnsupportedArchitecture(f"architecture {model_type!r} is not supported; lowbit supports "
                                      f"{supported_families()}")
    return arch


def gguf_families() -> dict[str, list[Architecture]]:
    out: dict[str, list[Architecture]] = {}
    for a in all_architectures():
        if a.gguf is not None:
            out.setdefault(a.gguf.name, []).append(a)
    return out


def architecture_for_gguf(gguf_arch: Any, metadata: dict[str, Any]) -> Architecture:
    """The family of a GGUF file from its general.architecture (and, for llama.cpp's "llama", whether it has
    experts: Mixtral is "llama" with expert_count)."""
    candidates = gguf_families().get(gguf_arch) if isinstance(gguf_arch, str) else None
    if not candidates:
        raise UnsupportedArchitecture(f"GGUF architecture {gguf_arch!r} is not supported; lowbit reads "
                                      f"{', '.join(sorted(gguf_families()))}")
    has_experts = int(metadata.get(f"{gguf_arch}.expert_count", 0) or 0) > 0
    for arch in candidates:
        if (arch.experts is not None) == has_experts:
            return arch
    return candidates[0]
