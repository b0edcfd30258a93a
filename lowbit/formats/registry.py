"""Registry of on-disk formats: writers by name, readers tried in order on a path."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Format:
    """A checkpoint format: `write(model, tokenizer, out, **options)`; `can_read(path)` and `read(path, **kw)`."""

    name: str
    write: Callable[..., Path] | None
    can_read: Callable[[Path], bool] | None = None
    read: Callable[..., Any] | None = None
    description: str = ""


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def _ensure_builtin() -> None:
    import lowbit.formats  # noqa: F401  (registers every built-in format)


def get_writer(name: str) -> Format:
    """The format named `name`, or a clear error listing the known ones."""
    _ensure_builtin()
    fmt = FORMATS.get(name)
    if fmt is None or fmt.write is None:
        writable = sorted(n for n, f in FORMATS.items() if f.write is not None)
        raise LowbitError(f"unknown output format {name!r}; choose one of: {', '.join(writable)}")
    return fmt


def find_reader(path: Path) -> Format | None:
    """The first registered format that recognises `path`, or None for a plain HF folder."""
    _ensure_builtin()
    for fmt in FORMATS.values():
        if fmt.can_read is not None and fmt.can_read(path):
            return fmt
    return None
