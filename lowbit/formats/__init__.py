"""Formats: how quantized models are laid out in files. Importing this package registers the built-in ones."""
from lowbit.formats import native  # noqa: F401
from lowbit.formats.registry import FORMATS, Format, find_reader, get_writer, register_format

__all__ = ["FORMATS", "Format", "find_reader", "get_writer", "register_format"]
