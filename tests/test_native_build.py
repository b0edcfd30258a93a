"""The compiled kernels build and load wherever a C compiler exists. Every kernel test elsewhere skips without the
library, so a source that compiles into a library that does not load (an undefined symbol) would otherwise pass the
whole suite silently, the runtime falling back to torch."""
from __future__ import annotations

import os
import shutil

import pytest

from lowbit.runtime import clib


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@pytest.mark.skipif(bool(os.environ.get("LOWBIT_NO_NATIVE")) or _compiler() is None,
                    reason="no C compiler here, or LOWBIT_NO_NATIVE set: the torch kernels are the runtime")
def test_the_kernels_build_and_load_where_a_compiler_exists(tmp_path):
    result = clib.compile_library(tmp_path / "kernels.so")
    assert result.returncode == 0, result.stderr[-2000:]
    clib.load_library(tmp_path / "kernels.so")      # raises on an undefined symbol
    assert clib.native_library() is not None
