"""What a running model keeps resident (issue 11): a loaded GGUF model holds its quantized tensors once, in the
file's pages; what it keeps beyond them is named here; memory a prompt's GEMMs freed goes back to the OS."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.quantized import QuantizedWeight
from lowbit.runtime.memory import _malloc_trim


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds: parameters, buffers, and the tensors of its quantized weights (codes, scales,
    GGUF blocks) and of other attributes of its modules (kernel states)."""
    found: dict[str, torch.Tensor] = {}

    def visit(name: str, value, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            found.setdefault(name, value)
        elif depth < 4 and isinstance(value, QuantizedWeight):
            for key, item in vars(value).items():
                visit(f"{name}.{key}", item, depth + 1)
        elif depth < 4 and isinstance(value, dict):
            for key, item in value.items():
                visit(f"{name}.{key}", item, depth + 1)
        elif depth < 4 and isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(f"{name}.{index}", item, depth + 1)

    for module_name, module in model.named_modules():
        for key, value in vars(module).items():
            if key in ("_modules", "_parameters", "_buffers"):
                continue
            visit(f"{module_name}.{key}", value)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        found.setdefault(name, tensor)
    return found


def _mapped_range(source) -> tuple[int, int]:
    view = np.frombuffer(source._map, dtype=np.uint8)
    return view.ctypes.data, view.ctypes.data + view.nbytes


@pytest.fixture(scope="module")
def smollm2_kept():
    from lowbit.errors import LowbitError
    from lowbit.models.loading import load_model, resolve_model_path

    try:
        path = resolve_model_path("smollm2")
    except LowbitError as exc:
        pytest.skip(str(exc))
    return load_model(path, keep_quantized=True)


def test_gguf_model_holds_its_quantized_tensors_in_the_file_pages_only(smollm2_kept):
    """No float copy of a quantized tensor: every byte the model holds outside the file's mapping is a norm weight,
    a rotary table, or the q/k projections' blocks (copied once into Hugging Face's row order)."""
    model, _ = smollm2_kept
    low, high = _mapped_range(model.lowbit_source_file)
    outside: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in _named_tensors(model).items():
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        if not low <= storage.data_ptr() < high:
            outside[name] = storage.nbytes()
    reordered = {name for name in outside if ".q_proj.qweight." in name or ".k_proj.qweight." in name}
    small = {name for name in outside if name.endswith(("norm.weight", "inv_freq", "original_inv_freq"))}
    assert set(outside) == reordered | small, sorted(set(outside) - reordered - small)[:5]
    config = model.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    head_dim = hidden // config.num_attention_heads
    q4_1_row_bytes = hidden // 32 * 20          # Q4_1: 32 weights in 20 bytes
    q_and_k_rows = hidden + config.num_key_value_heads * head_dim
    assert sum(outside[n] for n in reordered) == layers * q_and_k_rows * q4_1_row_bytes
    # two RMSNorm weights a layer and the final one; the rotary inverse frequencies (and their original copy)
    assert sum(outside[n] for n in small) == (2 * layers + 1) * hidden * 4 + 2 * (head_dim // 2) * 4


def test_loaded_gguf_model_keeps_no_tokenizer_arrays(smollm2_kept):
    """The tokenizer holds the vocabulary once built; the file object the model keeps (for its mapping) does not
    hold the 49k-token lists again."""
    model, tokenizer = smollm2_kept
    source = model.lowbit_source_file
    assert not [key for key in source.metadata if key.startswith("tokenizer.") and isinstance(source.get(key), list)]
    assert source.get("general.architecture") == "llama" and set(source.metadata) == set(source.value_types)
    from lowbit.formats.gguf import read_gguf

    full = read_gguf(source.path)
    assert len(full.get("tokenizer.ggml.tokens")) == len(tokenizer) == 49152
    assert {k: v for k, v in full.metadata.items() if not k.startswith("tokenizer.") or not isinstance(v, list)} \
        == source.metadata


def _resident_anonymous_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("RssAnon:")[1].split()[0])


def test_a_prompt_returns_the_heap_its_gemms_freed(smollm2_kept):
    """After a 400-token prompt the process holds no more anonymous memory than before it but for what the
    engine keeps (its cache was allocated up front): the GEMMs' activations and weight slices are freed and
    handed back to the OS, not kept in glibc's heap for the next request."""
    if _malloc_trim() is None:
        pytest.skip("not glibc: its heap is what this test is about")
    from lowbit.engine.bench import bench_tokens
    from lowbit.engine.generate import SamplingParams
    from lowbit.engine.runner import Engine
    from lowbit.runtime.memory import release_freed_heap

    model, tokenizer = smollm2_kept
    engine = Engine(model, tokenizer, context=512)
    prompt = bench_tokens(model.config.vocab_size, 400)
    greedy = SamplingParams(max_new_tokens=1, temperature=0.0)
    engine.release(engine.start(prompt[:8], greedy))     # first-call state (thread pools, workspaces) set up
    release_freed_heap()
    before_kb = _resident_anonymous_kb()
    engine.release(engine.start(prompt, greedy))
    after_kb = _resident_anonymous_kb()
    print(f"anonymous memory resident: {before_kb / 1024:.1f} MB before the prompt, {after_kb / 1024:.1f} MB after")
    # the prompt's buffers were tens of MB (its 400 x 1536 float32 MLP activations alone are 2.4 MB a matmul)
    assert after_kb - before_kb < 8 * 1024


def test_load_model_leaves_no_freed_heap_resident(smollm2_kept):
    """Building the tokenizer and the skeleton frees tens of MB inside glibc's heap (69 MB for SmolLM2's GGUF);
    load_model hands it back, so trimming again right after it releases next to nothing."""
    if _malloc_trim() is None:
        pytest.skip("not glibc: its heap is what this test is about")
    from lowbit.models.loading import load_model
    from lowbit.runtime.memory import release_freed_heap

    loaded = load_model(smollm2_kept[0].lowbit_source_file.path, keep_quantized=True)
    before_kb = _resident_anonymous_kb()
    release_freed_heap()
    released_kb = before_kb - _resident_anonymous_kb()
    assert released_kb < 4 * 1024, f"{released_kb / 1024:.1f} MB freed by the loader was still resident"
    assert len(loaded[1]) == 49152


def _file_mapped_ranges(file: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `file` (/proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip() == str(file.resolve()):
            low, high = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((low, high))
    return ranges


def _tied_bf16_rtn4_model():
    """A tiny RTN-4 Llama (groups of 32) whose tied embedding holds bfloat16 values, as a real checkpoint's."""
    from conftest import tiny_llama
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model

    model = tiny_llama(vocab=300)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.bfloat16().float()
    quantize_model(model, QuantizeConfig(bits=4, group_size=32), progress=False)
    model.lowbit_source_dtype = torch.bfloat16
    return model


@pytest.mark.parametrize("fmt", ["lowbit", "gptq"])
def test_a_loaded_4bit_folder_holds_each_weight_once_in_the_kernels_layout(tmp_path, monkeypatch, fmt):
    """lowbit's own layouts (issue 11): after load_model, every 4-bit layer holds its codes once, two per byte in
    the kernels' layout (no one-byte codes, in the model or in the kernels' description cache), its statistics
    once in the narrowest exact dtype (the scales are the kernels' float16 ones), the tied embedding and
    head are one tensor in the file's mapping, and loading dequantized no layer (a full float32 copy per layer,
    9 s of a 1B model's load)."""
    from lowbit.formats.registry import get_writer
    from lowbit.models.loading import load_model
    from lowbit.quantized import packed_codes
    from lowbit.runtime import clib
    from lowbit.runtime.surgery import quantized_modules

    if clib.native_library() is None:
        pytest.skip("no C compiler: the kernels' layout is not used")
    model = _tied_bf16_rtn4_model()
    saved = {name: module.qweight.dequantize() for name, module in quantized_modules(model)}
    get_writer(fmt).save(model, None, tmp_path / fmt)

    def refuse(*_):
        raise AssertionError("loading dequantized a layer")

    with monkeypatch.context() as patched:
        patched.setattr(QuantizedWeight, "dequantize", refuse)
        loaded, _ = load_model(tmp_path / fmt, keep_quantized=True)
    layers = dict(quantized_modules(loaded))
    assert set(layers) == set(saved)
    for name, module in layers.items():
        qw = module.qweight
        n, k = qw.shape
        packed = packed_codes(qw)
        assert qw.__dict__["_codes"] is None and packed.dtype == torch.uint8 and packed.numel() * 2 == n * k, name
        assert qw.__dict__["_scales"] is None and qw.__dict__["_compact_scales"].dtype == torch.float16, name
        assert qw.__dict__["_zeros"] is None and qw.__dict__["_compact_zeros"].dtype == torch.uint8, name
        assert torch.equal(qw.dequantize(), saved[name]), name
        _, state, made_on_load = clib._DESCRIBED[id(qw)]
        spec, kept = clib.affine_spec(qw)             # the kernels use the description made on load, not a new one
        assert clib._DESCRIBED[id(qw)][2] is made_on_load, f"{name}: described again (the cache held old codes)"
        assert spec.w == packed.data_ptr() and spec.a == qw.__dict__["_compact_scales"].data_ptr()
        held = [t for t in [*state, *kept, *_named_tensors(module).values()] if isinstance(t, torch.Tensor)]
        assert not [t for t in held if t.dtype == torch.uint8 and t.numel() == n * k], f"{name}: one-byte codes"
        assert not [t for t in held if t.dtype == torch.float32 and t.numel() == n * k // 32], \
            f"{name}: float32 statistics"
    embedding, head = loaded.model.embed_tokens.weight, loaded.lm_head.weight
    assert embedding.dtype == torch.bfloat16 and head.data_ptr() == embedding.data_ptr()
    mapped = _file_mapped_ranges(tmp_path / fmt / "model.safetensors")
    assert any(low <= embedding.data_ptr() < high for low, high in mapped), "the embedding is a copy, not the file"


def test_a_checkpoints_quantized_layers_are_read_one_layer_at_a_time(tmp_path):
    """read_checkpoint maps the float tensors and reads none of the converted layers' tensors: LayerReader reads
    each layer's when its loader takes it, into memory of its own (not the file's pages), so a load holds one
    layer's file bytes at a time."""
    from lowbit.formats.hf_quantized import layer_tensors, read_checkpoint
    from lowbit.formats.native import read_manifest, save_native

    save_native(_tied_bf16_rtn4_model(), None, tmp_path / "q")
    layer_names = list(read_manifest(tmp_path / "q")["layers"])
    tensors, layers = read_checkpoint(tmp_path / "q", layer_tensors(layer_names))
    assert not [key for key in tensors if key.startswith(tuple(f"{n}." for n in layer_names))]
    assert {key.rsplit(".", 1)[0] for key in layers.keys()} == set(layer_names)
    mapped = _file_mapped_ranges(tmp_path / "q" / "model.safetensors")
    assert all(any(low <= t.data_ptr() < high for low, high in mapped) for t in tensors.values() if t.numel())
    first = f"{layer_names[0]}."
    parts = layers.take(first)
    assert set(parts) == {"codes", "scales", "zeros"}
    assert not any(low <= t.data_ptr() < high for t in parts.values() for low, high in mapped)
    assert not [key for key in layers.keys() if key.startswith(first)] and len(layers.keys()) == 3 * (len(layer_names) - 1)
