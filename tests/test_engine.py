"""lowbit's engine against transformers on the same weights: greedy text, KV-cache logits, batching, sampling."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit.runtime.surgery import dequantized_copy
from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine, fuse_linears
from lowbit.errors import LowbitError
from lowbit.runtime import clib
from lowbit.runtime.qlinear import QuantLinear

from conftest import STORIES

needs_stories = pytest.mark.skipif(not STORIES.is_dir(), reason=f"shared model stories260K not found at {STORIES}")


@pytest.fixture(scope="module")
def stories():
    from lowbit.models.loading import load_model

    if not STORIES.is_dir():      # every test that needs it skips, marked or not
        pytest.skip(f"shared model stories260K not found at {STORIES}")
    return load_model(STORIES)


@pytest.fixture(scope="module")
def stories_rtn4(stories):
    """stories260K with every Linear (lm_head too) quantized to RTN 4-bit g32."""
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    model = copy.deepcopy(stories[0])
    quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=32, skip=()), progress=False)
    return model


@torch.inference_mode()
def transformers_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation by full forwards without any cache: the plainest possible reference."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def engine_greedy(engine: Engine, prompt: list[int], steps: int) -> list[int]:
    return list(engine.generate(prompt, SamplingParams(max_new_tokens=steps, temperature=0.0), stop_on_eos=False))


PROMPT_TEXT = "Once upon a time"


@needs_stories
def test_greedy_matches_transformers_fp32(stories):
    model, tokenizer = stories
    prompt = tokenizer(PROMPT_TEXT).input_ids
    engine = Engine(model, tokenizer, context=128)
    assert engine.fast_path
    ours = engine_greedy(engine, prompt, 64)
    assert ours == transformers_greedy(model, prompt, 64)
    assert tokenizer.decode(ours).startswith(", there was a little girl named Lily")


def _native_kernel_available() -> bool:
    from lowbit.runtime.fast_kernels import native_library

    return native_library() is not None


@pytest.fixture(scope="module")
def rtn4_reference(stories, stories_rtn4):
    """(prompt + 64 greedy tokens, float32 logits) of transformers running the dequantized RTN weights."""
    plain = dequantized_copy(stories_rtn4)
    prompt = stories[1](PROMPT_TEXT).input_ids
    ids = prompt + transformers_greedy(plain, prompt, 64)
    with torch.inference_mode():
        logits = plain(torch.tensor([ids])).logits[0]
    return ids, logits


@needs_stories
def test_greedy_matches_transformers_quantized(stories, stories_rtn4, rtn4_reference):
    """Quantized model on the engine vs transformers running the dequantized weights in float32: with a kernel
    that computes in float32 (the C u8 kernel, else the reference) the 64 greedy tokens are the same."""
    from lowbit.runtime.surgery import set_kernel

    tokenizer = stories[1]
    model = copy.deepcopy(stories_rtn4)
    set_kernel(model, "u8" if _native_kernel_available() else "reference")
    ids, _ = rtn4_reference
    prompt = tokenizer(PROMPT_TEXT).input_ids
    engine = Engine(model, tokenizer, context=128, prefill_attention_dtype=torch.float32)
    assert engine_greedy(engine, prompt, 64) == ids[len(prompt):]


@needs_stories
def test_bf16_kernels_agree_with_float_reference(stories, stories_rtn4, rtn4_reference):
    """The default (bf16 int4pack) kernels round activations to bf16, so exact greedy identity over long runs
    is not guaranteed; teacher-forced next-token choices must still agree almost everywhere."""
    tokenizer = stories[1]
    ids, expected = rtn4_reference
    ours = Engine(copy.deepcopy(stories_rtn4), tokenizer, context=128, prefill_chunk=1).logits(ids)
    agreement = (ours.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= 0.95, agreement
    # bf16 has an 8-bit mantissa: logits move by a few percent of their spread at most.
    assert (ours - expected).abs().max() < 0.05 * (expected.max() - expected.min())


@needs_stories
@pytest.mark.parametrize("chunk", [512, 7])
def test_prefill_then_decode_logits_equal_full_forward(stories, chunk):
    model, tokenizer = stories
    ids = tokenizer("Lily and Ben went to the park. They saw a dog and a big red ball.").input_ids
    with torch.inference_mode():
        full = model(torch.tensor([ids])).logits[0]
    engine = Engine(model, tokenizer, context=64, prefill_chunk=chunk)
    # Prefill the first half (chunked when chunk=7), then decode the rest one token at a time.
    half = len(ids) // 2
    seq = engine.start(ids[:half], SamplingParams(max_new_tokens=64, temperature=0.0), stop_on_eos=False)
    rows = []
    for position, token in enumerate(ids[half:], start=half):
        seq.generated[-1] = token          # teacher forcing: feed the true next token
        logits = engine.decoder.forward(torch.tensor([[token]]), slice(seq.slot, seq.slot + 1),
                                        torch.tensor([seq.position]))
        seq.position += 1
        rows.append(logits[0])
    engine.release(seq)
    torch.testing.assert_close(torch.stack(rows), full[half:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine.logits(ids), full, atol=1e-4, rtol=1e-4)


@needs_stories
def test_batched_decode_equals_single_sequences(stories):
    """Sequences at different positions decoding together give the tokens each gives alone."""
    model, tokenizer = stories
    prompts = [tokenizer(t).input_ids for t in ("Once upon a time", "Tom had a red", "The sun was hot and the")]
    alone = [engine_greedy(Engine(model, tokenizer, context=96), p, 24) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=4, context=96)
    greedy = SamplingParams(max_new_tokens=24, temperature=0.0)
    first = engine.start(prompts[0], greedy, stop_on_eos=False)
    engine.step()
    engine.step()                                 # the first sequence is 2 tokens ahead when the others join
    others = [engine.start(p, greedy, stop_on_eos=False) for p in prompts[1:]]
    engine.release(others[0], "cancelled")        # a hole in the slots: idle rows must not disturb the rest
    while not (first.finished and others[1].finished):
        engine.step()
    assert first.generated == alone[0]
    assert others[1].generated == alone[2]
    engine.release(first)
    engine.release(others[1])
    assert engine.free_slots == [0, 1, 2, 3] and not engine.active


@needs_stories
def test_large_batches_decode_through_one_gemm_per_weight_and_equal_single_sequences(stories, stories_rtn4):
    """From `compiled_batch_rows` rows (set to PREFILL_ROWS here) a decode step leaves the compiled step for the
    torch decoder's GEMMs (each weight
    dequantized once for all rows); the tokens stay those each sequence gives alone through the compiled step."""
    from lowbit.runtime.cpu import float32_arithmetic
    from lowbit.runtime.fast_kernels import PREFILL_ROWS

    tokenizer = stories[1]
    words = ("Once", "Tom", "The sun", "A cat", "Lily", "One day", "Ben", "The dog", "Sue", "A bird")
    prompts = [tokenizer(f"{w} {v}").input_ids for w in words for v in ("was", "had")][:PREFILL_ROWS + 2]
    single = Engine(stories_rtn4, tokenizer, context=64)
    assert single.decoder.native is not None
    alone = [engine_greedy(single, p, 12) for p in prompts]

    class CountedStep:
        """The compiled step, recording how many rows each decode call gave it."""

        def __init__(self, step):
            self.step, self.rows = step, []

        def __call__(self, tokens, *args):
            self.rows.append(len(tokens))
            return self.step(tokens, *args)

        def __getattr__(self, name):
            return getattr(self.step, name)

    # the batch's GEMMs in float32, as the compiled step computes: on a CPU with native bf16 they would round to
    # bf16, a different arithmetic whose near-ties may pick other tokens (this test is about batching, not dtypes)
    engine = Engine(stories_rtn4, tokenizer, max_batch=len(prompts), context=64,
                    prefill_attention_dtype=torch.float32)
    engine.decoder.compiled_batch_rows = PREFILL_ROWS   # the GEMMs' path, which takes batches of 128 rows and more
    engine.decoder.native = counted = CountedStep(engine.decoder.native)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    with float32_arithmetic():
        seqs = [engine.start(p, greedy, stop_on_eos=False) for p in prompts]
        while not all(s.finished for s in seqs):
            engine.step()
    assert [s.generated for s in seqs] == alone
    assert all(rows < PREFILL_ROWS for rows in counted.rows)   # the full batch never ran the compiled step


@needs_stories
def test_sampling_is_seeded_and_limits_apply(stories):
    model, tokenizer = stories
    engine = Engine(model, tokenizer, context=96)
    prompt = tokenizer(PROMPT_TEXT).input_ids

    def run(**kw):
        return list(engine.generate(prompt, SamplingParams(max_new_tokens=20, **kw), stop_on_eos=False))

    assert run(temperature=0.9, seed=3) == run(temperature=0.9, seed=3)
    assert run(temperature=0.9, seed=3) != run(temperature=0.9, seed=4)
    greedy = run(temperature=0.0)
    assert run(temperature=1.0, top_k=1, seed=5) == greedy
    assert run(temperature=1.0, top_p=1e-6, seed=5) == greedy


@needs_stories
def test_stops_and_context_limits(stories):
    model, tokenizer = stories
    engine = Engine(model, tokenizer, context=32)
    prompt = tokenizer(PROMPT_TEXT).input_ids
    greedy = list(engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0.0)))
    stop_at = greedy[3]
    stopped = list(engine.generate(prompt, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                          stop_token_ids=(stop_at,))))
    assert stopped == greedy[:greedy.index(stop_at) + 1]
    # The context bounds generation: prompt + generated never exceeds it.
    seq = engine.start(prompt, SamplingParams(max_new_tokens=1000, temperature=0.0), stop_on_eos=False)
    while not seq.finished:
        engine.step()
    assert seq.finish_reason == "length" and len(prompt) + len(seq.generated) == 32
    engine.release(seq)
    with pytest.raises(LowbitError, match="prompt has 40 tokens but the context holds 32"):
        engine.start([5] * 40, SamplingParams())
    with pytest.raises(LowbitError, match="outside the vocabulary"):
        engine.start([10_000], SamplingParams())
    assert engine.free_slots == [0]


@pytest.mark.parametrize("bad", [dict(temperature=-0.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0)])
def test_sampling_params_out_of_range(bad):
    with pytest.raises(LowbitError):
        SamplingParams(**bad).validate()


def test_fused_linears_equal_separate():
    from lowbit.schemes.intgrid import IntGrid

    torch.manual_seed(0)
    grid = IntGrid(bits=4, group_size=32, symmetric=False)
    mods = [QuantLinear(grid.quantize(torch.randn(n, 64)), torch.randn(n) if n == 48 else None) for n in (32, 48, 16)]
    fused = fuse_linears(mods)
    assert fused is not None
    x = torch.randn(3, 64)
    expected = torch.cat([torch.nn.functional.linear(x, m.qweight.dequantize(), m.bias) for m in mods], -1)
    torch.testing.assert_close(fused.qweight.dequantize(), torch.cat([m.qweight.dequantize() for m in mods]))
    fused.set_kernel("reference")
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    # Different grids cannot share one weight: no fusion.
    other = QuantLinear(IntGrid(bits=8, group_size=32).quantize(torch.randn(16, 64)))
    assert fuse_linears([mods[0], other]) is None


@needs_stories
def test_gguf_kept_quantized_runs_on_the_engine(stories, tmp_path):
    """A GGUF file loaded without dequantizing (GGML block schemes, fused q/k/v) generates on the engine what
    transformers generates from the same weights dequantized."""
    gguf = pytest.importorskip("lowbit.formats.gguf", reason="GGUF support is not available")
    from lowbit.runtime.surgery import quantized_modules, set_kernel

    model, tokenizer = stories
    path = tmp_path / "stories-q8_0.gguf"
    gguf.export_gguf(model, tokenizer, path, type="Q8_0", progress=False)
    quantized, _ = gguf.load_gguf_quantized(path)
    assert any(m.qweight.scheme.kind == "ggml" for _, m in quantized_modules(quantized))
    set_kernel(quantized, "u8" if _native_kernel_available() else "reference")
    prompt = tokenizer(PROMPT_TEXT).input_ids
    reference = transformers_greedy(dequantized_copy(quantized), prompt, 32)
    # The torch decoder fuses q/k/v (GGML weights of one type fuse); the compiled step reads them as parts.
    torch_only = Engine(quantized, tokenizer, context=128, prefill_attention_dtype=torch.float32, native=False)
    assert isinstance(torch_only.decoder.layers[0].qkv, QuantLinear)        # GGML weights of one type fuse
    assert engine_greedy(torch_only, prompt, 32) == reference
    engine = Engine(quantized, tokenizer, context=128, prefill_attention_dtype=torch.float32, activations="float32")
    if engine.decoder.native is not None:   # no fused copies of the codes next to the model's own
        assert engine.decoder.layers[0].qkv_parts[0] is quantized.model.layers[0].self_attn.q_proj
    assert engine_greedy(engine, prompt, 32) == reference
    if engine.decoder.native is not None:
        assert engine.arithmetic == "float32 activations (float32)"
        # by default GGUF blocks get llama.cpp's arithmetic (int8 activations), float weights float32
        blocks = sum(type(m) is QuantLinear and m.qweight.scheme.kind == "ggml" for m in quantized.modules())
        assert Engine(quantized, tokenizer, context=32).arithmetic.startswith(f"int8 activations in {blocks} of ")


@needs_stories
def test_activations_choice(stories_rtn4):
    """auto keeps lowbit's own layouts in float32; int8 is asked for by name; anything else is one clear error."""
    tokenizer = None
    auto = Engine(stories_rtn4, tokenizer, context=32)
    if auto.decoder.native is not None:
        assert auto.arithmetic == "float32 activations (auto)"
        if clib.has_act8():
            assert Engine(stories_rtn4, tokenizer, context=32, activations="int8").arithmetic.startswith("int8")
    with pytest.raises(LowbitError, match="unknown activations 'int4'; choose one of: float32, int8, auto"):
        Engine(stories_rtn4, tokenizer, context=32, activations="int4")


def test_a_model_that_ran_in_the_engine_still_copies_and_saves(stories_rtn4, tmp_path):
    """The engine cached on a model holds ctypes pointers: deepcopy and torch.save give the copy no engine
    (it builds its own), and a change of the owner's engine options rebuilds the cached one."""
    from lowbit.engine.runner import engine_for

    model = copy.deepcopy(stories_rtn4)
    first = engine_for(model, context=64)
    assert model._lowbit_engine is first
    copied = copy.deepcopy(model)
    assert copied._lowbit_engine is None
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded._lowbit_engine is None
    ids = torch.tensor([[1, 15, 30, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert engine_for(model, context=64) is first
    model.lowbit_engine_options = {"activations": "int8"}
    assert engine_for(model, context=64) is not first


PROMPTS_TOGETHER = ("Once upon a time", "Tom had a red ball and a big", "The sun", "Lily and her mom went to the park")


@needs_stories
@pytest.mark.parametrize("path", ["compiled step", "gemm"])
def test_prompts_prefilled_together_equal_each_alone(stories, stories_rtn4, path):
    """Prompts started together (Engine.start_many -> RotaryDecoder.prefill_prompts) get the first-token logits,
    KV cache rows and greedy continuation each gets prefilled alone: through the compiled step (every prompt's
    tokens in one step, the logits of each one's last row) bit for bit, since each row's arithmetic there does
    not depend on the others; through GEMMs (one per weight over all prompts' tokens, attention per prompt) within
    bf16 rounding: each GEMM rounds its output to bf16 (2^-9 relative), and another summation order (more rows,
    other blocking) can move it by one bf16 step (2^-8) per block, so after L blocks and the head by at most
    (L + 1) 2^-8 of the largest magnitude. The greedy tokens agree through the compiled step; after a GEMM prefill
    they need not (a bf16 step can flip a near tie a few tokens later, as between any two bf16 GEMM shapes)."""
    model, tokenizer = stories_rtn4, stories[1]
    prompts = [tokenizer(t).input_ids for t in PROMPTS_TOGETHER]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)

    def engine() -> Engine:
        built = Engine(model, tokenizer, max_batch=len(prompts), context=96)
        built.decoder.native_prefill_tokens = 1000 if path == "compiled step" else 0
        return built

    alone = []
    for prompt in prompts:
        single = engine()
        logits = single.decoder.prefill_prompts([torch.tensor(prompt)], [2])
        caches = (single.decoder.k_cache[:, 2, :, :len(prompt)].clone(),
                  single.decoder.v_cache[:, 2, :, :len(prompt)].clone())
        alone.append((logits[0], caches, engine_greedy(engine(), prompt, 12)))

    together = engine()
    slots = [3, 0, 2, 1]
    logits = together.decoder.prefill_prompts([torch.tensor(p) for p in prompts], slots)
    assert logits.shape == (len(prompts), model.config.vocab_size)
    for prompt, slot, row, (reference, (keys, values), _) in zip(prompts, slots, logits, alone):
        got_keys = together.decoder.k_cache[:, slot, :, :len(prompt)]
        got_values = together.decoder.v_cache[:, slot, :, :len(prompt)]
        if path == "compiled step":
            assert torch.equal(row, reference) and torch.equal(got_keys, keys) and torch.equal(got_values, values)
        else:
            steps = (model.config.num_hidden_layers + 1) * 2.0 ** -8
            assert (row - reference).abs().max() <= steps * reference.abs().max()
            assert (got_keys - keys).abs().max() <= steps * keys.abs().max()
            assert (got_values - values).abs().max() <= steps * values.abs().max()

    if path != "compiled step":
        return
    started = engine()
    seqs = started.start_many([started.new_sequence(p, greedy, stop_on_eos=False) for p in prompts])
    while not all(s.finished for s in seqs):
        started.step()
    assert [s.generated for s in seqs] == [tokens for _, _, tokens in alone]


@needs_stories
def test_start_many_groups_prompts_by_the_prefill_chunk_and_gives_slots_back_on_failure(stories):
    """Consecutive prompts share a prefill while their tokens fit in `prefill_chunk`; a longer prompt goes alone.
    A prefill that raises leaves every slot free and no sequence active."""
    model, tokenizer = stories
    engine = Engine(model, tokenizer, max_batch=5, context=96, prefill_chunk=16)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    seqs = [engine.new_sequence(list(range(1, 1 + n)), greedy) for n in (5, 7, 9, 20, 3)]
    assert [[len(s.prompt_ids) for s in g] for g in engine._prefill_groups(seqs)] == [[5, 7], [9], [20], [3]]
    calls = []
    prefill_prompts = engine.decoder.prefill_prompts
    engine.decoder.prefill_prompts = lambda prompts, slots: calls.append(len(prompts)) or prefill_prompts(prompts,
                                                                                                        slots)
    engine.start_many(seqs)
    assert calls == [2] and [s.position for s in seqs] == [5, 7, 9, 20, 3] and engine.free_slots == []
    for s in seqs:
        engine.release(s)

    def fail(prompts, slots):
        raise RuntimeError("out of memory")

    engine.decoder.prefill_prompts = fail
    again = [engine.new_sequence([1, 2, 3], greedy), engine.new_sequence([4, 5], greedy)]
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.start_many(again)
    assert engine.free_slots == [0, 1, 2, 3, 4] and not engine.active
    assert all(s.slot == -1 and not s.generated for s in again)
    with pytest.raises(LowbitError, match="only 5 of the 5"):
        engine.start_many([engine.new_sequence([1], greedy) for _ in range(6)])
    twice = engine.new_sequence([1, 2], greedy)
    with pytest.raises(LowbitError, match="given twice or is already started"):
        engine.start_many([twice, twice])
    started = engine.start_many([twice])[0]
    with pytest.raises(LowbitError, match="given twice or is already started"):
        engine.start_many([started])
    engine.release(started)
    assert engine.free_slots == [0, 1, 2, 3, 4]


@needs_stories
def test_start_many_gives_back_the_slots_of_groups_already_prefilled_when_a_later_one_fails(stories):
    """A burst whose second group's prefill raises: the first group's prompts were prefilled and their first tokens
    sampled, and still every sequence is reset (no slot, no token, not finished) and every slot is free."""
    model, tokenizer = stories
    engine = Engine(model, tokenizer, max_batch=4, context=96, prefill_chunk=16)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    seqs = [engine.new_sequence(list(range(1, 1 + n)), greedy) for n in (5, 7, 20)]
    assert [[len(s.prompt_ids) for s in g] for g in engine._prefill_groups(seqs)] == [[5, 7], [20]]
    prefilled = []
    prefill_prompts = engine.decoder.prefill_prompts

    def first_group_only(prompts, slots):
        logits = prefill_prompts(prompts, slots)
        prefilled.extend(slots)
        return logits

    def fail(seq):
        assert all(s.generated for s in seqs[:2]), "the first group was not sampled before the second began"
        raise RuntimeError("out of memory")

    engine.decoder.prefill_prompts = first_group_only
    engine._prefill = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.start_many(seqs)
    assert len(prefilled) == 2 and engine.free_slots == [0, 1, 2, 3] and not engine.active
    assert all(s.slot == -1 and s.position == 0 and not s.generated and s.finish_reason is None for s in seqs)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma2", "gemma3_text", "bloom", "gpt2", "opt", "falcon",
                                        "qwen2_moe"])
def test_prompts_prefilled_together_through_gemms_equal_each_alone_in_every_family(model_type):
    """The GEMM path of RotaryDecoder.prefill_prompts (all prompts' tokens in one sequence, positions from 0 per
    prompt, attention per prompt) on families whose positions or masks differ: rotary tables, sliding windows
    shorter than a prompt (Gemma 2: 8, Gemma 3: 4, against 11 tokens), ALiBi (BLOOM), learned positions (GPT-2,
    OPT), parallel blocks (Falcon), experts (Qwen2-MoE). float32 throughout, so each prompt's logits and cached
    keys and values are its own alone up to float32 summation order (measured <= 6e-7 of the largest logit; a
    position or mask taken from another prompt moves them by far more: the keys too, where rotary attention
    itself would not tell a shifted position)."""
    from arch_models import tiny_model

    model, _ = tiny_model(model_type)
    prompts = [[5, 9, 17, 3, 22, 40, 8, 11, 30, 2, 19], [4, 33, 7], [12, 6, 25, 14, 9, 41, 3]]

    def decoder():
        engine = Engine(model, max_batch=4, context=64, prefill_attention_dtype=torch.float32, activations="float32")
        engine.decoder.native_prefill_tokens = 0        # the GEMM path, whatever the layout's crossover
        return engine.decoder

    def close(got, reference):
        return bool((got - reference).abs().max() <= 1e-5 * reference.abs().max())

    alone = []
    for prompt in prompts:
        single = decoder()
        logits = single.prefill_prompts([torch.tensor(prompt)], [1])[0]
        alone.append((logits, single.k_cache[:, 1, :, :len(prompt)], single.v_cache[:, 1, :, :len(prompt)]))
    slots = [2, 0, 3]
    together = decoder()
    rows = together.prefill_prompts([torch.tensor(p) for p in prompts], slots)
    for prompt, slot, row, (logits, keys, values) in zip(prompts, slots, rows, alone):
        assert close(row, logits), prompt
        assert close(together.k_cache[:, slot, :, :len(prompt)], keys), prompt
        assert close(together.v_cache[:, slot, :, :len(prompt)], values), prompt


def test_rows_sampled_together_equal_each_alone():
    """A decode step samples its rows together, grouped by sampling settings: every row's token is the one it gets
    sampled alone with its own generator, step after step (the generators advance alike)."""
    from lowbit.engine.generate import sample_rows
    from lowbit.engine.runner import sample_token

    settings = [SamplingParams(), SamplingParams(temperature=0.7), SamplingParams(temperature=0.7, top_k=5),
                SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=1.0, top_k=40, top_p=0.8)]
    params = [settings[row % len(settings)] for row in range(13)]
    together = [torch.Generator().manual_seed(row) for row in range(13)]
    alone = [torch.Generator().manual_seed(row) for row in range(13)]
    source = torch.Generator().manual_seed(99)
    for _ in range(20):
        logits = torch.randn(13, 500, generator=source) * 3
        expected = [sample_token(logits[row], params[row], alone[row]) for row in range(13)]
        assert sample_rows(logits, params, together) == expected
