"""lowbit's GPTQ and AWQ against a peer (GPTQModel) on the same model, calibration tokens and grid.

Per model: lowbit exports its fp32 model as an HF folder (SmolLM2-135M is dequantized from its packaged GGUF),
and the calibration windows bench_gptq_awq.py uses are written to one safetensors file that both tools read.
lowbit quantizes in its own venv; the peer quantizes in its venv (a separate process running this file with
the peer venv's python: peers are never imported by lowbit) and saves its GPTQ / AWQ checkpoint. Both
quantizations run single-threaded (OMP_NUM_THREADS=1, torch.set_num_threads(1)) under `nice`, and only the
quantize call is timed (loading and saving are not). Both results are then scored by the SAME evaluator
(lowbit.eval.perplexity.evaluate_quality) on the same wikitext-2 test tokens: lowbit's in memory, the peer's
after `lowbit.load` of its checkpoint folder (which exercises lowbit's GPTQ / AWQ readers on a peer's files).

Grid: 4-bit, asymmetric (both tools support it), lm_head kept in float. GPTQ: group 128, act-order with static
groups (lowbit's default; GPTQModel desc_act=True, static_groups=True, act_group_aware=False), damp 0.01,
true-sequential, no MSE clip search. AWQ: group 64 (GPTQModel's AWQ needs the group to divide every input
width, and SmolLM2's 576 is not a multiple of 128), zero point, GEMM layout; each tool's own search defaults.

The peer venv is PEER_VENV (default /work/peers/venv; see --peer-venv); without it the script says so and
exits 0. Set it up once, outside the repo, without touching lowbit's torch:
    python3 -m venv /work/peers/venv && echo torch==2.13.0 > /work/peers/constraints.txt
    /work/peers/venv/bin/pip install -c /work/peers/constraints.txt torch==2.13.0 gptqmodel==7.6.0

    python bench/bench_gptq_peers.py                        # SmolLM2, GPTQ and AWQ (about an hour on 2 busy cores)
    python bench/bench_gptq_peers.py --models stories --methods gptq   # seconds
Writes bench/results/gptq_peers.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gptq_peers.json"
PEER_VENV = Path(os.environ.get("LOWBIT_PEER_VENV", "/work/peers/venv"))
CALIB_KEY = "input_ids"


def one_thread() -> None:
    """Both tools run on one thread, so their wall times compare."""
    import torch

    torch.set_num_threads(1)


# -- the peer's side (runs in the peer venv: stdlib, torch, safetensors and the peer only) -----------------
def gptqmodel_config(spec: dict):
    """GPTQModel's config for the grid in `spec` (the same one lowbit uses)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import AWQConfig, GPTQConfig

    if spec["method"] == "awq":
        return AWQConfig(bits=spec["bits"], group_size=spec["group"], sym=spec["sym"])
    config = GPTQConfig(bits=spec["bits"], group_size=spec["group"], sym=spec["sym"], desc_act=spec["desc_act"],
                        static_groups=spec["static_groups"], act_group_aware=False, damp_percent=spec["damp"],
                        true_sequential=True, mse=0.0)
    assert isinstance(config, QuantizeConfig)
    return config


def run_peer(spec: dict) -> dict:
    """Quantize spec["source"] with GPTQModel on the calibration file (timed) and save to spec["out"]."""
    one_thread()
    import torch
    from safetensors.torch import load_file

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel

    calib = load_file(spec["calib"])[CALIB_KEY]
    rows = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
    t0 = time.perf_counter()
    # GPTQ runs from the fp32 weights, as lowbit does; GPTQModel's CPU AWQ kernel (which its AWQ quantization
    # packs into) accepts only fp16/bf16 models, so AWQ runs in fp16 (the dtype its checkpoint stores).
    dtype = torch.float16 if spec["method"] == "awq" else torch.float32
    model = GPTQModel.load(spec["source"], gptqmodel_config(spec), device="cpu", dtype=dtype)
    load_s = time.perf_counter() - t0
    # GPTQModel picks its CUDA AWQ GEMM kernel for AWQ by default; its torch AWQ kernel runs on CPU.
    backend = BACKEND.AWQ_TORCH if spec["method"] == "awq" else BACKEND.AUTO
    with Timer() as timer:
        model.quantize(rows, batch_size=1, calibration_sort=None, backend=backend)
    t0 = time.perf_counter()
    model.save(spec["out"])
    return {"tool": f"gptqmodel {gptqmodel.__version__}", "dtype": str(dtype), **timer.figures(), "load_s": round(load_s, 1),
            "save_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak_rss_mb()}


class Timer:
    """Wall and CPU (user + system, all threads) seconds of a block: a tool that runs worker threads shows
    more CPU than wall time."""

    def __enter__(self) -> "Timer":
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu

    def figures(self) -> dict:
        return {"quantize_s": round(self.wall, 1), "quantize_cpu_s": round(self.cpu, 1)}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_peer_reference(spec: dict) -> dict:
    """The peer's own reading of its checkpoint spec["checkpoint"]: each quantized layer's dequantized weight
    (sum and sum of squares in float64, and its [out, in] corner) and the logits on spec["tokens"], written
    to spec["out"] (safetensors) for lowbit's tests to compare against."""
    one_thread()
    import torch
    from safetensors.torch import save_file

    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    # Its torch kernel runs fp16/bf16 only; fp16 keeps the checkpoint's fp16 scales exact.
    model = GPTQModel.load(spec["checkpoint"], device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    tensors = {}
    with torch.no_grad():
        ids = torch.tensor([spec["tokens"]])
        tensors["logits"] = model.model(ids).logits[0].float().contiguous()
        for name, module in model.model.named_modules():
            if isinstance(module, BaseQuantLinear):
                # Its own unpacking and formula, evaluated in fp32 so the reference carries no fp16 rounding.
                module.scales = module.scales.float()
                weight = module.dequantize_weight().double().t()     # GPTQModel's [in, out] -> [out, in]
                tensors[f"{name}.weight_sum"] = weight.sum().reshape(1)
                tensors[f"{name}.weight_sq_sum"] = (weight * weight).sum().reshape(1)
                tensors[f"{name}.weight_corner"] = weight[:8, :8].contiguous()
    tensors["tokens"] = ids[0]
    save_file(tensors, spec["out"], metadata={"peer": f"gptqmodel {gptqmodel.__version__}", "torch": torch.__version__})
    return {"layers": sum(k.endswith(".weight_sum") for k in tensors), "out": spec["out"]}


def peak_rss_mb() -> int:
    """This process's peak RSS in MB (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


# -- lowbit's side -----------------------------------------------------------------------------------------
def run_lowbit(spec: dict) -> dict:
    """Quantize the fp32 folder with lowbit on the calibration file (timed), then evaluate it."""
    one_thread()
    import torch
    from safetensors.torch import load_file

    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    torch.manual_seed(0)
    model, _ = load_model(spec["source"])
    result = {"tool": "lowbit"}
    if spec["method"] != "fp32":
        options = {"desc_act": spec["desc_act"], "static_groups": spec["static_groups"], "damp": spec["damp"],
                   "true_sequential": True} if spec["method"] == "gptq" else {}
        config = QuantizeConfig(method=spec["method"], bits=spec["bits"], group_size=spec["group"],
                                symmetric=spec["sym"], skip=("lm_head",), options=options)
        calib = load_file(spec["calib"])[CALIB_KEY]
        with Timer() as timer:
            quantize_model(model, config, calibration=calib, progress=False)
        result.update(timer.figures())
    result["peak_rss_mb"] = peak_rss_mb()
    return {**result, **evaluate(model, spec)}


def run_eval(spec: dict) -> dict:
    """Load a checkpoint folder through lowbit's readers and evaluate it."""
    one_thread()
    import lowbit

    from lowbit.runtime.surgery import quantized_modules

    model = lowbit.load(spec["checkpoint"])
    layers = dict(quantized_modules(model))
    return {"loaded_by_lowbit": True, "quantized_layers": len(layers), **evaluate(model, spec)}


def evaluate(model, spec: dict) -> dict:
    """Perplexity on the evaluation token file (wikitext-2 test, tokenized once by the source model's
    tokenizer: a checkpoint's own tokenizer may split the text differently), ctx spec["ctx"]."""
    from safetensors.torch import load_file

    from lowbit.eval.perplexity import evaluate_quality

    report = evaluate_quality(model, load_file(spec["eval"])[CALIB_KEY], ctx=spec["ctx"], progress=False)
    return {"ppl_wikitext2": round(report.perplexity, 4), "eval_tokens": report.tokens}


CHILDREN = {"peer": run_peer, "peer-reference": run_peer_reference, "lowbit": run_lowbit, "eval": run_eval}
sys.path.insert(0, str(ROOT / "bench"))   # bench_gptq_awq's calibration and model export, shared


# -- driver (lowbit's venv) --------------------------------------------------------------------------------
def peer_python(venv: Path) -> tuple[Path | None, str]:
    """The peer venv's python and GPTQModel's version, or (None, why not)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None, f"no peer venv at {venv} (create it as this script's docstring says, or pass --peer-venv)"
    proc = subprocess.run([str(python), "-c", "import gptqmodel; print(gptqmodel.__version__)"],
                          capture_output=True, text=True, env=child_env(peer=True))
    if proc.returncode != 0:
        return None, f"{python} cannot import gptqmodel: {proc.stderr.strip().splitlines()[-1:]}"
    return python, proc.stdout.strip().splitlines()[-1]


def child_env(peer: bool) -> dict[str, str]:
    """One thread for every math library; lowbit on the path only for lowbit's own children."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if peer:
        # GPTQModel 7.6 gives its CPU pool (cores + 1) // 2 workers but asks 2 for its model loader, and refuses
        # to start when the first is smaller (1 on this 2-core machine): 2 is the least that runs.
        env["GPTQMODEL_CPU_WORKERS"] = "2"
    if not peer:
        env["PYTHONPATH"] = str(ROOT)
    return env


def in_child(python: Path | str, kind: str, spec: dict, log: Path) -> dict:
    """Run CHILDREN[kind](spec) in a fresh process of `python`; its stderr goes to `log`.

    Results are kept in `log`'s folder (children.jsonl), keyed by kind and spec: a rerun with the same
    --workdir redoes only what failed or changed."""
    cache = log.parent / "children.jsonl"
    key = json.dumps([kind, spec], sort_keys=True)
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    for entry in done:
        if entry["key"] == key:
            return entry["result"]
    result = {"loadavg_start": round(os.getloadavg()[0], 2), **run_child(python, kind, spec, log)}
    with open(cache, "a") as f:
        f.write(json.dumps({"key": key, "result": result}) + "\n")
    return result


def run_child(python: Path | str, kind: str, spec: dict, log: Path) -> dict:
    """CHILDREN[kind](spec) in a fresh process of `python` (no cache)."""
    with open(log, "a") as err:
        err.write(f"\n=== {kind} {json.dumps(spec)}\n")
        err.flush()
        proc = subprocess.run([str(python), __file__, "--child", kind, json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=err, text=True, env=child_env(peer=kind == "peer"))
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed (exit {proc.returncode}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare(model_key: str, work: Path, samples: int, seq_len: int, eval_tokens: int) -> tuple[Path, Path, Path]:
    """(fp32 HF folder, calibration token file, evaluation token file) for the model, all written by lowbit."""
    import torch
    from safetensors.torch import save_file

    from bench_gptq_awq import MODELS, WIKI, calibration_tokens, smollm2_folder
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.models.loading import load_tokenizer

    folder = smollm2_folder(work / "smollm2-fp32") if model_key == "smollm2" else Path(MODELS[model_key])
    tokenizer = load_tokenizer(folder)
    calib = work / f"calib-{model_key}-{samples}x{seq_len}.safetensors"
    if not calib.exists():
        tokens = calibration_tokens(tokenizer, samples, seq_len)
        save_file({CALIB_KEY: tokens.to(torch.int64).contiguous()}, str(calib))
    evals = work / f"eval-{model_key}-wikitext2-{eval_tokens}.safetensors"
    if not evals.exists():
        tokens = tokenize_text(tokenizer, read_text(WIKI), eval_tokens)
        save_file({CALIB_KEY: tokens.to(torch.int64).contiguous()}, str(evals))
    return folder, calib, evals


def make_fixture(python: Path, args: argparse.Namespace) -> None:
    """The peer's 4-bit asymmetric act-order GPTQ checkpoint of stories260K (a few hundred KB) plus its own
    dequantized-weight and logit figures, for tests/test_peer_checkpoints.py."""
    from safetensors.torch import load_file

    from bench_gptq_awq import TINY
    from lowbit.eval.perplexity import read_text, tokenize_text
    from lowbit.models.loading import load_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-fixture-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, calib, _ = prepare("stories", work, args.calib_samples, args.calib_len, args.wiki_tokens)
    out = args.make_fixture.resolve()
    checkpoint = out / "checkpoint"   # apart from the reference: a checkpoint folder's *.safetensors are all weights
    spec = {"method": "gptq", "source": str(folder), "calib": str(calib), "bits": args.bits, "group": args.group,
            "sym": args.sym, "desc_act": True, "static_groups": True, "damp": args.damp, "out": str(checkpoint)}
    print(json.dumps(in_child(python, "peer", spec, work / "children.log")))
    (checkpoint / "quant_log.csv").unlink(missing_ok=True)   # the peer's per-layer log: not part of the checkpoint
    tokens = tokenize_text(load_tokenizer(folder), read_text(TINY), 32).tolist()
    reference = {"checkpoint": str(checkpoint), "tokens": tokens, "out": str(out / "peer_reference.safetensors")}
    print(json.dumps(in_child(python, "peer-reference", reference, work / "children.log")))
    os.chmod(reference["out"], 0o644)
    print(f"wrote {out}: {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) // 1024} KB;",
          f"{len(load_file(reference['out'])) } reference tensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2", help="comma list of smollm2, stories")
    parser.add_argument("--methods", default="gptq,awq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--awq-group", type=int, default=64,
                        help="AWQ's group size: GPTQModel's AWQ needs it to divide every input width (SmolLM2's 576 "
                             "is not a multiple of 128)")
    parser.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    parser.add_argument("--no-desc-act", action="store_true", help="GPTQ without act-order (and static groups)")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--wiki-tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--peer-venv", type=Path, default=PEER_VENV)
    parser.add_argument("--workdir", default=None, help="exported models and checkpoints (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--make-fixture", type=Path, default=None, metavar="DIR",
                        help="instead: write the peer's GPTQ checkpoint of stories260K and its own reference numbers "
                             "to DIR (tests/data/gptqmodel-stories260k-gptq4)")
    args = parser.parse_args()

    python, version = peer_python(args.peer_venv)
    if python is None:
        print(f"skipping the peer comparison: {version}")
        return
    if args.make_fixture:
        make_fixture(python, args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lowbit-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "children.log"
    rows = []
    for model_key in args.models.split(","):
        folder, calib, evals = prepare(model_key, work, args.calib_samples, args.calib_len, args.wiki_tokens)
        base = {"model": model_key, "source": str(folder), "calib": str(calib), "eval": str(evals), "bits": args.bits,
                "group": args.group, "sym": args.sym, "desc_act": not args.no_desc_act,
                "static_groups": not args.no_desc_act, "damp": args.damp, "ctx": args.ctx}
        specs = [{**base, "method": "fp32"}] + [{**base, "method": m, **({"group": args.awq_group} if m == "awq" else {})}
                                                 for m in args.methods.split(",")]
        for spec in specs:
            row = {**spec, **in_child(sys.executable, "lowbit", spec, log)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if spec["method"] == "fp32":
                continue
            out = work / f"{model_key}-{spec['method']}-gptqmodel"
            row = {**spec, **in_child(python, "peer", {**spec, "out": str(out)}, log), "checkpoint": str(out)}
            evaluated = in_child(sys.executable, "eval", {**spec, "checkpoint": str(out)}, log)
            row.update({k: v for k, v in evaluated.items() if k != "loadavg_start"})
            rows.append(row)
            print(json.dumps(row), flush=True)

    from lowbit.eval.report import format_table, write_json

    print()
    print(format_table(rows, [("model", "model", "s"), ("method", "method", "s"), ("tool", "tool", "s"),
                              ("quantize_s", "quantize s", ""), ("ppl_wikitext2", "wiki2 ppl", ".3f"),
                              ("peak_rss_mb", "peak RSS MB", "")]))
    out_file = Path(args.out)
    write_json(out_file, {"command": " ".join(sys.argv), "rows": rows,
                          "args": {k: str(v) for k, v in vars(args).items()}, "peer": version, "threads": 1})
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
    else:
        main()
