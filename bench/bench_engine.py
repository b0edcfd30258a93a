"""Engine and server speed on SmolLM2-135M: lowbit's engine vs transformers fp32 generate vs llama.cpp.

Prints a table and writes bench/results/engine.json. Runs (each pp512 and tg128, median of --reps):
- transformers fp32: the float model, one forward over 512 tokens and `generate` for 128 tokens;
- lowbit engine on: the float model; RTN 4-bit g128 (sym, and asym = the layout GPTQ writes) and RTN 8-bit per
  channel, lm_head quantized too; GGUF files (Q4_0 and Q4_K_M made by llama.cpp's quantizer when it is installed,
  else by lowbit's, and the packaged Q4_1) loaded kept quantized. Decode runs the compiled step with float32
  activations; each quantized model is run again with --activations int8 (llama.cpp's arithmetic, the default
  for GGUF files);
- llama.cpp (llama-cpp-python, when importable) on the same GGUF files and threads;
- achieved weight bytes/s per decoded token next to the measured memory read bandwidth;
- server: 32 concurrent streaming clients on loopback vs one client, p50/p99 latency, requests lost. The clients
  share the server's cores, so their own work is part of what is measured: by default each is a minimal streaming
  HTTP client (http.client, one JSON parse a chunk); `--client openai` uses the openai SDK instead, which spent
  ~1 ms of CPU a chunk here (0.26 of a core at 32 clients on a 2-core machine, taken from the server).

Usage: python bench/bench_engine.py [--threads 2] [--reps 3] [--no-server] [--no-act8] [--only rtn4,Q4_0]
       [--server-model .cache/models/llama-3.2-1b-Q4_K_M.gguf] [--client raw|openai]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.runtime.surgery import dequantized_copy  # noqa: E402
from lowbit.engine.bench import (  # noqa: E402  (after the sys.path line, so a checkout runs without install)
    SpeedResult,
    bench_engine,
    bench_llama_cpp,
    bench_transformers,
    format_speed_table,
    llama_cpp_available,
)
from lowbit.engine.bench import memory_read_bandwidth  # noqa: E402
from lowbit.engine.runner import Engine, set_threads  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every Linear (quantized: its stored bits) except the embedding."""
    from lowbit.models.adapters import is_linear
    from lowbit.runtime.qlinear import QuantLinear

    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.qweight.storage_bits() // 8
        elif is_linear(module):
            total += module.weight.numel() * module.weight.element_size()
    return total


def run_engine(model, label: str, args, context: int, **engine_options) -> dict:
    engine = Engine(model, max_batch=1, context=context, threads=args.threads, **engine_options)
    result = bench_engine(engine, args.pp, args.tg, args.reps, name=label)
    del engine
    row = result.to_dict()
    row["weight_mb"] = round(weight_bytes_per_token(model) / 1e6, 2)
    if result.tg_tok_s:
        row["weight_gb_s"] = round(weight_bytes_per_token(model) * result.tg_tok_s / 1e9, 2)
    return row


@torch.inference_mode()
def transformers_greedy(model, prompt: torch.Tensor, n: int) -> list[int]:
    """n argmax tokens from transformers' own forward and KV cache. Not `generate(min_new_tokens=n)`: that
    masks EOS until n tokens, so where EOS is the argmax it picks the runner-up and no longer is greedy."""
    out = model(prompt, use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def greedy_agreement(model, reference, tokenizer, n: int = 64) -> dict:
    """Greedy tokens of the engine on `model` vs transformers' generate on `reference` (dequantized weights):
    default engine (compiled float32 decode step; prompt in bf16), all-float32 (prompt too), and with int8
    activations. Returns {setting: number of leading tokens that agree (n = identical)}."""
    from lowbit.engine.generate import SamplingParams

    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    theirs = transformers_greedy(reference, prompt, n)
    result = {}
    for setting, options in (("default", {"activations": "float32"}),
                             ("float32_prompt", {"prefill_attention_dtype": torch.float32, "activations": "float32"}),
                             ("int8_activations", {"activations": "int8"})):
        engine = Engine(model, max_batch=1, context=256, **options)
        ours = list(engine.generate(prompt[0].tolist(), SamplingParams(max_new_tokens=n, temperature=0.0),
                                    stop_on_eos=False))
        result[setting] = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), n)
    return result


def llama_cpp_quantize(source: Path, target: Path, gtype: str) -> None:
    """Write `target` with llama.cpp's quantizer (llama_model_quantize, requantizing `source`)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gtype}")
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {gtype}")


def bench_server(model, tokenizer, args) -> dict:
    """32 concurrent streaming clients vs one, on loopback: throughput, latency, requests completed. `model`
    (with its tokenizer) is saved and served; or, None, the file --server-model names is served as it is."""
    import http.client
    import signal
    import socket
    import subprocess
    import urllib.request

    from lowbit.api import save

    if args.client == "openai":
        import openai   # before the server starts, so a missing SDK leaves no server behind

    clients, max_tokens = args.clients, args.server_tokens
    # The server runs as users run it, `lowbit serve` in its own process (generation in its main thread), so
    # the clients' HTTP parsing here does not share its interpreter.
    work = Path(tempfile.mkdtemp(prefix="lowbit-serve-"))
    if model is not None:
        save(model, work / "model", tokenizer=tokenizer)
    served = str(work / "model") if model is not None else args.server_model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-c", "import sys; from lowbit.cli import main; sys.exit(main(sys.argv[1:]))",
               "serve", served, "--port", str(port), "--threads", str(args.threads),
               "--max-batch", str(clients), "--max-queue", str(clients), "--ctx", "256", "--model-name", "smollm2"]
    process = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    class _Served:
        url = f"http://127.0.0.1:{port}"

        @staticmethod
        def close() -> None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)

    server = _Served()
    for _ in range(240):
        try:
            urllib.request.urlopen(server.url + "/v1/models", timeout=2)
            break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"lowbit serve exited with status {process.returncode}")
            time.sleep(0.5)
    prompts = [f"Write a short story about a {w}." for w in
               ("cat", "dog", "robot", "river", "castle", "dragon", "teacher", "garden")]

    def stream_openai(i: int) -> Iterator[str | None]:
        """Each streamed chunk's finish reason, through the openai SDK."""
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        stream = client.completions.create(model="smollm2", prompt=prompts[i % len(prompts)],
                                           max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
                                           extra_body={"ignore_eos": True})
        for chunk in stream:
            yield chunk.choices[0].finish_reason

    def stream_raw(i: int) -> Iterator[str | None]:
        """Each streamed chunk's finish reason, read off the event stream with http.client."""
        body = json.dumps({"model": "smollm2", "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                           "temperature": 0.7, "seed": i, "stream": True, "ignore_eos": True})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
            for line in response:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                yield json.loads(line[6:])["choices"][0]["finish_reason"]
        finally:
            connection.close()

    stream_chunks = stream_raw if args.client == "raw" else stream_openai

    def one_request(i: int, record: list) -> None:
        began = time.perf_counter()
        first, pieces, finish = None, 0, None
        try:
            for reason in stream_chunks(i):
                if first is None:
                    first = time.perf_counter() - began
                pieces += 1
                finish = reason or finish
        except Exception as exc:  # a lost request is a result to report, not a crash
            finish = f"error: {exc}"
        record.append({"latency": time.perf_counter() - began, "ttft": first, "finish": finish})

    def wave(n: int) -> dict:
        record: list = []
        threads = [threading.Thread(target=one_request, args=(i, record)) for i in range(n)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - began
        ok = [r for r in record if r["finish"] in ("length", "stop")]
        latencies = sorted(r["latency"] for r in ok)
        ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
        pct = (lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None)
        return {"clients": n, "completed": len(ok), "lost": n - len(ok), "wall_s": round(wall, 2),
                "tokens_per_s": round(n * max_tokens / wall, 1) if len(ok) == n else None,
                "latency_p50_s": pct(latencies, 0.5), "latency_p99_s": pct(latencies, 0.99),
                "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99)}

    try:
        wave(1)   # warm-up
        single = wave(1)
        many = wave(clients)
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"client": args.client, "single": single, "concurrent": many,
            "speedup": round(many["tokens_per_s"] / single["tokens_per_s"], 2)
            if many["tokens_per_s"] and single["tokens_per_s"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pp", type=int, default=512)
    parser.add_argument("--tg", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--server-tokens", type=int, default=64)
    parser.add_argument("--client", choices=("raw", "openai"), default="raw",
                        help="the server bench's clients: a minimal streaming HTTP client, or the openai SDK")
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-act8", action="store_true", help="skip the --activations int8 runs")
    parser.add_argument("--only", default=None,
                        help="comma list of runs: fp32,rtn4,gptq-layout,rtn8,Q4_0,Q4_K_M,Q4_1")
    parser.add_argument("--lowbit-gguf", action="store_true",
                        help="write the Q4_0/Q4_K_M files with lowbit's exporter even when llama.cpp is present")
    parser.add_argument("--server-model", default=None,
                        help="serve this model (a .gguf file or a saved model; default: SmolLM2 RTN 4-bit g128)")
    parser.add_argument("--output", default=str(RESULTS / "engine.json"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_threads(args.threads)
    only = set(args.only.split(",")) if args.only else None
    wanted = (lambda name: only is None or name in only)

    from lowbit.formats.gguf import export_gguf
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model, resolve_model_path

    load_avg = os.getloadavg()
    report: dict = {"threads": args.threads, "load_average_at_start": load_avg,
                    "memory_read_gb_s": round(memory_read_bandwidth(args.threads), 2), "runs": []}
    print(f"memory read bandwidth: {report['memory_read_gb_s']} GB/s ({args.threads} threads); "
          f"load average {load_avg}", flush=True)
    context = max(args.pp, args.tg) + 8
    base, tokenizer = load_model("smollm2")
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(format_speed_table([SpeedResult(**{k: row[k] for k in SpeedResult.__dataclass_fields__})]),
              f"  weights {row.get('weight_mb')} MB, {row.get('weight_gb_s')} GB/s", flush=True)

    if wanted("fp32") and not args.no_transformers:
        row = bench_transformers(base, args.pp, args.tg, args.reps, name="transformers fp32 generate").to_dict()
        row["weight_mb"] = round(weight_bytes_per_token(base) / 1e6, 2)
        row["weight_gb_s"] = round(row["weight_mb"] * row["tg_tok_s"] / 1e3, 2)
        record(row)
    if wanted("fp32"):
        record(run_engine(base, "lowbit engine fp32", args, context))

    import copy
    # gptq-layout: the layout lowbit's GPTQ writes by default (4-bit, g128, asymmetric, contiguous groups);
    # speed depends on the layout only, so RTN codes stand in for a calibration run.
    for name, config in (("rtn4", QuantizeConfig(method="rtn", bits=4, group_size=128, skip=())),
                         ("gptq-layout", QuantizeConfig(method="rtn", bits=4, group_size=128, symmetric=False,
                                                        skip=())),
                         ("rtn8", QuantizeConfig(method="rtn", bits=8, group_size=-1, skip=()))):
        if not wanted(name):
            continue
        model = copy.deepcopy(base)
        quantize_model(model, config, progress=False)
        row = run_engine(model, f"lowbit {name}", args, context, activations="float32")
        row["greedy_tokens_equal_to_transformers_of_64"] = greedy_agreement(
            model, dequantized_copy(model), tokenizer)
        record(row)
        if not args.no_act8:
            record(run_engine(model, f"lowbit {name} int8-act", args, context, activations="int8"))
        del model

    tmp = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    ggufs = {}
    for gtype in ("Q4_0", "Q4_K_M"):
        if wanted(gtype):
            path = tmp / f"smollm2-{gtype}.gguf"
            if llama_cpp_available() and not args.lowbit_gguf:
                # Files both runners read: llama.cpp's own quantizer, from the packaged Q4_1 file.
                llama_cpp_quantize(resolve_model_path("smollm2"), path, gtype)
            else:
                export_gguf(base, tokenizer, path, type=gtype, progress=False)
            ggufs[gtype] = path
    if wanted("Q4_1"):
        ggufs["Q4_1"] = resolve_model_path("smollm2")
    for gtype, path in ggufs.items():
        model, _ = load_model(path, keep_quantized=True)
        row = run_engine(model, f"lowbit GGUF {gtype}", args, context, activations="float32")
        row["gguf_mb"] = round(path.stat().st_size / 1e6, 2)
        record(row)
        if not args.no_act8:
            record(run_engine(model, f"lowbit GGUF {gtype} int8-act", args, context, activations="int8")
                   | {"gguf_mb": row["gguf_mb"]})
        del model
        if llama_cpp_available():
            record(bench_llama_cpp(str(path), args.threads, args.pp, args.tg, args.reps,
                                   name=f"llama.cpp GGUF {gtype}").to_dict() | {"gguf_mb": row["gguf_mb"]})
    report["llama_cpp"] = llama_cpp_available()
    report["runs"] = rows

    if not args.no_server:
        model = None
        if args.server_model is None:
            model = copy.deepcopy(base)
            quantize_model(model, QuantizeConfig(method="rtn", bits=4, group_size=128, skip=()), progress=False)
        report["server"] = bench_server(model, tokenizer, args) | {"model": args.server_model or "smollm2 rtn4 g128"}
        print(json.dumps(report["server"], indent=1), flush=True)
    report["load_average_at_end"] = os.getloadavg()

    print()
    print(format_speed_table([SpeedResult(**{k: r[k] for k in SpeedResult.__dataclass_fields__}) for r in rows]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
