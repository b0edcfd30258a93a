"""The compiled step's attention by KV group (csrc/decode.c attend_run: the query heads sharing a KV head scored
in one pass over its keys, weighted in one pass over its values) against lowbit's torch decoder: group ratios 1,
2, 4 and 7, head sizes that take the AVX2 paths whole (16), with a column tail (24) and not at all (20), sliding
windows and soft-caps (Gemma 2), many rows at different positions decoded together, and one row alone (where the
heads of a group are split over the threads)."""
from __future__ import annotations

import pytest
import torch

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine
from lowbit.runtime import clib

from arch_models import tiny_model

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

# prompt lengths: rows at positions on both sides of the 8-key blocks of the score pass and of Gemma 2's window
LENGTHS = (1, 3, 8, 9, 15, 17, 26, 33, 40)
STEPS = 6


def _model(ratio: int, kv_heads: int, head_dim: int, model_type: str = "qwen2", **extra):
    heads = ratio * kv_heads
    model, _ = tiny_model(model_type, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                          hidden_size=64, tie_word_embeddings=False, **extra)
    return model


def _decode(model, native: bool, lengths=LENGTHS, threads: int | None = None) -> torch.Tensor:
    """Logits [steps, rows, vocab] of the rows (prompts of `lengths` tokens, each in its own slot) decoded together
    for STEPS steps, each fed a fixed token (so both decoders see the same inputs whatever they predict)."""
    engine = Engine(model, max_batch=len(lengths), context=64, native=native,
                    prefill_attention_dtype=torch.float32, activations="float32")
    assert (engine.decode_path == "compiled step") == native, engine.decode_path
    if native:
        engine.decoder.native.max_threads = threads       # small models normally run on one thread
    # each row's prompt and fed tokens follow from its length alone (the same row in any batch)
    tokens = [torch.randint(3, 96, (n + STEPS,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    seqs = [engine.start(row[:n].tolist(), SamplingParams(max_new_tokens=STEPS + 2, temperature=0.0),
                         stop_on_eos=False) for row, n in zip(tokens, lengths)]
    feeds = torch.stack([row[n:] for row, n in zip(tokens, lengths)], dim=1)
    return torch.stack([engine.decoder.decode(feeds[step], torch.tensor([s.slot for s in seqs]),
                                              torch.tensor([n + step for n in lengths]))
                        for step in range(STEPS)])


CASES = {
    "ratio1": dict(ratio=1, kv_heads=4, head_dim=16),
    "ratio2": dict(ratio=2, kv_heads=2, head_dim=16),
    "ratio4": dict(ratio=4, kv_heads=2, head_dim=24),
    "ratio7": dict(ratio=7, kv_heads=2, head_dim=16),
    "ratio7-one-kv-head": dict(ratio=7, kv_heads=1, head_dim=20),
    # scores soft-capped near their size, every layer a window of 8 of the up to 46 positions
    "gemma2-ratio4": dict(ratio=4, kv_heads=1, head_dim=16, model_type="gemma2", sliding_window=8,
                          query_pre_attn_scalar=24, attn_logit_softcapping=0.5, layer_types=["sliding_attention"] * 2),
    "gemma2-ratio2": dict(ratio=2, kv_heads=2, head_dim=24, model_type="gemma2", sliding_window=8,
                          query_pre_attn_scalar=24, attn_logit_softcapping=0.5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_grouped_attention_equals_torch_decoder(case):
    """Bound: as tests/test_compiled_families.py's, each logit a chain of float32 dot products of <= 64 terms (and
    sums over <= 46 positions) through 2 layers, relative rounding a few 1e-5 of the largest logit at most; 1e-4
    of it is the margin. Summation order is all that differs from the torch decoder."""
    torch.set_num_threads(2)
    model = _model(**CASES[case])
    reference = _decode(model, native=False)
    for threads in (1, 2):
        logits = _decode(model, native=True, threads=threads)
        assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max(), threads


@pytest.mark.parametrize("case", ["ratio7", "ratio7-one-kv-head", "gemma2-ratio4"])
def test_grouped_attention_is_the_same_on_any_thread_count_and_batch(case):
    """A head's numbers do not depend on which heads share its work item (the split follows the rows and the
    threads): one row alone on 1 or 2 threads, and the same row among others, give the same logits bit for bit.
    A few rows of a model with one KV head on 2 threads split each group's heads into runs (csrc/decode.c
    attention_run: 7 heads as 4 + 3, 4 as 2 + 2); one thread keeps them whole."""
    torch.set_num_threads(2)
    model = _model(**CASES[case])
    alone = [_decode(model, native=True, lengths=(26,), threads=threads) for threads in (1, 2)]
    among = _decode(model, native=True, lengths=(3, 26, 9), threads=2)
    assert torch.equal(alone[0], alone[1])
    assert torch.equal(alone[0][:, 0], among[:, 1])
