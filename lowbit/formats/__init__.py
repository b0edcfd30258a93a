"""Formats: how quantized models are laid out in files.

The built-in formats register themselves when their module is imported; the registry imports them on its first
lookup (`load_builtin_formats`), so importing a light module of this package (gguf_file, the header parser) does
not import torch.
"""
import importlib

from lowbit.formats.registry import FORMATS, Format, find_reader, get_writer, register_format

BUILTIN_FORMATS = (
    "lowbit.formats.native",
    "lowbit.formats.gguf",
    "lowbit.formats.bnb",   # bitsandbytes safetensors (issue 5)
    "lowbit.formats.gptq",  # GPTQ v1 checkpoints (issue 4)
    "lowbit.formats.awq",   # AWQ GEMM checkpoints (issue 4)
    "lowbit.formats.compressed_tensors",   # llm-compressor / vLLM checkpoints (issue 15)
)


def load_builtin_formats() -> None:
    for module in BUILTIN_FORMATS:
        importlib.import_module(module)


__all__ = ["FORMATS", "Format", "find_reader", "get_writer", "register_format", "load_builtin_formats"]
