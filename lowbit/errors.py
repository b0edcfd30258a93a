"""One exception type for every user-facing problem, so the CLI can print one line and exit non-zero."""


class LowbitError(Exception):
    """A problem with the user's input or environment; the message names the problem and the fix."""


class UnsupportedArchitecture(LowbitError):
    """The model's architecture has no adapter in lowbit.models."""


class CorruptFile(LowbitError):
    """A model or checkpoint file is truncated, malformed, or not what its name says."""
