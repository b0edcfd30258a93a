"""The compiled kernels under AddressSanitizer: csrc/*.c built once with -fsanitize=address, then the compiled-step
and kernel tests (their inputs: every layout and GGUF block type, act-order, biases, head norms, batches), the
entry points' size checks (tests/test_c_entry_sizes.py, with buffers of exactly the sizes passed:
LOWBIT_TEST_EXACT_BUFFERS) and a small decode run against that library in a subprocess. Any read or write outside
a buffer aborts the run with ASan's report."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

RUN = """
import sys
import lowbit.runtime.clib as clib
clib._LIBRARY, clib._LIBRARY_TRIED = clib.load_library(sys.argv[1]), True
import pytest
code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", *sys.argv[2:]])
sys.exit(int(code))
"""


def test_kernels_and_decode_under_address_sanitizer(tmp_path):
    compiler = shutil.which("gcc")
    if compiler is None:
        pytest.skip("gcc is not installed")
    runtime = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isfile(runtime):
        pytest.skip("gcc has no AddressSanitizer runtime (libasan.so)")
    from lowbit.runtime.clib import SOURCES

    library = tmp_path / "lowbit_kernels_asan.so"
    build = subprocess.run([compiler, "-O1", "-g", "-march=native", "-fopenmp", "-fsanitize=address",
                            "-fno-omit-frame-pointer", "-shared", "-fPIC", "-o", str(library), *map(str, SOURCES),
                            "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    env = {**os.environ, "LD_PRELOAD": runtime, "OMP_NUM_THREADS": "2", "LOWBIT_TEST_EXACT_BUFFERS": "1",
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1"}
    tests = ["tests/test_c_entry_sizes.py", "tests/test_compiled_step.py", "tests/test_compiled_families.py",
             "tests/test_grouped_attention.py",
             "tests/test_fast_kernels.py", "tests/test_ggml_block_kernels.py",
             "tests/test_validation.py::"
             "test_compiled_step_refuses_a_weight_whose_description_disagrees", "tests/test_validation.py::"
             "test_c_size_check_codes"]
    run = subprocess.run([sys.executable, "-c", RUN, str(library), *tests], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=3600)
    assert run.returncode == 0 and "AddressSanitizer" not in run.stderr, (run.stdout[-3000:], run.stderr[-5000:])
    assert " passed" in run.stdout, run.stdout[-2000:]
