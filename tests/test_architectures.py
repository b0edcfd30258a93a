"""Every registry family on a tiny random model built with transformers: quantize (RTN, GPTQ, AWQ, NF4),
generate greedily and compare with transformers' own model class holding the dequantized weights, save and
load, export to GGUF and import back; unknown architectures are refused early and no model code ever runs."""
from __future__ import annotations

import copy
import json
import os
import time

import pytest
import torch

from lowbit.errors import LowbitError, UnsupportedArchitecture
from lowbit.methods.base import QuantizeConfig
from lowbit.methods.pipeline import quantize_model
from lowbit.models.arch import all_architectures, architecture_for
from lowbit.runtime.surgery import quantized_modules, set_kernel

from arch_models import MODEL_TYPES, greedy_lowbit, greedy_reference, reference_model, tiny_model, tiny_tokenizer

PROMPT = torch.tensor([1, 5, 17, 33, 8, 9, 40, 12])
N_NEW = 12
METHODS = {
    "rtn": QuantizeConfig(bits=4, group_size=32, skip=()),
    "gptq": QuantizeConfig(method="gptq", bits=4, group_size=32, skip=(), options={"calib_samples": 4}),
    "awq": QuantizeConfig(method="awq", bits=4, group_size=32, skip=(), options={"calib_samples": 4}),
    "nf4": QuantizeConfig(method="nf4", bits=4, group_size=32, skip=()),
}


def calibration_tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(seed))


def quantized(model_type: str, method: str):
    model, _ = tiny_model(model_type)
    config = copy.deepcopy(METHODS[method])
    calibration = calibration_tokens() if method in ("gptq", "awq") else None
    q = quantize_model(copy.deepcopy(model), config, calibration=calibration, progress=False)
    set_kernel(q, "reference")   # exact fp32 products: the greedy text is comparable token for token
    return model, q


def test_registry_covers_every_family():
    families = {a.family for a in all_architectures()}
    assert {"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "bloom", "gpt_neox", "opt", "falcon",
            "gpt2", "mixtral", "qwen2_moe", "qwen3_moe"} <= families
    for model_type in MODEL_TYPES:
        assert model_type in architecture_for(model_type).model_types


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method", list(METHODS))
def test_generate_matches_transformers_on_dequantized_weights(model_type, method):
    base, q = quantized(model_type, method)
    arch = architecture_for(q)
    n_linear = sum(1 for _ in quantized_modules(q))
    n_expected = sum(1 for n, m in q.named_modules() if type(m).__name__ in ("Linear", "Conv1D", "QuantLinear")
                     and not any(n.endswith(k) for k in arch.keep_float))
    assert n_linear == n_expected > 0          # every Linear (each expert's too) is quantized
    reference = reference_model(q)
    assert greedy_lowbit(q, PROMPT, N_NEW) == greedy_reference(reference, PROMPT, N_NEW)
    # and quantization changed the model by a bounded amount (4-bit g32 on N(0, 0.08) weights)
    with torch.no_grad():
        a = base(PROMPT[None]).logits
        b = q(PROMPT[None]).logits
    assert 0 < (a - b).abs().max() < 0.5 * a.abs().max() + 1


@pytest.mark.parametrize("model_type", ["gemma", "gemma3_text", "phi3", "opt", "falcon", "mixtral", "qwen2_moe"])
def test_awq_scaling_keeps_float_model(model_type):
    """AWQ's folds are exact: scaling with the chosen s and *not* rounding leaves the logits unchanged. This
    catches a fold into Gemma's (1 + w) norm done as w / s, or into the wrong half of gate_up_proj."""
    from lowbit.methods.awq import block_scale_groups, can_fold, fold_scales

    model, _ = tiny_model(model_type)
    arch = architecture_for(model)
    arch.prepare(model)
    with torch.no_grad():
        before = model(PROMPT[None]).logits
        folded = 0
        for block in arch.blocks(model):
            for group in block_scale_groups(block, arch):
                if not group.prev:
                    continue
                try:
                    prev = block.get_submodule(group.prev)
                    members = [block.get_submodule(n) for n in group.linears]
                    companions = tuple(block.get_submodule(c) for c in group.companions)
                except AttributeError:
                    continue
                if not can_fold(prev, members, group.fold, len(arch.fused.get(group.prev, ())) or 1):
                    continue
                k = members[0].weight.shape[1]
                s = torch.empty(k).uniform_(0.5, 2.0)
                fold_scales(prev, members, s, group.fold, companions)
                folded += 1
        after = model(PROMPT[None]).logits
    assert folded >= 2
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_native_save_load_round_trip(model_type, tmp_path):
    from lowbit.api import save
    from lowbit.models.loading import load_model

    _, q = quantized(model_type, "rtn")
    out = save(q, tmp_path / "q", tokenizer=None)
    loaded, _ = load_model(out)
    for (n1, a), (n2, b) in zip(quantized_modules(q), quantized_modules(loaded)):
        assert n1 == n2 and torch.equal(a.qweight.codes, b.qweight.codes)
    set_kernel(loaded, "reference")
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPT[None]).logits, q(PROMPT[None]).logits, rtol=0, atol=0)


GGUF_TYPES = [t for t in MODEL_TYPES if architecture_for(t).gguf is not None]


@pytest.mark.parametrize("model_type", GGUF_TYPES)
def test_gguf_export_import_round_trip(model_type, tmp_path):
    """F32 export then import gives back exactly the model (names, q/k and q|k|v row orders, Gemma's 1 + w,
    stacked experts); a Q8_0 export of the RTN-quantized model imports to within Q8_0's rounding."""
    from lowbit.formats.gguf import export_gguf, read_gguf
    from lowbit.models.gguf_import import load_gguf_as_hf

    model, _ = tiny_model(model_type)
    architecture_for(model).prepare(model)
    tok = tiny_tokenizer()
    path = export_gguf(model, tok, tmp_path / "f32.gguf", type="F32", progress=False)
    gf = read_gguf(path)
    assert gf.get("general.architecture") == architecture_for(model).gguf.name
    imported, _ = load_gguf_as_hf(path)
    with torch.no_grad():
        torch.testing.assert_close(imported(PROMPT[None]).logits, model(PROMPT[None]).logits, rtol=1e-5, atol=1e-5)
    path8 = export_gguf(model, tok, tmp_path / "q8.gguf", type="Q8_0", progress=False)
    imported8, _ = load_gguf_as_hf(path8)
    with torch.no_grad():
        a, b = imported8(PROMPT[None]).logits, model(PROMPT[None]).logits
    assert 0 < (a - b).abs().max() < 0.05 * b.abs().max()


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_gguf_export_refuses_expert_weighting_llama_cpp_cannot_express(model_type, tmp_path):
    """llama.cpp fixes whether the top-k expert weights are renormalised (qwen2moe: never, qwen3moe: always);
    a model that says otherwise is refused instead of written as a file that computes something else."""
    from lowbit.formats.gguf import export_gguf

    model, _ = tiny_model(model_type)
    model.config.norm_topk_prob = not architecture_for(model).experts.renormalizes(model.config)
    with pytest.raises(LowbitError, match="norm_topk_prob"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf", type="F32", progress=False)


def test_opt_gguf_export_is_refused_clearly(tmp_path):
    from lowbit.formats.gguf import export_gguf

    model, _ = tiny_model("opt")
    with pytest.raises(UnsupportedArchitecture, match="llama.cpp has no opt"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf", type="F32")
    assert not (tmp_path / "x.gguf").exists()


# -- unsupported means early ---------------------------------------------------------------------------------
def test_unknown_gguf_architecture_refused_from_header(tmp_path):
    """A GGUF whose header says 'foo', with a 200 MB data section: refused in well under a second, naming
    the supported families, without reading the data."""
    from lowbit.formats.gguf import TensorToWrite, write_gguf
    from lowbit.models.loading import load_model

    import struct

    import fuzzing

    path = tmp_path / "foo.gguf"
    write_gguf(path, {"general.architecture": "foo", "foo.block_count": 1},
               [TensorToWrite("token_embd.weight", "F32", (4, 8), torch.zeros(4, 8).numpy())])
    # the tensor grown to 200 MB of rows in the header, the file extended (sparse) to hold them exactly
    rows = 200 * 2 ** 20 // (8 * 4)
    layout = fuzzing.gguf_layout(path.read_bytes())
    with open(path, "r+b") as fh:
        fh.seek(layout.tensors[0]["dims_at"][1])
        fh.write(struct.pack("<Q", rows))
    os.truncate(path, -(-layout.header_end // 32) * 32 + rows * 8 * 4)
    for keep in (False, True):
        start = time.perf_counter()
        with pytest.raises(UnsupportedArchitecture, match="'foo' is not supported.*gemma3.*llama"):
            load_model(path, keep_quantized=keep)
        assert time.perf_counter() - start < 1.0


def _custom_code_folder(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "code_ran"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil_arch", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import PretrainedConfig\n"
                                    "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_arch'\n")
    return folder, marker


def test_unknown_config_refused_early_and_no_custom_code(tmp_path, monkeypatch):
    """An unknown model_type with an auto_map is refused in under a second and its Python file never runs,
    even when standard input would answer "y" to transformers' trust prompt."""
    import io

    from lowbit.models.loading import load_config, load_model

    folder, marker = _custom_code_folder(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    start = time.perf_counter()
    with pytest.raises(UnsupportedArchitecture, match="'evil_arch' is not supported.*gemma3"):
        load_model(folder)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(UnsupportedArchitecture):
        load_config(folder)
    assert not marker.exists()


def test_known_type_with_auto_map_never_runs_custom_code(tmp_path, monkeypatch):
    """A supported model_type whose config also carries an auto_map: transformers' class is used and the
    folder's Python file is not run (trust_remote_code=False)."""
    import io

    from lowbit.models.loading import load_config

    folder, marker = _custom_code_folder(tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data.update(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                intermediate_size=128, vocab_size=96)
    (folder / "config.json").write_text(json.dumps(data))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\ny\ny\n"))
    try:
        config = load_config(folder)
        assert config.model_type == "llama"
    except LowbitError:
        pass  # refusing is fine too; running the file is not
    assert not marker.exists()
