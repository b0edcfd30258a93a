"""One exception type for every user-facing problem, so the CLI can print one line and exit non-zero."""


class LowbitError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class UnsupportedArchitecture(LowbitError):
    """The model's architecture has no adapter in lowbit.models."""


class CorruptFile(LowbitError):
    """A model or checkpoint file is truncated, malformed, or not what its name says."""


def check_option_type(what: str, value: object, expected: type) -> None:
    """One line naming the option when `value` is not of type `expected`: int options take ints (not bools, not
    truncated floats), float ones ints or floats, bool ones bools (not 0/1 or "false"), str ones strings."""
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise LowbitError(f"{what} must be {expected.__name__}, got {value!r}")


WHOLE_MODEL_HINT = ("quantize big models layer by layer with `lowbit quantize ... --stream`, which holds one decoder "
                    "layer at a time")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether a failure was a failed allocation: MemoryError, ENOMEM, or torch's and safetensors' wording of it
    ("can't allocate memory", "Cannot allocate memory (os error 12)")."""
    import errno

    if isinstance(exc, MemoryError) or getattr(exc, "errno", None) == errno.ENOMEM:
        return True
    text = str(exc).lower()
    return "allocate memory" in text or "os error 12" in text or "out of memory" in text


def unreadable_weights(path: object, exc: BaseException, hint: str = WHOLE_MODEL_HINT) -> LowbitError:
    """The error for weights that failed to load: out of memory (with `hint`, the way out) when the allocation
    failed, else a truncated or corrupt file."""
    first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
    if is_out_of_memory(exc):
        return LowbitError(f"out of memory loading {path} ({first_line}); {hint}")
    return CorruptFile(f"{path} is truncated or corrupt ({first_line}); re-download or re-save it")
