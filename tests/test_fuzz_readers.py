"""Fuzzing every format lowbit reads (tests/fuzzing.py): a few hundred seeded mutants of stories260K written by
lowbit as GGUF Q8_0 and Q4_K_M, native RTN-4, GPTQ and bitsandbytes NF4. Each mutant must either fail with a
one-line LowbitError or load with logits bit-identical to the original's: never a crash, a hang, a traceback or
silently different numbers. Every rejected mutant also goes through `lowbit generate` (lowbit.cli.main, in the
worker), which must exit 2 with that one line and no traceback; tests/test_validation.py's
test_cli_exits_2_with_one_line checks the same in a real `python -m lowbit.cli` process."""
from __future__ import annotations

import time

import pytest

import fuzzing
from conftest import ROOT, STORIES



@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    """(originals, worker): the worker starts first, so its imports overlap building the originals; both are shared
    by every test of the module, and the worker is stopped at the end."""
    if not STORIES.is_dir():
        pytest.skip(f"{STORIES} (shared test model) is absent")
    worker = fuzzing.Worker(ROOT).start()
    try:
        yield fuzzing.build_originals(STORIES, tmp_path_factory.mktemp("originals")), worker
    finally:
        worker.stop()


def run_and_check(fuzz, root, seed: int, per_format: int) -> tuple[dict, list[dict]]:
    originals, worker = fuzz
    started = time.perf_counter()
    mutants = fuzzing.make_mutants(originals, root, seed=seed, per_format=per_format)
    results, _ = fuzzing.run_mutants(mutants, originals, ROOT, worker=worker)
    table = fuzzing.summarize(results)
    print(f"\n{len(results)} mutants, seed {seed}, {time.perf_counter() - started:.1f} s (worker starts: "
          f"{worker.starts}, the last one's imports {worker.import_seconds:.1f} s)\n" + fuzzing.format_table(table))
    bad = [r for r in results if r["outcome"] not in fuzzing.ACCEPTED]
    assert not bad, "\n".join(f"{r['format']} {r['kind']} {r['detail']}: {r['outcome']} {r['message'][:200]}"
                              for r in bad[:20])
    assert len(results) == per_format * len(originals)
    return table, results


def test_mutants_fail_cleanly_or_load_identically(fuzz, tmp_path):
    table, results = run_and_check(fuzz, tmp_path, seed=0, per_format=50)
    assert table["total"].get("error", 0) > table["total"].get("identical", 0)   # the mutations do bite
    assert {r["format"] for r in results if r["outcome"] == "identical"} == set(fuzz[0])   # and leave some loadable


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_many_mutants(fuzz, tmp_path, seed):
    run_and_check(fuzz, tmp_path, seed=seed, per_format=400)


def test_the_harness_sees_every_kind_of_failure(tmp_path):
    """The fuzz test cannot pass vacuously: a worker whose judge misbehaves as each file's name says (another
    digest, a two-line error, a traceback, a CLI exiting 1, an abort, a sleep) gets each classified as that failure,
    a crash and a hang each restart the worker, and the acceptable outcomes stay accepted."""
    behaviours = ("identical", "error", "different", "multiline", "traceback", "cli", "crash", "hang")
    for name in ("original", *behaviours):
        (tmp_path / name).write_bytes(b"")
    mutants = [fuzzing.Mutant("fake", name, name, tmp_path / name) for name in behaviours]
    worker = fuzzing.Worker(ROOT, import_timeout=120, judge="misbehaving")
    started = time.perf_counter()
    try:
        results, reference = fuzzing.run_mutants(mutants, {"fake": tmp_path / "original"}, ROOT, timeout=2.0,
                                                 worker=worker)
    finally:
        worker.stop()
    outcomes = {r["kind"]: r["outcome"] for r in results}
    assert outcomes == {"identical": "identical", "error": "error", "different": "different",
                        "multiline": "multiline", "traceback": "exception", "cli": "cli", "crash": "crash",
                        "hang": "hang"}
    # and run_and_check's verdict: only the clean outcomes pass, every misbehaviour is a failure
    assert {kind for kind, outcome in outcomes.items() if outcome in fuzzing.ACCEPTED} == {"identical", "error"}
    assert "KeyError" in next(r["message"] for r in results if r["kind"] == "traceback")
    assert "traceback" in next(r["message"] for r in results if r["kind"] == "cli")
    # the first start, a fresh worker after the crash, and one for the hang's retry
    assert worker.starts == 3 and time.perf_counter() - started < 60
    bad = [r for r in results if r["outcome"] not in fuzzing.ACCEPTED]
    assert {r["kind"] for r in bad} == set(behaviours) - {"identical", "error"}
    table = fuzzing.summarize(results)
    assert table["total"] == {outcome: 1 for outcome in fuzzing.OUTCOMES}
