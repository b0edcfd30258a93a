"""Formats: how quantized models are laid out in files. Importing this package registers the built-in ones."""
from lowbit.formats import native  # noqa: F401
from lowbit.formats import gguf  # noqa: F401
from lowbit.formats import bnb  # noqa: F401  (bitsandbytes safetensors; issue 5)
from lowbit.formats import gptq, awq  # noqa: F401  (GPTQ v1 and AWQ GEMM checkpoints; issue 4)
from lowbit.formats.registry import FORMATS, Format, find_reader, get_writer, register_format

__all__ = ["FORMATS", "Format", "find_reader", "get_writer", "register_format"]
