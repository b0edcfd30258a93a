"""The compiled sampler (decode.c's lowbit_sample_rows, through clib.sample_rows_native and generate.sample_next):
each drawn token is the one the inverse CDF of softmax(logits / temperature) gives for its uniform, checked against
the CDF computed in float64 to within V * 2^-24 of the total (the float32 bound generate.draw states; the C sums
are float32 blocks accumulated in double, well inside it); masked (-inf) tokens are never drawn, also where rounding
leaves a uniform between a block's vector sum and its tokens' running sum; rows it cannot sample fall back to
torch."""
from __future__ import annotations

import ctypes

import pytest
import torch

from lowbit.engine.generate import SamplingParams, draw, sample_next
from lowbit.runtime import clib

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")


def _reference_cdf(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)


@pytest.mark.parametrize("vocab", [1, 5, 64, 1000, 49152])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_drawn_tokens_follow_the_inverse_cdf(vocab, temperature):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(16, vocab, generator=generator) * 4
    if vocab > 5:
        logits[:, ::7] = float("-inf")             # masked tokens (logit bias, a grammar), the last one too
        logits[:, -1] = float("-inf")
    uniforms = torch.rand(16, generator=generator, dtype=torch.float64)
    uniforms[0], uniforms[1] = 0.0, 1.0 - 2 ** -40   # the two ends
    tokens = clib.sample_rows_native(logits, temperature, uniforms)
    cdf = _reference_cdf(logits, temperature)
    tolerance = vocab * 2.0 ** -24 + 1e-12
    for row, token in enumerate(tokens.tolist()):
        assert logits[row, token] > float("-inf")
        below = float(cdf[row, token - 1]) if token > 0 else 0.0
        assert below - tolerance <= float(uniforms[row]) <= float(cdf[row, token]) + tolerance, (row, token)
    # and torch's own path (generate.draw on float32 softmax) agrees wherever no boundary is within the tolerance
    reference = draw(torch.softmax(logits / temperature, -1), uniforms)
    near = [(cdf[r] - float(uniforms[r])).abs().min() < tolerance for r in range(16)]
    assert all(bool(n) or int(a) == int(b) for n, a, b in zip(near, tokens, reference))


def test_frequencies_match_the_probabilities():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, float("-inf"), 0.5]])
    draws = 20000
    uniforms = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws   # an even grid over [0, 1)
    tokens = clib.sample_rows_native(logits.expand(draws, -1).contiguous(), 0.8, uniforms)
    counts = torch.bincount(tokens, minlength=6).double() / draws
    probs = torch.softmax(logits[0].double() / 0.8, -1)
    assert torch.allclose(counts, probs, atol=2.0 / draws)   # a grid, not random draws: off by one draw at most
    assert counts[4] == 0                                     # the masked token, never


def test_sample_next_uses_it_for_temperature_alone_and_torch_otherwise(monkeypatch):
    from lowbit.engine import generate

    calls = []
    monkeypatch.setattr(generate, "sample_rows_native",
                        lambda *args: calls.append(args) or clib.sample_rows_native(*args))
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=generator)
    uniforms = torch.rand(4, generator=generator, dtype=torch.float64)
    plain = SamplingParams(temperature=0.7)
    assert torch.equal(sample_next(logits, plain, None, uniforms), clib.sample_rows_native(logits, 0.7, uniforms))
    assert len(calls) == 1
    for other in (SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(temperature=0.7, top_k=20)):
        sample_next(logits, other, None, uniforms)      # top-p and top-k stay on torch's path
    assert len(calls) == 1
    nucleus = SamplingParams(temperature=0.7, top_p=0.5)
    torch_path = draw(torch.softmax(_nucleus(logits / 0.7, 0.5), -1), uniforms)
    assert torch.equal(sample_next(logits, nucleus, None, uniforms), torch_path)


def test_a_seeded_generator_gives_the_uniforms_the_torch_path_drew():
    logits = torch.randn(3, 500)
    mine, reference = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    tokens = sample_next(logits, SamplingParams(temperature=0.9), mine)
    expected = clib.sample_rows_native(logits, 0.9, torch.rand(3, generator=reference, dtype=torch.float64))
    assert torch.equal(tokens, expected)
    assert torch.equal(mine.get_state(), reference.get_state())   # one draw of B float64s, as before


def test_a_uniform_between_a_blocks_sums_never_draws_a_masked_token():
    """The search skips whole blocks of 64 tokens by their vector sums, then walks the block it enters; where the
    vector sum exceeds the walked sum, a uniform between the two must still land on a weighted token of that block,
    not on the next block's first token (masked here)."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 128, generator=generator) * 3
    logits[:, 64] = float("-inf")
    probs = torch.softmax(logits.double(), -1)
    first_block = probs[:, :64].sum(-1)
    for offset in torch.linspace(-1e-6, 1e-6, 41).tolist():   # uniforms around each row's first block boundary
        uniforms = (first_block + offset).clamp(0, 1 - 2 ** -40)
        tokens = clib.sample_rows_native(logits, 1.0, uniforms)
        assert bool((tokens != 64).all()), offset


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def test_rows_without_a_finite_logit_are_left_to_torch():
    logits = torch.randn(3, 50)
    logits[1] = float("-inf")
    assert clib.sample_rows_native(logits, 1.0, torch.rand(3, dtype=torch.float64)) is None
    logits[1] = float("nan")
    assert clib.sample_rows_native(logits, 1.0, torch.rand(3, dtype=torch.float64)) is None
    assert clib.sample_rows_native(logits.half(), 1.0, torch.rand(3, dtype=torch.float64)) is None
    logits[1] = torch.randn(50)
    logits[1, 3] = float("inf")
    assert clib.sample_rows_native(logits, 1.0, torch.rand(3, dtype=torch.float64)) is None
    assert clib.sample_rows_native(torch.randn(3, 50), 1e-40, torch.rand(3, dtype=torch.float64)) is None


def test_bad_sizes_and_arguments_are_refused_before_anything_is_written():
    lib = clib.native_library()
    logits, uniforms = torch.randn(4, 10), torch.rand(4, dtype=torch.float64)
    tokens = torch.full((4,), -7, dtype=torch.int64)

    def call(logit_floats=40, rows=4, vocab=10, temperature=1.0, uniform_count=4, token_count=4, threads=2):
        return lib.lowbit_sample_rows(logits.data_ptr(), logit_floats, rows, vocab, ctypes.c_float(temperature),
                                      uniforms.data_ptr(), uniform_count, tokens.data_ptr(), token_count, threads)

    input_size, output_size, argument = 10, 11, 17       # csrc/checks.h
    assert call(logit_floats=39) == input_size
    assert call(uniform_count=3) == input_size
    assert call(token_count=3) == output_size
    assert call(rows=4, vocab=2 ** 62) == input_size          # rows x vocab overflows
    for bad in ({"temperature": 0.0}, {"temperature": float("inf")}, {"temperature": float("nan")},
                {"temperature": 1e-40}, {"vocab": 0}, {"rows": -1}, {"threads": 0}, {"threads": 4097}):
        assert call(**bad) == argument, bad
    for uniform in (-0.25, 1.0, float("nan")):
        uniforms[2] = uniform
        assert call() == argument, uniform
    uniforms[2] = 0.5
    assert bool((tokens == -7).all())
    assert call() == 0 and bool(((tokens >= 0) & (tokens < 10)).all())
