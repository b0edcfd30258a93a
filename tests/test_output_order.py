"""QuantLinear's output order: a GGUF llama's q and k weights held in the file's row order (llama.cpp's
interleaved-rope rows, which the reader can leave as a view of the file) with an output order putting the products
back in transformers' order compute the same numbers, bit for bit, as the reordered copy the reader holds today:
each layer's forward (one row and a prompt's many), whole models through the compiled step (which gathers each q
and k head in C, lb_model.qk_head_order) and through the torch decoder; and orders that are not permutations, or
that the compiled step cannot apply, are refused."""
from __future__ import annotations

import contextlib
import ctypes

import pytest
import torch

from lowbit.engine.runner import Engine, fuse_linears
from lowbit.errors import LowbitError
from lowbit.runtime import clib
from lowbit.runtime.qlinear import QuantLinear
from lowbit.runtime.surgery import dequantized_copy, install_quantized

from arch_models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(clib.native_library() is None, reason="no C compiler: compiled kernels unavailable")

# (GGUF type, config overrides): GQA with head_dim 16 in Q8_0 blocks, GQA with head_dim 64 and multi-head
# attention with head_dim 16 in Q4_K_M (K-quant blocks need 256 inputs)
SHAPES = {
    "q8_0-gqa-d16": ("Q8_0", dict()),
    "q4km-gqa-d64": ("Q4_K_M", dict(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                                    num_key_value_heads=2)),
    "q4km-mha-d16": ("Q4_K_M", dict(hidden_size=256, intermediate_size=256, num_attention_heads=16,
                                    num_key_value_heads=16)),
}
PROJECTIONS = ("q_proj", "k_proj")


def _file_order_model(path):
    """The GGUF at `path` loaded kept quantized, with every q_proj / k_proj replaced by one holding the file's
    row order and an output order back to transformers' (what the reader can hold as a view of the file);
    and the output orders, by module name."""
    from lowbit.models.arch import architecture_for
    from lowbit.models.arch.base import gguf_row_order
    from lowbit.models.loading import load_model

    model, _ = load_model(path, keep_quantized=True)
    arch = architecture_for(model)
    orders = {}
    for name, module in list(model.named_modules()):
        if not name.endswith(PROJECTIONS):
            continue
        qw = module.qweight
        order = gguf_row_order(arch, model.config, f"{name}.weight", qw.out_features)   # file rows = hf rows[order]
        stored = qw.scheme.from_blocks(qw.extra["blocks"][order].contiguous(), qw.shape)
        orders[name] = torch.argsort(order)
        install_quantized(model, name, stored, kernel=module.kernel_preference, output_order=orders[name])
    return model, orders


@pytest.fixture(scope="module", params=list(SHAPES))
def models(request, tmp_path_factory):
    """(shape name, config, today's model: q / k rows reordered in a copy, the file-order model, its orders)."""
    from lowbit.formats.gguf import export_gguf
    from lowbit.models.loading import load_model

    gguf_type, overrides = SHAPES[request.param]
    model, config = tiny_model("llama", **overrides)
    path = tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf"
    export_gguf(model, tiny_tokenizer(), path, type=gguf_type, progress=False)
    reordered, _ = load_model(path, keep_quantized=True)
    stored, orders = _file_order_model(path)
    return request.param, config, reordered, stored, orders


def test_the_output_order_is_the_inverse_of_the_file_order(models):
    """argsort of gguf_row_order (HF -> file) is unpermute_qk of the rows (file -> HF) for q over its heads and k
    over its kv heads: one order within a head, repeated over the heads."""
    from lowbit.models.arch.base import permute_qk, unpermute_qk

    _, config, _, stored, orders = models
    head_dim = config.hidden_size // config.num_attention_heads
    for name, order in orders.items():
        heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
        rows = torch.arange(heads * head_dim)
        assert torch.equal(order, unpermute_qk(rows, heads)), name
        assert not torch.equal(order, permute_qk(rows, heads)), name       # the other direction differs
        assert torch.equal(stored.get_submodule(name).output_order, order)


@pytest.mark.parametrize("rows", [1, 3, 64, 130])
def test_forward_equals_the_reordered_copy(models, rows):
    """One row (decode), a few, and prompts of 64+ rows (the prefill GEMMs): bit-exact; the weight property and
    dequantized_copy give transformers' row order; the file-order blocks are different bytes in a different
    order (the test is not comparing a layer with itself)."""
    _, config, reordered, stored, orders = models
    x = torch.randn(rows, config.hidden_size, generator=torch.Generator().manual_seed(rows))
    for name in orders:
        ours, reference = stored.get_submodule(name), reordered.get_submodule(name)
        assert not torch.equal(ours.qweight.extra["blocks"], reference.qweight.extra["blocks"])
        with torch.no_grad():
            assert torch.equal(ours(x), reference(x)), name
            assert torch.equal(ours(x[None])[0], reference(x)), name      # a leading batch dimension
        assert torch.equal(ours.weight, reference.weight)
        assert torch.equal(ours.ordered_qweight().extra["blocks"], reference.qweight.extra["blocks"])
    plain, expected = dequantized_copy(stored), dequantized_copy(reordered)
    for name in orders:
        assert torch.equal(plain.get_submodule(name).weight, expected.get_submodule(name).weight)


def test_forward_with_a_bias_adds_it_in_output_order():
    """The bias belongs to the outputs (transformers' order): added after the gather, in the kernel path and the
    differentiable one (adapters train through it)."""
    from lowbit.schemes.intgrid import IntGrid

    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(24, 64, generator=generator), torch.randn(24, generator=generator)
    order = torch.randperm(24, generator=generator)
    qw = IntGrid(bits=4, group_size=32).quantize(weight)
    stored = IntGrid(bits=4, group_size=32).quantize(weight[torch.argsort(order)])   # stored[order] = weight
    x = torch.randn(5, 64, generator=generator)
    reference = QuantLinear(qw, bias)
    ours = QuantLinear(stored, bias, output_order=order)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))
    leaf, expected_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, expected = ours(leaf), reference(expected_leaf)
    y.square().sum().backward()
    expected.square().sum().backward()
    assert torch.equal(y.detach(), expected.detach())
    # grad_x sums over the outputs, in the stored order here: equal up to float32 rounding of a 24-term sum
    bound = 24 * 2 ** -23 * (2 * expected.detach().abs()) @ reference.weight.abs() + 1e-6
    assert ((leaf.grad - expected_leaf.grad).abs() <= bound).all()
    assert torch.equal(ours.weight, reference.weight)
    described, _ = clib.linear_spec(ours, stored_order=True)      # C adds the bias to the stored rows
    assert torch.equal(clib.linear(described, x)[:, order], clib.linear(clib.linear_spec(reference)[0], x))


def test_orders_that_are_not_permutations_are_one_line_errors():
    from lowbit.schemes.intgrid import IntGrid

    qw = IntGrid(bits=4, group_size=32).quantize(torch.randn(8, 32))
    for order, words in ((torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]), "permutation of 0..7"),
                         (torch.tensor([0, 1, 2, 3, 4, 5, 6, 8]), "permutation of 0..7"),
                         (torch.tensor([-1, 1, 2, 3, 4, 5, 6, 0]), "permutation of 0..7"),
                         (torch.arange(7), "tensor of 8 values"), (torch.arange(16).view(2, 8), "tensor of 8 values"),
                         (torch.arange(8).float(), "integer tensor"), ([0, 1, 2, 3, 4, 5, 6, 7], "integer tensor")):
        with pytest.raises(LowbitError, match=words) as error:
            QuantLinear(qw, output_order=order)
        assert "\n" not in str(error.value)
    assert QuantLinear(qw, output_order=torch.arange(8)).output_order is None     # the identity needs no gather


def test_only_linears_take_output_orders(models):
    _, _, _, stored, _ = models
    table = stored.get_submodule("model.embed_tokens")
    with pytest.raises(LowbitError, match="embedding table's rows") as error:
        install_quantized(stored, "model.embed_tokens", table.qweight,
                          output_order=torch.arange(table.qweight.out_features).flip(0))
    assert "\n" not in str(error.value)


def test_ordered_weights_are_never_described_to_c_without_their_order(models):
    """linear_spec refuses an ordered QuantLinear unless the caller gathers the outputs itself; fused q|k|v
    stacks the stored rows and composes the orders, to the same numbers."""
    _, config, reordered, stored, orders = models
    name = next(iter(orders))
    assert clib.linear_spec(stored.get_submodule(name)) is None
    assert clib.linear_spec(stored.get_submodule(name), stored_order=True) is not None
    attention = "model.layers.0.self_attn"
    parts = [f"{attention}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    fused = fuse_linears([stored.get_submodule(p) for p in parts])
    expected = fuse_linears([reordered.get_submodule(p) for p in parts])
    assert fused.output_order is not None and expected.output_order is None
    x = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fused(x), expected(x))


def _run(engine: Engine, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Logits of each prompt's prefill (each in its own slot), then of `steps` greedy decode steps of all prompts
    together: [rows, vocab] per call."""
    decoder = engine.decoder
    out = []
    tokens = []
    for slot, prompt in enumerate(prompts):
        logits = decoder.forward(torch.tensor([prompt]), slice(slot, slot + 1), torch.tensor([0]))
        out.append(logits)
        tokens.append(int(logits[0].argmax()))
    positions = torch.tensor([len(p) for p in prompts])
    slots = torch.arange(len(prompts))
    for _ in range(steps):
        logits = decoder.decode(torch.tensor(tokens), slots, positions)
        out.append(logits)
        tokens = logits.argmax(-1).tolist()
        positions = positions + 1
    return out


PROMPTS = [[1, 17, 33, 5, 60, 8, 41], [1, 9, 70, 22], [1, 50]]


@pytest.mark.parametrize("native", [True, False], ids=["compiled step", "torch decoder"])
def test_engine_logits_equal_the_reordered_copy(models, native):
    """Three prompts in three slots, then 16 greedy steps of the three together: the same logits, bit for bit,
    through the compiled step (q and k heads gathered in C) and through the torch decoder (fused q|k|v with the
    composed order); a prompt of 40 tokens alone too (the compiled step's many-row matmuls)."""
    _, config, reordered, stored, _ = models
    engines = [Engine(model, context=64, max_batch=len(PROMPTS), native=native) for model in (reordered, stored)]
    for engine in engines:
        if native:
            assert engine.decode_path == "compiled step"
        else:
            assert engine.decode_path.startswith("torch decoder")
    if native:
        assert engines[0].decoder.native.spec.qk_head_order is None
        head_order = engines[1].decoder.native.spec.qk_head_order
        assert head_order and head_order in {t.data_ptr() for t in engines[1].decoder.native.keep}
    ours, reference = (_run(engine, PROMPTS, 16) for engine in engines)
    assert len(ours) == len(PROMPTS) + 16
    for got, expected in zip(ours, reference):
        assert torch.equal(got, expected)
    long_prompt = [1] + [(7 * i) % 90 + 3 for i in range(39)]
    ours, reference = (_run(engine, [long_prompt], 4) for engine in engines)
    for got, expected in zip(ours, reference):
        assert torch.equal(got, expected)


def test_compiled_step_refuses_orders_it_cannot_gather(models):
    """Only q and k with one order within every head of every layer run in the compiled step: an order on v, on
    q alone, or different in one layer, and the engine runs the torch decoder (which computes them right)."""
    _, config, reordered, _, _ = models

    def with_orders(edits):
        model = _copy(reordered)
        for name, order in edits.items():
            module = model.get_submodule(name)
            install_quantized(model, name, module.qweight, output_order=order)
        return model

    head_dim = config.hidden_size // config.num_attention_heads
    rows = {p: model_rows for p, model_rows in (("q_proj", config.num_attention_heads * head_dim),
                                                ("k_proj", config.num_key_value_heads * head_dim),
                                                ("v_proj", config.num_key_value_heads * head_dim))}
    flip = lambda n: torch.arange(n).flip(0)  # noqa: E731  (not one order within every head)
    attention = "model.layers.{}.self_attn.{}"
    per_head = torch.arange(head_dim).roll(1)
    same = lambda n: (torch.arange(n).view(-1, head_dim)[:, per_head]).reshape(-1)  # noqa: E731
    cases = {
        "layer 0 v": {attention.format(0, "v_proj"): flip(rows["v_proj"])},
        "layer 0: q and k": {attention.format(0, "q_proj"): same(rows["q_proj"])},
        "q and k outputs not reordered by one order": {attention.format(0, "q_proj"): flip(rows["q_proj"]),
                                                       attention.format(0, "k_proj"): flip(rows["k_proj"])},
        "reordered differently": {attention.format(0, "q_proj"): same(rows["q_proj"]),
                                  attention.format(0, "k_proj"): same(rows["k_proj"])},
        "layer 1 o": {attention.format(1, "o_proj"): flip(config.hidden_size)},
        "lm_head": {"lm_head": flip(config.vocab_size)},
    }
    for words, edits in cases.items():
        model = with_orders(edits)
        engine = Engine(model, context=64)
        assert engine.decode_path.startswith("torch decoder") and words in engine.decode_path, (words,
                                                                                                 engine.decode_path)
        # the torch decoder computes them: the logits of a float model holding the same (reordered) weights
        plain = Engine(dequantized_copy(model), context=64, native=False)
        prompt = torch.tensor([[1, 17, 33, 5]])
        got = engine.decoder.forward(prompt, slice(0, 1), torch.tensor([0]))
        expected = plain.decoder.forward(prompt, slice(0, 1), torch.tensor([0]))
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max(), words


def _copy(model):
    import copy

    return copy.deepcopy(model)


@contextlib.contextmanager
def _head_order(native, values: list[int]):
    """The compiled step's spec pointing at `values` as its q/k head order (kept alive), restored after."""
    original = native.spec.qk_head_order
    corrupt = torch.tensor(values, dtype=torch.int64)
    native.keep.append(corrupt)
    native.spec.qk_head_order = corrupt.data_ptr()
    try:
        yield
    finally:
        native.spec.qk_head_order = original
        native.keep.pop()


def test_c_refuses_a_corrupt_head_order(models):
    """lowbit_check_model reads qk_head_order: a value outside the head, or one repeated, is LB_ERR_MODEL_ORDER
    (23) naming it, and check_decode_model a one-line LowbitError; an array shorter than head_dim is refused by
    Python before C reads it."""
    from lowbit.runtime import checks

    _, config, _, stored, _ = models
    engine = Engine(stored, context=64)
    native = engine.decoder.native
    lib, spec = native.lib, native.spec
    head_dim = spec.head_dim
    detail = ctypes.create_string_buffer(256)
    assert lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail)) == 0
    for values, words in ((list(range(1, head_dim)) + [head_dim], f"dimension {head_dim} at {head_dim - 1}"),
                          ([0] + list(range(head_dim - 1)), f"dimension 0 at 1"),
                          ([-1] + list(range(1, head_dim)), "dimension -1 at 0")):
        with _head_order(native, values):
            assert lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail)) == 23, detail.value
            assert words in detail.value.decode()
            with pytest.raises(LowbitError, match=r"compiled step: .*\(status 23\)$") as error:
                checks.check_decode_model(lib, spec, engine.decoder, native.keep)
            assert "\n" not in str(error.value)
    with _head_order(native, list(range(head_dim - 1))):
        with pytest.raises(LowbitError, match=f"holds {head_dim - 1} values") as error:
            checks.check_decode_model(lib, spec, engine.decoder, native.keep)
        assert "\n" not in str(error.value)
    assert lib.lowbit_check_model(ctypes.byref(spec), detail, len(detail)) == 0


def test_a_fused_qkv_reordered_by_rows_composes_the_output_order():
    """runner._rows_reordered (a fused query_key_value put in q|k|v order) of a QuantLinear with an output order
    stores its rows in the composed order: the copy's outputs are the original's in the new order, bit for bit,
    with no order left (the compiled step can read it)."""
    from lowbit.engine.runner import _rows_reordered
    from lowbit.schemes.ggml import GGMLScheme, quantize_rows

    generator = torch.Generator().manual_seed(7)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    qw = GGMLScheme("Q8_0").from_blocks(quantize_rows(weight.numpy(), "Q8_0"), (48, 64))
    original = QuantLinear(qw, bias, output_order=torch.randperm(48, generator=generator))
    order = torch.randperm(48, generator=generator)
    copy = _rows_reordered(original, order)
    assert copy.output_order is None and clib.linear_spec(copy) is not None
    x = torch.randn(5, 64, generator=generator)
    with torch.no_grad():
        assert torch.equal(copy(x), original(x)[:, order])
