"""lowbit's compiled kernels (runtime/clib.py, csrc/) and the engine's compiled decode step against float
references: every weight layout and statistics storage, int8 activations within their derived error bound, the
portable (no AVX-512) build, and whole decode steps against the torch decoder and transformers."""
from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine
from lowbit.errors import LowbitError
from lowbit.runtime import clib
from lowbit.runtime.clib import LB_F32, LB_NIB, LB_U8, LinearSpec, compact_statistics, pack_nibbles
from lowbit.runtime.surgery import dequantized_copy

from conftest import tiny_llama

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")


def _affine(n: int, k: int, group: int, bits: int, stats: str, seed: int = 0):
    """(codes, a, b, dense weight) with w = a * q + b per group; `stats` picks how a and b are made so that
    compact_statistics lands on each storage: 'f32' (arbitrary floats), 'f16', 'offset' (b = -zero * a, a in
    float16), 'f32-offset' (the same with a float32 a)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 2 ** bits, (n, k), generator=gen, dtype=torch.uint8)
    a = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    if stats not in ("f32", "f32-offset"):
        a = a.half().float()
    b = {"f32": torch.randn(n, groups, generator=gen) * 0.3,
         "f16": (torch.randn(n, groups, generator=gen) * 0.3).half().float(),
         "offset": -(2 ** (bits - 1)) * a, "f32-offset": -(2 ** (bits - 1)) * a}[stats]
    expand = lambda t: t.repeat_interleave(group, 1)[:, :k]  # noqa: E731
    return codes, a, b, codes.float() * expand(a) + expand(b)


def _spec(kind: int, codes, a, b, group: int, bias=None):
    storage, a2, b2, offset = compact_statistics(a, b)
    w = pack_nibbles(codes) if kind == LB_NIB else codes.contiguous()
    spec = LinearSpec(kind, codes.shape[0], codes.shape[1], a.shape[1], group, w.data_ptr(), a2.data_ptr(),
                      b2.data_ptr(), None if bias is None else bias.data_ptr(), storage, offset)
    return spec, [w, a2, b2, bias], storage


CASES = [  # (kind, n, k, group, bits)
    (LB_NIB, 37, 576, 32, 4), (LB_NIB, 64, 576, 128, 4), (LB_NIB, 40, 96, 64, 4),   # ragged last group
    (LB_NIB, 24, 256, 16, 3), (LB_NIB, 20, 192, 192, 4),                           # K-quant groups, per channel
    (LB_U8, 33, 576, 32, 5), (LB_U8, 16, 200, 200, 8), (LB_U8, 12, 96, 48, 6),   # any width, any group
]


def _float_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case float32 rounding of a K-term dot product, summed in any order: K * eps * sum |x w|."""
    return x.shape[1] * 2 ** -23 * (x.abs() @ w.abs().T) + 1e-6


@pytest.mark.parametrize("kind,n,k,group,bits", CASES)
@pytest.mark.parametrize("stats", ["f32", "f16", "offset", "f32-offset"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_linear_matches_dequantized_matmul(kind, n, k, group, bits, stats, rows):
    codes, a, b, w = _affine(n, k, group, bits, stats, seed=rows)
    bias = torch.randn(n)
    spec, keep, storage = _spec(kind, codes, a, b, group, bias)
    assert storage == {"f32": clib.LB_STATS_F32, "f16": clib.LB_STATS_F16, "offset": clib.LB_STATS_F16_OFFSET,
                       "f32-offset": clib.LB_STATS_F32_OFFSET}[stats]
    x = torch.randn(rows, k)
    ref = x.double() @ w.double().T + bias.double()
    y = clib.linear(spec, x)
    assert ((y.double() - ref).abs() <= _float_bound(x, w).double() + 1e-5).all()


def test_float_weights_and_thread_counts_agree():
    w = torch.randn(50, 72)
    spec = LinearSpec(LB_F32, 50, 72, 0, 0, w.data_ptr(), None, None, None, 0, 0.0)
    x = torch.randn(4, 72)
    one = clib.linear(spec, x)
    torch.set_num_threads(2)
    two = clib.linear(spec, x)
    assert torch.equal(one, two)            # rows are split over threads, each sum is computed the same way
    assert ((one - x @ w.T).abs() <= _float_bound(x, w)).all()


HALF_DTYPES = {"f16": (torch.float16, clib.LB_F16), "bf16": (torch.bfloat16, clib.LB_BF16)}


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("n,k", [(37, 72), (150, 200), (1503, 300), (6, 7)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_half_float_weights_are_read_in_their_dtype(dtype, n, k, rows):
    """A float16 / bfloat16 Linear is described as LB_F16 / LB_BF16 pointing at its own storage (no float32
    copy), and the kernel computes x W^T of the same values to float32 rounding (widths not multiples of 16 or 8
    take the masked / scalar tails; 1503 rows is a vocabulary-like count not a multiple of 4)."""
    torch_dtype, kind = HALF_DTYPES[dtype]
    generator = torch.Generator().manual_seed(n + k + rows)
    layer = torch.nn.Linear(k, n, bias=True, dtype=torch_dtype)
    layer.weight.data = torch.randn(n, k, generator=generator).to(torch_dtype)
    layer.bias.data = torch.randn(n, generator=generator).to(torch_dtype)
    spec, keep = clib.linear_spec(layer)
    assert spec.kind == kind and spec.w == layer.weight.data_ptr()
    w = layer.weight.detach().float()
    x = torch.randn(rows, k, generator=generator)
    reference = x.double() @ w.double().T + layer.bias.detach().double()
    y = clib.linear(spec, x)
    assert ((y.double() - reference).abs() <= _float_bound(x, w).double() + 1e-5).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_float_weights_need_two_bytes_per_value(dtype):
    """csrc/checks.c counts 2 bytes a value for LB_F16 / LB_BF16 (4 for LB_F32): a buffer one byte short is
    refused, and so is a 16-bit buffer described as float32."""
    from lowbit.runtime.checks import check_status

    torch_dtype, kind = HALF_DTYPES[dtype]
    lib = clib.native_library()
    w = torch.randn(24, 40).to(torch_dtype)
    spec = LinearSpec(kind, 24, 40, 0, 0, w.data_ptr(), None, None, None, 0, 0.0)
    assert lib.lowbit_check_linear(ctypes.byref(spec), 24 * 40 * 2, 0, 0, 0, 0, 0) == 0
    assert lib.lowbit_check_linear(ctypes.byref(spec), 24 * 40 * 2 - 1, 0, 0, 0, 0, 0) == 4
    wide = LinearSpec(LB_F32, 24, 40, 0, 0, w.data_ptr(), None, None, None, 0, 0.0)
    assert lib.lowbit_check_linear(ctypes.byref(wide), 24 * 40 * 2, 0, 0, 0, 0, 0) == 4
    with pytest.raises(LowbitError, match="fewer weight bytes"):
        check_status(lib.lowbit_check_linear(ctypes.byref(spec), 100, 0, 0, 0, 0, 0), "a short head", lib)


@pytest.mark.parametrize("flags", [["-mavx2", "-mfma", "-mf16c"],
                                   pytest.param(["-mavx2", "-mfma"], marks=pytest.mark.slow)])
def test_half_float_weights_on_an_avx2_build(tmp_path, flags):
    """The AVX2 tiles (machines without AVX-512; with F16C, and without it: halves converted one by one) read
    float16 / bfloat16 weights to the same float32 rounding bound."""
    import shutil
    import subprocess

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    target = tmp_path / "avx2.so"
    build = subprocess.run(["gcc", "-O3", *flags, "-fopenmp", "-shared", "-fPIC", "-o", str(target),
                            *map(str, clib.SOURCES), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    avx2 = clib.load_library(target)
    assert avx2.lowbit_kernel_has_avx512() == 0
    for torch_dtype, _ in HALF_DTYPES.values():
        for n, k in [(37, 72), (1503, 300), (6, 7)]:
            layer = torch.nn.Linear(k, n, dtype=torch_dtype)
            spec, keep = clib.linear_spec(layer)
            x, w = torch.randn(3, k), layer.weight.detach().float()
            reference = x.double() @ w.double().T + layer.bias.detach().double()
            y = clib.linear(spec, x, lib=avx2)
            assert ((y.double() - reference).abs() <= _float_bound(x, w).double() + 1e-5).all(), (torch_dtype, k)


@pytest.mark.skipif(not clib.has_act8(), reason="this CPU has neither AVX2 nor AVX-512 VNNI: int8 activations unavailable")
@pytest.mark.parametrize("kind,n,k,group,bits", [c for c in CASES if c[3] % 32 == 0 and c[2] % 32 == 0])
@pytest.mark.parametrize("rows", [1, 4])
def test_int8_activations_stay_within_their_rounding_bound(kind, n, k, group, bits, rows):
    """Activations are rounded to int8 per 32 columns (step d = absmax / 127, error <= d / 2 each), so
    |y - x W^T| <= sum_k |w_k| d_chunk(k) / 2, plus float rounding."""
    codes, a, b, w = _affine(n, k, group, bits, "offset", seed=rows)
    spec, keep, _ = _spec(kind, codes, a, b, group)
    x = torch.randn(rows, k) * torch.linspace(0.1, 3.0, k)    # chunks of different scales
    step = x.abs().view(rows, k // 32, 32).amax(-1) / 127
    bound = (w.abs() @ (step.repeat_interleave(32, 1) / 2).T).T + 2 * _float_bound(x, w)
    ref = x @ w.T
    y = clib.linear(spec, x, act8=True)
    assert ((y - ref).abs() <= bound).all()
    assert (y - ref).abs().max() > 0          # it really is the int8 path


def test_portable_build_matches_the_native_one(tmp_path):
    """The library built without -march=native (plain C loops, what a CPU without AVX-512 runs) computes the same
    numbers as the vectorised one, within float32 rounding."""
    result = clib.compile_library(tmp_path / "portable.so", march_native=False)
    assert result.returncode == 0, result.stderr
    portable = clib.load_library(tmp_path / "portable.so")
    assert portable.lowbit_kernel_has_avx512() == 0 and portable.lowbit_has_act8() == 0
    for kind, n, k, group, bits in CASES:
        codes, a, b, w = _affine(n, k, group, bits, "f16")
        spec, keep, _ = _spec(kind, codes, a, b, group)
        x = torch.randn(3, k)
        y = clib.linear(spec, x, act8=True, lib=portable)      # act8 is ignored where it is not built
        assert ((y - x @ w.T).abs() <= _float_bound(x, w) + 1e-5).all(), (kind, k, group)
    for torch_dtype, kind in HALF_DTYPES.values():
        layer = torch.nn.Linear(200, 37, bias=False, dtype=torch_dtype)
        spec, keep = clib.linear_spec(layer)
        x, w = torch.randn(3, 200), layer.weight.detach().float()
        y = clib.linear(spec, x, lib=portable)
        assert ((y - x @ w.T).abs() <= _float_bound(x, w) + 1e-5).all(), torch_dtype


# -- the whole decode step ------------------------------------------------------------------------------------

def _quantized(model, **config):
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    model = copy.deepcopy(model)
    quantize_model(model, QuantizeConfig(skip=(), **config), progress=False)
    return model


def _decode_logits(model, native: bool, prompts: list[list[int]], steps: int = 6) -> tuple[list, torch.Tensor]:
    """Greedy tokens of several sequences decoded together, and the logits of their last step."""
    engine = Engine(model, max_batch=len(prompts) + 1, context=64, native=native,
                    prefill_attention_dtype=torch.float32)
    assert (engine.decoder.native is not None) == native
    seqs = [engine.start(p, SamplingParams(max_new_tokens=steps + 2, temperature=0.0), stop_on_eos=False)
            for p in prompts]
    for _ in range(steps):
        engine.step()
    logits = engine.decoder.decode(torch.tensor([s.generated[-1] for s in seqs]),
                                   torch.tensor([s.slot for s in seqs]), torch.tensor([s.position for s in seqs]))
    return [s.generated for s in seqs], logits


MODEL_CONFIGS = {
    "fp32": None,
    "rtn4-g32": dict(method="rtn", bits=4, group_size=32),
    "rtn4-g64-asym": dict(method="rtn", bits=4, group_size=64, symmetric=False),
    "rtn3-g16": dict(method="rtn", bits=3, group_size=16),
    "rtn8-channel": dict(method="rtn", bits=8, group_size=-1),
    "rtn5-g32": dict(method="rtn", bits=5, group_size=32),
    "nf4": dict(method="nf4"),
    "nf4-double-quant": dict(method="nf4", options={"double_quant": True}),
    "fp4": dict(method="fp4"),
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_compiled_step_equals_torch_decoder(name):
    """Same weights, same cache: the compiled step's logits equal the torch decoder's (running the float32
    reference kernel) to float32 rounding, for sequences at different positions in different slots; integer
    grids of every width and NF4/FP4 codebooks (double-quantized absmax too)."""
    from lowbit.runtime.surgery import set_kernel

    base = tiny_llama(hidden=128, intermediate=192, layers=2, vocab=96, seed=3)
    model = base if MODEL_CONFIGS[name] is None else _quantized(base, **MODEL_CONFIGS[name])
    set_kernel(model, "reference")
    if name.startswith(("nf4", "fp4")):     # codebooks: blocks of 64 within rows, LB_NIB with a table
        kinds = {spec.kind for spec in (clib.linear_spec(m)[0] for m in model.modules()
                                        if type(m).__name__ == "QuantLinear")}
        assert kinds == {LB_NIB}
    prompts = [[1, 5, 9], [2, 7, 11, 13, 17, 19], [3]]
    tokens_c, logits_c = _decode_logits(model, True, prompts)
    tokens_t, logits_t = _decode_logits(model, False, prompts)
    assert tokens_c == tokens_t
    spread = logits_t.max() - logits_t.min()
    assert (logits_c - logits_t).abs().max() <= 1e-4 * spread


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_compiled_step_handles_biases_and_head_norms(model_type):
    """Qwen2's q/k/v biases and Qwen3's per-head q/k norms run in the compiled step as in the torch decoder."""
    import transformers

    config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[model_type]
    model_class = {"qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[model_type]
    torch.manual_seed(0)
    config = config_class(hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=80, head_dim=32, max_position_embeddings=64,
                          tie_word_embeddings=False)
    model = model_class(config).eval()
    for module in model.modules():       # non-zero biases so that leaving one out would show
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.normal_(module.bias, std=0.5)
    from lowbit.runtime.surgery import set_kernel

    model = _quantized(model, method="rtn", bits=4, group_size=32)
    set_kernel(model, "reference")
    prompts = [[1, 2, 3], [4, 5]]
    tokens_c, logits_c = _decode_logits(model, True, prompts)
    tokens_t, logits_t = _decode_logits(model, False, prompts)
    assert tokens_c == tokens_t
    assert (logits_c - logits_t).abs().max() <= 1e-4 * (logits_t.max() - logits_t.min())


def test_unsupported_layouts_fall_back_to_the_torch_decoder():
    base = tiny_llama(hidden=128, intermediate=192, layers=1, vocab=64)
    int8 = _quantized(base, method="int8")                 # LLM.int8: outlier columns kept in float
    assert Engine(int8, context=32).decoder.native is None
    assert Engine(base, context=32, kv_dtype=torch.bfloat16).decoder.native is None
    engine = Engine(int8, context=32)
    assert len(list(engine.generate([1, 2], SamplingParams(max_new_tokens=4, temperature=0.0)))) >= 1


def test_compiled_step_greedy_matches_transformers_on_a_real_model(stories):
    """stories260K quantized RTN 4-bit g32, default engine (compiled step, float32 arithmetic) vs transformers
    running the dequantized weights: the same 64 greedy tokens."""
    model, tokenizer = stories
    quantized = _quantized(model, method="rtn", bits=4, group_size=32)
    reference = dequantized_copy(quantized)
    prompt = tokenizer("Once upon a time").input_ids
    engine = Engine(quantized, tokenizer, context=128, prefill_attention_dtype=torch.float32)
    assert engine.decoder.native is not None
    ours = list(engine.generate(prompt, SamplingParams(max_new_tokens=64, temperature=0.0), stop_on_eos=False))
    with torch.inference_mode():   # transformers' own forward and KV cache, argmax each step
        out = reference(torch.tensor([prompt]), use_cache=True)
        theirs = [int(out.logits[0, -1].argmax())]
        for _ in range(63):
            out = reference(torch.tensor([[theirs[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            theirs.append(int(out.logits[0, -1].argmax()))
    assert ours == theirs


@pytest.mark.skipif(not clib.has_act8(), reason="this CPU has neither AVX2 nor AVX-512 VNNI: int8 activations unavailable")
def test_int8_activations_step_stays_close(stories):
    """With int8 activations the next-token choice of stories260K RTN 4-bit agrees with the float32 step
    almost everywhere (teacher-forced over a real story)."""
    model, tokenizer = stories
    quantized = _quantized(model, method="rtn", bits=4, group_size=32)
    ids = tokenizer("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                    "park with her friends. One day, she saw a big red ball.").input_ids
    choices = {}
    for act8 in (False, True):
        engine = Engine(quantized, tokenizer, context=128, activations="int8" if act8 else "float32")
        engine.start(ids[:1], SamplingParams(max_new_tokens=len(ids), temperature=0.0), stop_on_eos=False)
        picked = []
        for position, token in enumerate(ids[1:], start=1):
            logits = engine.decoder.decode(torch.tensor([token]), torch.tensor([0]), torch.tensor([position]))
            picked.append(int(logits.argmax()))
        choices[act8] = torch.tensor(picked)
    assert (choices[True] == choices[False]).float().mean() >= 0.9


def test_gguf_tied_output_runs_on_the_embedding_blocks(smollm2_gguf):
    """A GGUF with a tied, quantized token embedding (Q8_0 in SmolLM2's Q4_1 file) loads with its output
    projection on those same blocks, as llama.cpp computes it, not on the float copy the lookup table keeps."""
    from lowbit.models.loading import load_model
    from lowbit.runtime.qlinear import QuantLinear

    model, _ = load_model(smollm2_gguf, keep_quantized=True)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.qweight.scheme.name == "ggml-Q8_0"
    assert torch.equal(model.lm_head.qweight.dequantize(), model.model.embed_tokens.weight)
    assert not model.config.tie_word_embeddings


def _act_order(qw, seed: int = 0):
    """The same weight as an act-order checkpoint stores it: columns in another order, g_idx saying each
    column's group (so the groups are no longer contiguous runs)."""
    from lowbit.quantized import QuantizedWeight

    inverse = torch.randperm(qw.in_features, generator=torch.Generator().manual_seed(seed))
    return QuantizedWeight(qw.scheme, qw.shape, codes=qw.codes[:, inverse].contiguous(), scales=qw.scales,
                           zeros=qw.zeros, group_size=qw.group_size,
                           g_idx=(torch.arange(qw.in_features) // qw.effective_group_size)[inverse].to(torch.int32))


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_act_order_weights_run_without_dequantizing(bits, group):
    """g_idx weights are sorted into contiguous groups once and activations gathered per call: the compiled
    kernel (decode rows) and the prefill path both equal the dequantized matmul."""
    from lowbit.runtime.kernels import select_kernel
    from lowbit.runtime.qlinear import QuantLinear
    from lowbit.schemes.intgrid import IntGrid

    qw = _act_order(IntGrid(bits=bits, group_size=group, symmetric=False).quantize(torch.randn(40, 256)))
    w = qw.dequantize()
    assert clib.column_order(qw) is not None
    spec, keep = clib.affine_spec(qw)
    x = torch.randn(3, 256)
    assert ((clib.linear(spec, x) - x @ w.T).abs() <= _float_bound(x, w) + 1e-5).all()
    layer = QuantLinear(qw)
    assert select_kernel(qw).name == "u8"
    many = torch.randn(20, 256)                    # prefill-sized: bf16 GEMM on the sorted weight
    # x and W each rounded to bf16 (relative error 2^-9 each) before a float32 sum
    assert ((layer(many) - many @ w.T).abs() <= 2 ** -8 * (many.abs() @ w.abs().T) + 1e-4).all()


def test_unequal_groups_are_refused():
    from lowbit.quantized import QuantizedWeight
    from lowbit.schemes.intgrid import IntGrid

    qw = IntGrid(bits=4, group_size=32).quantize(torch.randn(8, 64))
    lopsided = QuantizedWeight(qw.scheme, qw.shape, codes=qw.codes, scales=qw.scales, zeros=qw.zeros,
                               group_size=32, g_idx=torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32))
    with pytest.raises(ValueError):
        clib.column_order(lopsided)
    assert clib.affine_spec(lopsided) is None


def test_compiled_step_gives_the_same_numbers_on_any_thread_count():
    """Threads split output rows and heads, never a sum: two threads compute exactly what one does."""
    model = _quantized(tiny_llama(hidden=128, intermediate=192, layers=2, vocab=96), method="rtn", bits=4,
                       group_size=32)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        engine = Engine(model, max_batch=3, context=32)
        engine.decoder.native.max_threads = None      # small models normally run on one thread
        seqs = [engine.start(p, SamplingParams(max_new_tokens=8, temperature=0.0), stop_on_eos=False)
                for p in ([1, 2, 3], [4, 5], [6])]
        for _ in range(5):
            engine.step()
        results.append(engine.decoder.decode(torch.tensor([s.generated[-1] for s in seqs]),
                                             torch.tensor([s.slot for s in seqs]),
                                             torch.tensor([s.position for s in seqs])))
    assert torch.equal(results[0], results[1])
