"""The one block walk (issue 12 item 5): every method, in memory or streamed, goes through
lowbit.methods.pipeline.walk, and the arithmetic did not change when the four drivers became one."""
from __future__ import annotations

import hashlib

import pytest
import torch

from lowbit.methods.base import QuantizeConfig

# SHA-256 of every quantized layer's stored tensors (layer name, then scheme.to_tensors in key order) after
# quantizing stories260K with the configs below on the calibration ids below. Computed once with the four
# drivers of main before the walk was unified (commit 932e7a8: run_calibrated in methods/gptq.py, GGUFGPTQ's
# own quantize_model), torch 2.13 CPU, one thread. Any change of GPTQ's or AWQ's codes changes these.
# AWQ's alpha search compares losses that tie to the last bit, and torch's float32 GEMMs round those bits
# differently by CPU: the first AWQ digest is an Intel AVX-512/AMX machine's, the second an AMD Zen 4's (no AMX),
# both computed by the same commit (44f529b) and packages. A change of AWQ's codes moves the digest off both; a CPU
# of a third kind may need its own entry, computed by a commit whose codes the others confirm.
PINNED = {
    "gptq": {(36, "36c0aa564a5c6ae6574378e2fae991d7d30bb36944017265694f385c66c6d5b9")},
    "awq": {(36, "1ca55b62bf77d19925a5c456de6f24963175011d7ba60ffdd2336b30eccaf582"),
            (36, "e5fce4893c4d529e76a2d1aa9d21ed912ea43748c70fcb4985711115fd782d23")},
}
# GPTQ on the GGUF Q4_0 grid was pinned too, but its digest differs between CPUs of this fleet with the same
# packages, one thread and either kernel (an AVX-512/AMX machine gives another; the grid's trunc(x / d + 8.5)
# sits on ties that the solver's last-bit differences flip), so it is checked by what it must achieve instead:
# tests/test_gguf_format.py::test_gptq_on_the_gguf_grid_beats_round_to_nearest.
CONFIGS = {
    "gptq": dict(method="gptq", bits=4, group_size=32, symmetric=True, skip=()),
    # every alpha of the grid, as the old drivers searched (the default refines coarse to fine since)
    "awq": dict(method="awq", bits=4, group_size=32, symmetric=False, skip=(), options={"alpha_search": "grid"}),
}


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(1))


def codes_digest(model) -> tuple[int, str]:
    from lowbit.runtime.surgery import quantized_modules

    digest = hashlib.sha256()
    layers = sorted(quantized_modules(model))
    for name, module in layers:
        digest.update(name.encode())
        for key, value in sorted(module.qweight.scheme.to_tensors(module.qweight).items()):
            digest.update(key.encode())
            digest.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return len(layers), digest.hexdigest()


@pytest.mark.parametrize("method", sorted(PINNED))
def test_codes_equal_those_of_the_old_drivers(stories_dir, method):
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, _ = load_model(stories_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # as the digests were computed: BLAS reductions split over threads round differently
    try:
        quantize_model(model, QuantizeConfig(**CONFIGS[method]), calibration=calibration_ids(), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert codes_digest(model) in PINNED[method]


def test_reports_are_returned_per_layer_not_left_on_the_method(stories_dir):
    from lowbit.methods.base import get_method
    from lowbit.methods.pipeline import InMemory, walk
    from lowbit.models.loading import load_model

    model, _ = load_model(stories_dir)
    method = get_method(QuantizeConfig(method="gptq", bits=4, group_size=32))
    memory = InMemory(model, "reference")
    reports = walk(method, memory, memory, calibration_ids(), progress=False)
    assert len(reports) == 5 * 7 and all(name.startswith("model.layers.") for name in reports)
    assert all(0 < r.relative_error < 0.5 for r in reports.values())
    assert not hasattr(method, "last_reports")


def test_weight_only_block_quantize_is_pure(stories):
    """A weight-only method's quantize_block returns codes equal to the scheme's and leaves the block alone."""
    import copy

    from lowbit.methods.base import get_method
    from lowbit.methods.pipeline import block_linears

    model = copy.deepcopy(stories[0])
    block = model.model.layers[0]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    method = get_method(QuantizeConfig(method="rtn", bits=4, group_size=32))
    result = method.quantize_block(block, block_linears(block, "model.layers.0", ()), None, None, "model.layers.0")
    assert sorted(result.weights) == sorted(block_linears(block, "model.layers.0", ()))
    assert result.reports == {}
    w = block.self_attn.q_proj.weight.detach()
    assert torch.equal(result.weights["self_attn.q_proj"].codes, method.scheme().quantize(w).codes)
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())


def test_gptq_for_gguf_quantizes_every_layer_on_its_planned_grid(stories):
    """--method gptq --format gguf: the llama.cpp mix is a per-layer scheme plan chosen before quantization,
    and the walk GPTQ-quantizes each Linear on exactly its planned GGUF type (the rest stay float)."""
    import copy

    from lowbit.formats.gguf import plan_gguf_types
    from lowbit.methods.pipeline import quantize_model
    from lowbit.runtime.surgery import iter_linears, quantized_modules

    model = copy.deepcopy(stories[0])
    planned = plan_gguf_types(model, "Q4_K_M", has_imatrix=True)
    quantize_model(model, QuantizeConfig(method="gptq-gguf", options={"gguf_type": "Q4_K_M"}),
                   calibration=calibration_ids(), progress=False)
    quantized = {name: m.qweight.scheme.type for name, m in quantized_modules(model)}
    assert quantized and all(planned[f"{name}.weight"] == t for name, t in quantized.items())
    floats = [name for name, _ in iter_linears(model)]
    assert all(planned.get(f"{name}.weight", "F32") in ("F32", "F16") for name in floats)


@pytest.mark.parametrize("fmt,option", [("gptq", "type"), ("gguf", "typ"), ("lowbit", "pure")])
def test_unknown_writer_option_is_a_one_line_error(stories, tmp_path, fmt, option):
    import copy

    from lowbit.api import save
    from lowbit.errors import LowbitError
    from lowbit.methods.pipeline import quantize_model

    model, tok = stories
    model = copy.deepcopy(model)
    quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=32), progress=False)
    with pytest.raises(LowbitError) as err:
        save(model, tmp_path / "out", format=fmt, tokenizer=tok, **{option: "Q8_0"})
    message = str(err.value)
    assert "\n" not in message and f"format {fmt} has no option '{option}'" in message
    assert not (tmp_path / "out").exists()


def test_gguf_writer_takes_typed_options(stories, tmp_path):
    """GGUFOptions or its fields as keywords write the same file; both at once is an error."""
    from lowbit.errors import LowbitError
    from lowbit.formats.gguf import GGUFOptions, export_gguf

    model, tok = stories
    a = export_gguf(model, tok, tmp_path / "a.gguf", GGUFOptions(type="Q8_0", progress=False))
    b = export_gguf(model, tok, tmp_path / "b.gguf", type="Q8_0", progress=False)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(LowbitError, match="not both"):
        export_gguf(model, tok, tmp_path / "c.gguf", GGUFOptions(), type="Q8_0")


def _save_checkpoint(model, folder, layout: str):
    """An HF folder of `model` with its experts as transformers saves them ('per_expert': legacy per-expert
    names, Mixtral's block_sparse_moe.experts.{e}.w1 included) or as transformers holds them in memory
    ('fused': experts.gate_up_proj [E, 2I, H])."""
    from safetensors.torch import save_file

    if layout == "per_expert":
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
                   or not model.config.tie_word_embeddings}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("model_type,layout,method", [
    ("qwen2_moe", "per_expert", "rtn"), ("mixtral", "per_expert", "rtn"), ("qwen3_moe", "fused", "rtn"),
    ("mixtral", "fused", "gptq"),
])
def test_streaming_moe_equals_in_memory(tmp_path, model_type, layout, method):
    """--stream on MoE checkpoints, per-expert or fused on disk: the same codes as quantizing in memory (GPTQ
    calibrates each expert on the tokens routed to it in both)."""
    import copy
    import json

    from arch_models import tiny_model
    from lowbit.calibration.streaming import stream_quantize
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    model, _ = tiny_model(model_type)
    source = _save_checkpoint(model, tmp_path / "hf", layout)
    config = QuantizeConfig(method=method, bits=4, group_size=32)
    ids = torch.randint(3, 96, (4, 32), generator=torch.Generator().manual_seed(0))
    in_memory = quantize_model(copy.deepcopy(model), config, calibration=ids, progress=False)
    out = stream_quantize(source, tmp_path / "s", config, calibration=ids, progress=False)
    layers = json.loads((out / "lowbit.json").read_text())["layers"]
    assert sum(".experts." in name for name in layers) == 2 * 4 * 3   # 2 layers x 4 experts x 3 projections
    streamed, _ = load_model(out)
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, in_memory(ids).logits)


@pytest.mark.parametrize("mix,weighted", [("Q4_K_M", False), ("Q4_0", True), ("Q8_0", False)])
def test_gguf_export_only_serialises_the_planned_blocks(stories, tmp_path, mix, weighted):
    """`--format gguf`: the mix's per-layer plan is quantized by the walk (method gguf) and the writer copies
    the blocks; the file is byte-identical to the writer rounding the float model itself."""
    import copy

    from lowbit.calibration.imatrix import collect_imatrix
    from lowbit.formats.gguf import export_gguf
    from lowbit.methods.pipeline import quantize_model
    from lowbit.runtime.surgery import quantized_modules

    model, tok = stories
    importance = collect_imatrix(model, calibration_ids()) if weighted else None
    reference = export_gguf(model, tok, tmp_path / "writer.gguf", type=mix, importance=importance, progress=False)
    planned = copy.deepcopy(model)
    options = {"gguf_type": mix, **({"importance": importance} if weighted else {})}
    quantize_model(planned, QuantizeConfig(method="gguf", skip=(), options=options), progress=False)
    assert len(list(quantized_modules(planned))) > 0
    walked = export_gguf(planned, tok, tmp_path / "walk.gguf", type=mix, importance=importance, progress=False)
    assert walked.read_bytes() == reference.read_bytes()
