"""`lowbit eval` measures quantization, not arithmetic: quality figures come from float32 arithmetic on the
quantized weights by default, whatever shortcuts the runtime's kernels take for speed."""
import pytest
import torch

import lowbit
from lowbit.eval.perplexity import tokenize_text
from lowbit.eval.report import evaluate
from lowbit.models.loading import load_model
from lowbit.runtime import cpu
from lowbit.runtime.surgery import quantized_modules, set_kernel


@pytest.fixture(scope="module")
def setup(stories_dir, tinystories_text):
    base, tokenizer = load_model(stories_dir)
    model = lowbit.load(stories_dir, quantize="rtn", bits=4, group_size=32)
    tokens = tokenize_text(tokenizer, tinystories_text.read_text()[:40000], max_tokens=2048)
    return base, model, tokens


def _kld(model, base, tokens, compute):
    return evaluate(model, tokens, "q", ctx=256, base=base, speed=False, progress=False, compute=compute).kld


@pytest.mark.parametrize("kernel", ["int4", "bf16"])
def test_float32_eval_equals_the_reference_kernel(setup, monkeypatch, kernel):
    base, model, tokens = setup
    set_kernel(model, "reference")                      # dequantize to float32 on every call: the definition
    reference = _kld(model, base, tokens, "float32")
    set_kernel(model, "int4" if kernel == "int4" else "bf16")
    # an AMX machine: the runtime's prompt GEMMs would run in bf16
    monkeypatch.setattr(cpu, "has_native_bf16", lambda: True)
    assert ("int4" if kernel == "int4" else "bf16") in {m.kernel_name for _, m in quantized_modules(model)}
    measured = _kld(model, base, tokens, "float32")
    runtime = _kld(model, base, tokens, "runtime")
    set_kernel(model, "auto")
    # float32 arithmetic on the same codes: equal up to summation order
    assert measured == pytest.approx(reference, rel=1e-4)
    # the runtime's bf16 rounding adds error of its own, which the float32 figure leaves out
    assert abs(runtime - reference) > 1e-3 * reference


def test_eval_table_states_compute_and_skips_speed(setup):
    base, model, tokens = setup
    row = evaluate(model, tokens, "q", ctx=256, base=base, speed=False, progress=False)
    assert row.compute == "float32" and row.prompt_tokens_per_s is None and row.decode_tokens_per_s is None
    with pytest.raises(lowbit.LowbitError, match="unknown compute"):
        evaluate(model, tokens, "q", ctx=256, compute="fp8", speed=False, progress=False)
    assert not cpu.float32_required()                    # the setting does not leak out of evaluate
    assert torch.get_default_dtype() == torch.float32
