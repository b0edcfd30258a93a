"""The decode thread count on a shared machine: trial rounds pick the fastest count per token (synthetic
timings), and an engine that tunes its threads generates what a fixed-thread engine does."""
from __future__ import annotations

import pytest

from lowbit.engine.threads import ThreadTuner


def run(tuner: ThreadTuner, seconds_per_token: dict[int, float], steps: int, rows: int = 1) -> list[int]:
    used = []
    for _ in range(steps):
        count = tuner.threads()
        used.append(count)
        tuner.record(seconds_per_token[count] * rows, rows)
    return used


def test_quiet_machine_keeps_all_cores_and_spends_few_steps_trying_fewer():
    tuner = ThreadTuner(2, period=100, trial_steps=5)
    used = run(tuner, {2: 1.0, 1: 1.8}, 1000)
    assert tuner.chosen == 2
    assert used[:10] == [2] * 5 + [1] * 5
    # one round of 10 trial steps per 100 steps at the chosen count: 5 of every 110 steps ran on one thread
    assert used.count(1) == 5 * -(-1000 // 110)


def test_busy_machine_moves_to_one_thread_and_back_when_the_load_goes():
    tuner = ThreadTuner(2, period=50, trial_steps=3)
    busy = run(tuner, {2: 3.0, 1: 2.0}, 200, rows=4)
    assert tuner.chosen == 1
    assert busy[:6] == [2, 2, 2, 1, 1, 1] and busy[6:56] == [1] * 50   # trial round, then the faster count
    run(tuner, {2: 1.0, 1: 1.8}, 120)          # the other programs ended: the next round notices
    assert tuner.chosen == 2


def test_candidates_and_single_core():
    assert ThreadTuner(8).candidates == [8, 4, 1]
    one = ThreadTuner(1)
    assert run(one, {1: 1.0}, 20) == [1] * 20
    with pytest.raises(ValueError):
        ThreadTuner(0)


def test_tuning_engine_generates_what_a_fixed_thread_engine_does(stories_dir):
    import torch

    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model

    model, tokenizer = load_model(stories_dir)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prompt = tokenizer("Once upon a time").input_ids
        params = SamplingParams(max_new_tokens=40, temperature=0.0)
        fixed = list(Engine(model, tokenizer, context=64, threads=2).generate(prompt, params, stop_on_eos=False))
        tuned_engine = Engine(model, tokenizer, context=64)
        tuner = tuned_engine.thread_tuners[False]     # the single-sequence (compiled step) path's tuner
        tuner.trial_steps = 3                          # both counts are tried within the 40 tokens
        seen = []
        real_record = tuner.record
        tuner.record = lambda s, r: (seen.append(torch.get_num_threads()), real_record(s, r))
        tuned = list(tuned_engine.generate(prompt, params, stop_on_eos=False))
        assert tuned == fixed
        assert set(seen) == {1, 2}
    finally:
        torch.set_num_threads(saved)
