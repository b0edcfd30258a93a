"""The engine-only model (lowbit/models/skeleton.py): a .gguf loaded with engine_only=True runs in an EngineSkeleton
built from lowbit's architecture files, without importing transformers' modeling code, and computes exactly what
the same file loaded into transformers' model class computes in lowbit's engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit.engine.generate import SamplingParams
from lowbit.engine.runner import Engine
from lowbit.errors import LowbitError
from lowbit.models.skeleton import EngineSkeleton

from arch_models import tiny_model, tiny_tokenizer

SKELETON_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
PROMPTS = ([5, 17, 33, 2 + 60, 9, 41, 77, 12], [8, 8, 90, 3])
STEPS = 20


def _gguf(model_type: str, tmp_path: Path, type_name: str = "Q8_0", **overrides) -> Path:
    from lowbit.formats.gguf import export_gguf

    model, _ = tiny_model(model_type, **overrides)
    return export_gguf(model, tiny_tokenizer(), tmp_path / f"{model_type}.gguf", type=type_name, progress=False)


def _both(path: Path):
    from lowbit.models.loading import load_model

    skeleton, _ = load_model(path, keep_quantized=True, engine_only=True)
    full, _ = load_model(path, keep_quantized=True)
    return skeleton, full


def _run(model, native: bool = True) -> tuple[list[list[int]], list[torch.Tensor], str]:
    """Greedy tokens of two prompts decoded together, and the logits of every position of the first prompt
    followed by its generated tokens."""
    engine = Engine(model, max_batch=3, context=64, native=native)
    sequences = [engine.start(p, SamplingParams(max_new_tokens=STEPS, temperature=0.0), stop_on_eos=False)
                 for p in PROMPTS]
    while not all(s.finished for s in sequences):
        engine.step()
    logits = [engine.logits(PROMPTS[0] + sequences[0].generated)]
    return [s.generated for s in sequences], logits, engine.decode_path


@pytest.mark.parametrize("model_type", SKELETON_FAMILIES)
def test_skeleton_has_transformers_parameters(model_type):
    """The skeleton's parameter names and shapes are exactly those of transformers' model for the same config, so
    loaders check a file against it and fill it with the same keys (with the biases the weights hold)."""
    from lowbit.models.arch import architecture_for
    from lowbit.models.loading import empty_model_from_config

    overrides = [{}, {"attention_bias": True}] + ([{"mlp_bias": True}] if model_type == "llama" else [])
    for override in overrides:
        _, config = tiny_model(model_type, **override)
        hf = empty_model_from_config(config)
        biases = {name for name, m in hf.named_modules() if getattr(m, "bias", None) is not None}
        skeleton = EngineSkeleton(architecture_for(hf), config, lambda path: path in biases)
        shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters(remove_duplicate=False)}  # noqa: E731
        assert shapes(skeleton) == shapes(hf), override


@pytest.mark.parametrize("model_type", SKELETON_FAMILIES)
def test_engine_only_gguf_equals_transformers_model_class(model_type, tmp_path):
    """Same file, two model classes: the engine's rotary tables, activation, norms and every logit are bit for bit
    the same, through the compiled step and through the torch decoder, for two prompts decoded together."""
    path = _gguf(model_type, tmp_path)
    skeleton, full = _both(path)
    assert isinstance(skeleton, EngineSkeleton) and not isinstance(full, EngineSkeleton)
    a, b = Engine(skeleton, context=64).decoder, Engine(full, context=64).decoder
    assert a.activation == b.activation and a.attn_scale == b.attn_scale and a.windows == b.windows
    assert len(a.cos) == len(b.cos) and a.layer_rope == b.layer_rope
    for x, y in zip(a.cos + a.sin, b.cos + b.sin):
        assert torch.equal(x, y)
    for native in (True, False):
        tokens_s, logits_s, path_s = _run(skeleton, native)
        tokens_f, logits_f, path_f = _run(full, native)
        assert path_s == path_f == ("compiled step" if native else path_f)
        assert tokens_s == tokens_f
        for x, y in zip(logits_s, logits_f):
            assert torch.equal(x, y)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                   "rope_theta": 500000.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                   "rope_theta": 10000.0}])
def test_rotary_tables_equal_transformers_for_scaled_rope(rope):
    """Scaled rope variants take transformers' own inverse frequencies (ROPE_INIT_FUNCTIONS): the skeleton's
    tables equal transformers' rotary module's at every position."""
    from lowbit.models.arch import architecture_for
    from lowbit.models.arch.base import rotary_path

    model, config = tiny_model("llama", rope_parameters=rope)
    arch = architecture_for(model)
    skeleton = EngineSkeleton(arch, config)
    positions = torch.arange(256)[None]
    ours = skeleton.get_submodule(rotary_path(arch))(torch.zeros(1), positions)
    theirs = model.get_submodule(rotary_path(arch))(torch.zeros(1), positions)
    for x, y in zip(ours, theirs):
        assert torch.equal(x, y)


def test_engine_only_load_imports_no_transformers_model(tmp_path):
    """A process that loads a .gguf engine-only and generates never imports transformers' modeling code nor what
    it drags in (torch._dynamo, sympy, accelerate)."""
    path = _gguf("qwen2", tmp_path)
    script = (
        "import sys, json\n"
        "from lowbit.models.loading import load_model\n"
        "from lowbit.engine.generate import SamplingParams\n"
        "from lowbit.engine.runner import Engine\n"
        f"model, tok = load_model({str(path)!r}, keep_quantized=True, engine_only=True)\n"
        "out = list(Engine(model, tok, context=32).generate([5, 6, 7], SamplingParams(max_new_tokens=4)))\n"
        "heavy = ['transformers.modeling_utils', 'torch._dynamo', 'sympy', 'accelerate']\n"
        "print(json.dumps({'type': type(model).__name__, 'tokens': len(out),\n"
        "                  'imported': [m for m in heavy if m in sys.modules]}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"type": "EngineSkeleton", "tokens": 4, "imported": []}


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox"])
def test_families_without_a_skeleton_load_transformers_model(model_type, tmp_path):
    """Fused projections (Phi-3) and partial rotary with LayerNorms (GPT-NeoX) need transformers' model: engine_only
    then loads it, and the engine runs as before."""
    from lowbit.formats.gguf import export_gguf

    model, _ = tiny_model(model_type)
    path = export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf", type="Q8_0", progress=False)
    skeleton, full = _both(path)
    assert type(skeleton) is type(full) and not isinstance(skeleton, EngineSkeleton)
    assert _run(skeleton)[0] == _run(full)[0]


def test_skeleton_has_no_forward_and_load_model_refuses_unknown_options(tmp_path):
    from lowbit.models.loading import load_model

    path = _gguf("llama", tmp_path)
    skeleton, _ = load_model(path, keep_quantized=True, engine_only=True)
    with pytest.raises(LowbitError, match="engine only"):
        skeleton(torch.tensor([[1, 2]]))
    with pytest.raises(LowbitError, match="unknown option"):
        load_model(path, keep_quantised=True)


def test_engine_only_model_is_not_written_adapted_or_trained(tmp_path):
    """An engine-only model keeps Llama's q/k rows in llama.cpp's order (outputs gathered): writers and adapters,
    which read rows, refuse it by name instead of writing those rows out of order."""
    from lowbit.api import save
    from lowbit.formats.gguf import export_gguf
    from lowbit.models.loading import load_model
    from lowbit.training.lora import apply_adapter

    path = _gguf("llama", tmp_path)
    skeleton, tokenizer = load_model(path, engine_only=True)
    assert isinstance(skeleton, EngineSkeleton)
    assert any(getattr(m, "output_order", None) is not None for m in skeleton.modules())
    for write in (lambda: save(skeleton, tmp_path / "out", tokenizer=tokenizer),
                  lambda: save(skeleton, tmp_path / "out.gguf", format="gguf", tokenizer=tokenizer),
                  lambda: export_gguf(skeleton, tokenizer, tmp_path / "direct.gguf", progress=False),
                  lambda: apply_adapter(skeleton, tmp_path / "no-adapter")):
        with pytest.raises(LowbitError, match="engine-only"):
            write()
    assert not (tmp_path / "out").exists() and not (tmp_path / "direct.gguf").exists()
