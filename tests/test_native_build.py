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


def test_experiment_flags_key_the_cache_and_stay_out_of_the_portable_build(monkeypatch, tmp_path):
    """LOWBIT_CFLAGS (an experiment's -D settings) builds its own library, never reaches the portable build (which
    tests and fallbacks need free of AVX-512), and a value that cannot be split is a one-line error before any
    file is created."""
    monkeypatch.delenv("LOWBIT_CFLAGS", raising=False)
    plain = clib.native_library_path()
    monkeypatch.setenv("LOWBIT_CFLAGS", "-DLB_GGML_PREFETCH_BYTES=4096")
    assert clib.native_library_path() != plain
    if _compiler() is not None:
        result = clib.compile_library(tmp_path / "portable.so", march_native=False)
        assert "-DLB_GGML_PREFETCH_BYTES=4096" not in result.args
        result = clib.compile_library(tmp_path / "native.so", march_native=True)
        assert "-DLB_GGML_PREFETCH_BYTES=4096" in result.args
    monkeypatch.setenv("LOWBIT_CFLAGS", "-DFOO='unterminated")
    with pytest.raises(clib.LowbitError, match="LOWBIT_CFLAGS.*quoting"):
        clib.compile_library(tmp_path / "never.so")
    assert not list(tmp_path.glob("tmp*.so"))
