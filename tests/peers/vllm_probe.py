"""Run inside vLLM's own virtualenv (`make vllm`): does vLLM accept one checkpoint folder, by its own code?

Stages, each recorded with vLLM's own error when it refuses: "config" (EngineArgs.create_engine_config: model
config and the quantization method's validation), "load" (LLM(): the model loader reads the weights and warms the
kernels up), "generate" (greedy text). Prints one JSON object on the last line of stdout.

    .cache/vllm-venv/bin/python tests/peers/vllm_probe.py MODEL_DIR --dtype float16 --prompt "..." --max-tokens 16
"""
import argparse
import json
import os
import sys
import traceback


def last_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[-1][:400] if text else type(exc).__name__


# KV cache reserved by vLLM: SmolLM2's 256-token context needs about 6 MB. vLLM's default on CPU (or the legacy
# VLLM_CPU_KVCACHE_SPACE, in GiB, which overrides this) is refused at start-up when the machine's free memory is
# below it ("Available memory on node 0 ... is less than requested memory for kv"), as on a shared machine.
KV_CACHE_BYTES = 64 << 20


def probe(model: str, dtype: str, prompt: str, max_tokens: int) -> dict:
    result = {"model": model, "dtype": dtype, "stage": "import", "ok": False, "error": None, "text": None}
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.engine.arg_utils import EngineArgs

        result["vllm"] = vllm.__version__
        common = dict(model=model, dtype=dtype, max_model_len=256, enforce_eager=True, trust_remote_code=False,
                      tokenizer=model, kv_cache_memory_bytes=KV_CACHE_BYTES)
        result["stage"] = "config"
        config = EngineArgs(**common).create_engine_config()
        result["quantization"] = config.model_config.quantization
        result["stage"] = "load"
        llm = LLM(**common, seed=0)
        result["stage"] = "generate"
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))
        result["text"] = out[0].outputs[0].text
        result["token_ids"] = list(out[0].outputs[0].token_ids)
        result["ok"] = True
        result["stage"] = "done"
    except BaseException as exc:  # vLLM's own refusal is the finding: record it, never crash the probe
        result["error"] = last_line(exc)
        result["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = probe(args.model, args.dtype, args.prompt, args.max_tokens)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":      # vLLM's engine starts worker processes that re-import this module
    sys.exit(main())
