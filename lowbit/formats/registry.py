"""Registry of on-disk formats: writers by name, readers tried in order on a path.

A writer's options are a dataclass (`Format.options`); `Format.save` builds it from keywords, and an option the
writer does not know is a one-line error naming it, never silently dropped."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class NoOptions:
    """The options of a writer that has none."""


def writer_options(cls: type, format_name: str, options: Any = None, fields: dict[str, Any] | None = None) -> Any:
    """`options` (an instance of the writer's options dataclass `cls`) or one built from keyword `fields`;
    an unknown field is a LowbitError naming it and the fields the writer accepts."""
    fields = dict(fields or {})
    if options is not None:
        if fields:
            raise LowbitError(f"format {format_name}: give options either as {cls.__name__} or as keywords, "
                              f"not both ({', '.join(sorted(fields))})")
        if not isinstance(options, cls):
            raise LowbitError(f"format {format_name}: options must be {cls.__name__}, not {type(options).__name__}")
        return options
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise LowbitError(f"format {format_name} has no option {', '.join(map(repr, unknown))}; it accepts "
                          f"{', '.join(known) or 'none'}")
    return cls(**fields)


@dataclass(frozen=True)
class Format:
    """A checkpoint format: `write(model, tokenizer, out, options)` with `options` an instance of the
    `options` dataclass; `can_read(path)` and `read(path, **kw)`."""

    name: str
    write: Callable[..., Path] | None
    can_read: Callable[[Path], bool] | None = None
    read: Callable[..., Any] | None = None
    description: str = ""
    options: type = NoOptions

    def save(self, model: Any, tokenizer: Any, out: Path, options: Any = None, **fields: Any) -> Path:
        """Write with typed options (an `options` instance, or keywords checked against its fields)."""
        from lowbit.models.skeleton import refuse_engine_only

        refuse_engine_only(model, f"write {self.name} from")
        return self.write(model, tokenizer, out, writer_options(self.options, self.name, options, fields))


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def _ensure_builtin() -> None:
    from lowbit.formats import load_builtin_formats

    load_builtin_formats()


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
