"""Structure-aware fuzzing of the formats lowbit reads (used by tests/test_fuzz_readers.py).

Each mutant is a copy of a valid model (GGUF file or checkpoint folder) with one defect: a truncation, a flipped
header byte, a huge count or length, a changed tensor shape, offset, type or dtype, a dropped or extra tensor, or an
edited config.json / lowbit.json / quantization config. A worker process loads each mutant as `lowbit generate`
does (load_model with keep_quantized, then the engine with its compiled step) and reports one outcome:

  identical   loaded, and the logits (model forward and engine) are bit-identical to the original's
  error       a LowbitError with a one-line message, and `lowbit generate` on the same file (lowbit.cli.main, run
              in the worker) exits 2 with exactly that one "lowbit: error:" line and no traceback
  different   loaded, with different logits: a silent corruption
  exception   any other exception (a traceback for the user)
  multiline   a LowbitError whose message spans lines
  cli         a LowbitError, but `lowbit generate` on the file did not exit 2 with one "lowbit: error:" line
  crash       the worker died (segfault, abort, double free)
  hang        no answer within the time limit

Only the first two are acceptable. Mutants run in one long-lived worker subprocess, so a crash cannot take the test
run down with it; the worker imports torch and lowbit once (seconds on a busy machine, against 5-20 ms per rejected
mutant and 50-90 ms per loaded one on an idle one) and is restarted only after a crash or a hang.
"""
from __future__ import annotations

import copy
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

PROMPT = [1, 400, 20, 13, 99, 7, 250, 31]
ACCEPTED = ("identical", "error")
OUTCOMES = ("identical", "error", "different", "exception", "multiline", "cli", "crash", "hang")
MUTANT_TIMEOUT_S = 10.0


@dataclass
class Mutant:
    format: str       # which original it came from (gguf-q8_0, native-rtn4, gptq, bnb-nf4, ...)
    kind: str         # the mutation class (truncate, header-flip, count, length, shape, offset, type, ...)
    detail: str       # what exactly was changed
    path: Path        # the mutated copy


# -- GGUF header layout (positions of the fields a mutation edits) ---------------------------------------------
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class GGUFLayout:
    n_tensors_at: int
    n_kv_at: int
    lengths: list[tuple[str, int]]             # (what, position of a uint64 length or count)
    values: list[tuple[str, int, int]]         # (key, position, value type) of scalar metadata values
    tensors: list[dict[str, Any]]              # name, n_dims_at, dims_at [positions], type_at, offset_at, dims
    header_end: int


def gguf_layout(data: bytes) -> GGUFLayout:
    """Positions of every count, length, scalar value and tensor-info field of a valid GGUF file's header."""
    pos = 8
    n_tensors_at, n_kv_at = pos, pos + 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    pos += 16
    lengths: list[tuple[str, int]] = []
    values: list[tuple[str, int, int]] = []

    def string(what: str) -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        lengths.append((what, pos))
        text = data[pos + 8:pos + 8 + n].decode()
        pos += 8 + n
        return text

    for _ in range(n_kv):
        key = string("key")
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == 8:
            string(f"{key} value")
        elif vtype == 9:
            (sub,) = struct.unpack_from("<I", data, pos)
            (count,) = struct.unpack_from("<Q", data, pos + 4)
            lengths.append((f"{key} count", pos + 4))
            pos += 12
            for i in range(count):
                if sub == 8:
                    if i < 3:
                        string(f"{key}[{i}]")
                    else:
                        (n,) = struct.unpack_from("<Q", data, pos)
                        pos += 8 + n
                else:
                    pos += _GGUF_SCALARS[sub]
        else:
            values.append((key, pos, vtype))
            pos += _GGUF_SCALARS[vtype]
    tensors = []
    for _ in range(n_tensors):
        name = string("tensor name")
        (n_dims,) = struct.unpack_from("<I", data, pos)
        dims_at = [pos + 4 + 8 * i for i in range(n_dims)]
        dims = [struct.unpack_from("<Q", data, p)[0] for p in dims_at]
        type_at = pos + 4 + 8 * n_dims
        tensors.append({"name": name, "n_dims_at": pos, "dims_at": dims_at, "dims": dims, "type_at": type_at,
                        "offset_at": type_at + 4, "offset": struct.unpack_from("<Q", data, type_at + 4)[0]})
        pos = type_at + 12
    return GGUFLayout(n_tensors_at, n_kv_at, lengths, values, tensors, pos)


# GGUF metadata whose edits change the numbers legitimately (see SEMANTIC_KEYS)
SEMANTIC_GGUF_KEYS = ("freq_base", "epsilon", "rope.scaling", "logit_softcapping")
_HUGE = (2 ** 64 - 1, 2 ** 63, 2 ** 32 - 1, 2 ** 32, 2 ** 31)


def _put(data: bytearray, pos: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, pos, value & ((1 << (8 * struct.calcsize(fmt))) - 1))


def gguf_byte_mutants(rng: random.Random, data: bytes, count: int) -> list[tuple[str, str, bytes]]:
    """(kind, detail, bytes) mutants of a GGUF file edited in place: truncations, header byte flips, counts,
    string/array lengths, tensor dims, types and offsets."""
    layout = gguf_layout(data)
    out: list[tuple[str, str, bytes]] = []
    makers: list[Callable[[], tuple[str, str, bytes]]] = []

    def truncate():
        cut = rng.choice([rng.randrange(0, 24), rng.randrange(24, layout.header_end),
                          rng.randrange(layout.header_end, len(data))])
        return "truncate", f"{cut} of {len(data)} bytes", data[:cut]

    def flip():
        b = bytearray(data)
        at = rng.randrange(0, layout.header_end)
        b[at] ^= 1 << rng.randrange(8)
        return "header-flip", f"bit at byte {at}", bytes(b)

    def counts():
        b = bytearray(data)
        which, at = rng.choice([("n_tensors", layout.n_tensors_at), ("n_kv", layout.n_kv_at)])
        old = struct.unpack_from("<Q", data, at)[0]
        value = rng.choice([*_HUGE, old + 1, max(old - 1, 0), 0])
        _put(b, at, "<Q", value)
        return "count", f"{which} {old} -> {value}", bytes(b)

    def lengths():
        b = bytearray(data)
        what, at = rng.choice(layout.lengths)
        old = struct.unpack_from("<Q", data, at)[0]
        value = rng.choice([*_HUGE, old + 1, max(old - 1, 0), old * 1000, len(data)])
        _put(b, at, "<Q", value)
        return "length", f"{what} {old} -> {value}", bytes(b)

    def dims():
        b = bytearray(data)
        t = rng.choice(layout.tensors)
        i = rng.randrange(len(t["dims_at"]))
        old = t["dims"][i]
        value = rng.choice([*_HUGE, old * 2, old // 2, old + 32, 0, 1, 65536, 262144])
        _put(b, t["dims_at"][i], "<Q", value)
        return "shape", f"{t['name']} ne[{i}] {old} -> {value}", bytes(b)

    def n_dims():
        b = bytearray(data)
        t = rng.choice(layout.tensors)
        value = rng.choice([0, 5, 2 ** 32 - 1, len(t["dims_at"]) + 1])
        _put(b, t["n_dims_at"], "<I", value)
        return "shape", f"{t['name']} n_dims -> {value}", bytes(b)

    def types():
        b = bytearray(data)
        t = rng.choice(layout.tensors)
        old = struct.unpack_from("<I", data, t["type_at"])[0]
        # F16 <-> BF16 keeps every byte count and every bit pattern is a value of either type: no reader can tell
        # such a swap from the original, so it is left out (README, Hardening)
        same_size_floats = {1: 30, 30: 1}
        value = rng.choice([v for v in (0, 1, 2, 3, 6, 8, 10, 12, 14, 19, 30, 39, 2 ** 32 - 1)
                            if v != same_size_floats.get(old)])
        _put(b, t["type_at"], "<I", value)
        return "type", f"{t['name']} type -> {value}", bytes(b)

    def offsets():
        b = bytearray(data)
        t = rng.choice(layout.tensors)
        other = rng.choice(layout.tensors)
        value = rng.choice([*_HUGE, t["offset"] + 32, t["offset"] + 1, other["offset"], len(data),
                            max(t["offset"] - 32, 0)])
        _put(b, t["offset_at"], "<Q", value)
        return "offset", f"{t['name']} offset {t['offset']} -> {value}", bytes(b)

    def scalar_values():
        b = bytearray(data)
        key, at, vtype = rng.choice([v for v in layout.values if not any(s in v[0] for s in SEMANTIC_GGUF_KEYS)])
        size = _GGUF_SCALARS[vtype]
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]
        value = rng.choice([0, 1, 2 ** (8 * size) - 1, 2 ** (8 * size - 1), rng.randrange(2 ** (8 * size))])
        _put(b, at, fmt, value)
        return "metadata", f"{key} raw -> {value:#x}", bytes(b)

    makers = [truncate, flip, counts, lengths, dims, n_dims, types, offsets, scalar_values]
    for i in range(count):
        out.append(makers[i % len(makers)]())
    return out


def rewrite_gguf(src: Path, dst: Path, meta: dict | None = None, drop: tuple[str, ...] = (),
                 replace: dict | None = None, extra: tuple = (), drop_keys: tuple[str, ...] = ()) -> Path:
    """Copy a GGUF through lowbit's writer with metadata keys changed (`meta`) or dropped (`drop_keys`), tensors
    dropped, replaced ({name: TensorToWrite}) or added: self-consistent files (offsets and sizes right) that say
    something else."""
    import numpy as np

    from lowbit.formats.gguf import TensorToWrite, read_gguf, write_gguf

    gf = read_gguf(src)
    tensors = []
    for name, t in gf.tensors.items():
        if name in drop:
            continue
        if replace and name in replace:
            tensors.append(replace[name])
        else:
            data = np.asarray(t.rows()) if t.is_quantized else t.to_float()
            tensors.append(TensorToWrite(name, t.type_name, t.shape, data))
    metadata = {k: v for k, v in {**gf.metadata, **(meta or {})}.items() if k not in drop_keys}
    return write_gguf(dst, metadata, tensors + list(extra), value_types=dict(gf.value_types))


def float_tensor(name: str, shape: tuple[int, ...], seed: int = 0, type_name: str = "F32"):
    """A GGUF tensor of `shape` with random values, F32 or quantized to a block type (for tensors replaced by ones
    of another shape: a quantized one goes the kept-quantized loader's way, straight to the kernels)."""
    import numpy as np

    from lowbit.formats.gguf import TensorToWrite

    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if type_name != "F32":
        from lowbit.schemes.ggml import quantize_rows

        values = quantize_rows(values.reshape(-1, shape[-1]), type_name, None)
    return TensorToWrite(name, type_name, shape, values)


def gguf_structured_mutants(rng: random.Random, path: Path, count: int) -> list[tuple[str, str, Callable]]:
    """(kind, detail, write(out)) mutants rewritten through lowbit's writer: hyper-parameters edited, tensors
    dropped, added, or replaced by self-consistent tensors of another shape (data appended)."""
    from lowbit.formats.gguf import read_gguf

    gf = read_gguf(path)
    arch = gf.get("general.architecture")
    hparams = [k for k, v in gf.metadata.items() if k.startswith(f"{arch}.") and isinstance(v, int)
               and not any(s in k for s in SEMANTIC_GGUF_KEYS)]
    names = list(gf.tensors)
    made = []
    for i in range(count):
        choice = i % 4
        if choice == 0:
            key = rng.choice(hparams)
            old = gf.metadata[key]
            value = rng.choice([0, old + 1, max(old - 1, 1), old * 2, 2 ** 32 - 1])
            made.append(("metadata", f"{key} {old} -> {value}",
                         lambda out, m={key: value}: rewrite_gguf(path, out, meta=m)))
        elif choice == 1:
            name = rng.choice(names)
            made.append(("tensor-set", f"drop {name}", lambda out, n=name: rewrite_gguf(path, out, drop=(n,))))
        elif choice == 2:
            name = rng.choice([n for n in names if len(gf.tensors[n].shape) == 2])
            rows, cols = gf.tensors[name].shape
            shape = rng.choice([(rows * 2, cols), (65536, cols), (rows, cols * 2), (rows, 4096)])
            made.append(("shape", f"{name} {[rows, cols]} -> {list(shape)} (data appended)",
                         lambda out, n=name, x=float_tensor(name, shape, i): rewrite_gguf(path, out, replace={n: x})))
        else:
            layers = gf.metadata.get(f"{arch}.block_count", 1)
            hidden = gf.tensors["token_embd.weight"].shape[-1]
            extra = float_tensor(f"blk.{layers}.attn_norm.weight", (hidden,), i)
            made.append(("tensor-set", f"extra {extra.name}", lambda out, x=extra: rewrite_gguf(path, out, extra=(x,))))
    return made


# -- safetensors folders ---------------------------------------------------------------------------------------
def _split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


SAFETENSORS_DTYPES = ("F32", "F16", "BF16", "I32", "I64", "U8", "I8", "BOOL", "F64", "U16")


def safetensors_mutants(rng: random.Random, data: bytes, count: int) -> list[tuple[str, str, bytes]]:
    header, body = _split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    head_len = 8 + struct.unpack_from("<Q", data, 0)[0]
    out = []
    for i in range(count):
        choice = i % 6
        if choice == 0:
            cut = rng.choice([rng.randrange(0, 8), rng.randrange(8, head_len), rng.randrange(head_len, len(data))])
            out.append(("truncate", f"model.safetensors cut at {cut} of {len(data)}", data[:cut]))
        elif choice == 1:
            b = bytearray(data)
            at = rng.randrange(0, head_len)
            b[at] ^= 1 << rng.randrange(8)
            out.append(("header-flip", f"model.safetensors bit at byte {at}", bytes(b)))
        elif choice == 2:
            b = bytearray(data)
            value = rng.choice([*_HUGE, head_len, len(data)])
            _put(b, 0, "<Q", value)
            out.append(("length", f"safetensors header length -> {value}", bytes(b)))
        else:
            h = json.loads(json.dumps(header))
            name = rng.choice(names)
            entry = h[name]
            if choice == 3:
                old = entry["dtype"]
                # F16 <-> BF16: same bytes, every bit pattern a value of either (see gguf_byte_mutants' types)
                entry["dtype"] = rng.choice([d for d in SAFETENSORS_DTYPES if d != old and {d, old} != {"F16", "BF16"}])
                detail = f"{name} dtype {old} -> {entry['dtype']}"
                kind = "type"
            elif choice == 4:
                old = list(entry["shape"])
                if old:
                    j = rng.randrange(len(old))
                    entry["shape"][j] = rng.choice([old[j] * 2, old[j] + 1, 0, 2 ** 40])
                else:
                    entry["shape"] = [2]
                detail = f"{name} shape {old} -> {entry['shape']}"
                kind = "shape"
            else:
                a, b_ = entry["data_offsets"]
                other = h[rng.choice(names)]["data_offsets"]
                entry["data_offsets"] = rng.choice([[a, b_ + 4], [a + 4, b_ + 4], list(other), [b_, a],
                                                    [a, 2 ** 62], [len(body), len(body) + (b_ - a)]])
                detail = f"{name} data_offsets {[a, b_]} -> {entry['data_offsets']}"
                kind = "offset"
            out.append((kind, detail, _join_safetensors(h, body)))
    return out


def tensor_set_mutants(rng: random.Random, folder: Path, count: int) -> list[tuple[str, str, Callable]]:
    """Re-saved model.safetensors with a tensor dropped, added, reshaped (consistent data) or stored as another
    dtype (GPTQ qweight as float, codes as float, scales as integers)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    made = []
    for i in range(count):
        choice = i % 4
        name = rng.choice(names)
        t = tensors[name]
        if choice == 0:
            new = {k: v for k, v in tensors.items() if k != name}
            detail = f"drop {name}"
        elif choice == 1:
            extra = rng.choice(["model.layers.99.mlp.up_proj.weight", "model.extra.weight",
                                name.rsplit(".", 1)[0] + ".extra"])
            new = {**tensors, extra: torch.zeros(4, 4)}
            detail = f"extra {extra}"
        elif choice == 2:
            shape = list(t.shape) or [1]
            shape[0] = rng.choice([shape[0] * 2, shape[0] + 1, max(shape[0] // 2, 1)])
            new = {**tensors, name: torch.zeros(shape, dtype=t.dtype)}
            detail = f"{name} shape {list(t.shape)} -> {shape}"
        else:
            # floats cast to int32 (no format stores statistics so); uint8 is lowbit's legal compact form of
            # integer-valued statistics, so a cast to it is a change of values, not of format: left out
            dtype = torch.float32 if not t.is_floating_point() else torch.int32
            new = {**tensors, name: t.to(dtype)}
            detail = f"{name} dtype {t.dtype} -> {dtype}"
        kind = "dtype" if choice == 3 else "tensor-set" if choice < 2 else "shape"
        made.append((kind, detail, lambda out, n=new: save_file(n, str(out), metadata={"format": "pt"})))
    return made


# -- JSON configuration edits ------------------------------------------------------------------------------------
STRUCTURAL_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                   "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings", "model_type",
                   "tie_word_embeddings")


# settings whose edits legitimately change the numbers and cannot be told from a corruption: the fuzzer leaves
# them alone (a changed rope_theta gives other logits, and nothing in the weights says which one is right)
SEMANTIC_KEYS = ("rope_theta", "rms_norm_eps", "layer_norm_eps", "bnb_4bit_compute_dtype", "torch_dtype", "dtype",
                 "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "hidden_act", "initializer_range")


def _edit_values(rng: random.Random, old: Any) -> Any:
    if isinstance(old, bool):
        return rng.choice([not old, "yes", None, 1])
    if isinstance(old, int):
        return rng.choice([old + 1, max(old - 1, 0), old * 2, 0, -1, 2 ** 32 - 1, 10 ** 12, str(old), None, 1.5])
    if isinstance(old, str):
        return rng.choice(["", old + "x", "gptq_v9", 7, None, old.upper()])
    if old is None:
        return rng.choice([1, "x", [], {}])
    if isinstance(old, list):
        return rng.choice([[], old[:1], old + old, "x", None])
    if isinstance(old, dict):
        return rng.choice([{}, None, "x", []])
    return None


def json_mutants(rng: random.Random, file: Path, count: int, keys: tuple[str, ...] | None = None
                 ) -> list[tuple[str, str, str | None]]:
    """(kind, detail, new text or None for a deleted file) edits of one JSON file: a key's value changed to a
    neighbour, an absurd or mistyped value, a key deleted, the file truncated, replaced by null or deleted."""
    text = file.read_text()
    data = json.loads(text)
    label = file.name
    flat: list[tuple[tuple, Any]] = []

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in SEMANTIC_KEYS:
                    continue
                if keys is None or path or k in keys:
                    flat.append((path + (k,), v))
                if isinstance(v, dict) and (keys is None or k in ("quantization_config", "text_config")):
                    walk(v, path + (k,))
                if isinstance(v, dict) and k == "layers":       # lowbit.json: one layer's spec
                    first = sorted(v)[:1]
                    for name in first:
                        walk(v[name], path + (k, name))

    walk(data, ())
    out = []
    for i in range(count):
        choice = i % 8
        if choice == 0 and i % 16 == 0:
            out.append(("config", f"{label} truncated", text[: rng.randrange(len(text))]))
            continue
        if choice == 0:
            out.append(("config", f"{label} -> {rng.choice(['null', '[]', '7'])}", rng.choice(["null", "[]", "7"])))
            continue
        key_path, old = rng.choice(flat)
        edited = json.loads(text)
        node = edited
        for k in key_path[:-1]:
            node = node[k]
        if choice == 1:
            del node[key_path[-1]]
            detail = f"{label} delete {'.'.join(key_path)}"
        else:
            new = _edit_values(rng, old)
            node[key_path[-1]] = new
            detail = f"{label} {'.'.join(key_path)} {json.dumps(old)[:40]} -> {json.dumps(new)[:40]}"
        out.append(("config", detail, json.dumps(edited)))
    return out


# -- building and running mutants ------------------------------------------------------------------------------
def make_mutants(originals: dict[str, Path], root: Path, seed: int, per_format: int) -> list[Mutant]:
    """About `per_format` mutants of each original (GGUF files and checkpoint folders), written under `root`."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    mutants: list[Mutant] = []
    for fmt, original in originals.items():
        made: list[tuple[str, str, Any]] = []
        if original.is_file():
            data = original.read_bytes()
            n_bytes = per_format * 2 // 3
            made += [(k, d, b) for k, d, b in gguf_byte_mutants(rng, data, n_bytes)]
            made += gguf_structured_mutants(rng, original, per_format - n_bytes)
        else:
            n_json = per_format // 2
            json_files = [original / "config.json"] + [original / n for n in ("lowbit.json", "quantize_config.json")
                                                       if (original / n).is_file()]
            for j, file in enumerate(json_files):
                share = n_json // len(json_files) + (1 if j < n_json % len(json_files) else 0)
                keys = STRUCTURAL_KEYS if file.name == "config.json" else None
                made += [(k, d, (file.name, text)) for k, d, text in json_mutants(rng, file, share, keys)]
            made.append(("config", f"delete {json_files[-1].name}", (json_files[-1].name, None)))
            rest = per_format - n_json - 1
            data = (original / "model.safetensors").read_bytes()
            made += [(k, d, ("model.safetensors", b)) for k, d, b in safetensors_mutants(rng, data, rest // 2)]
            made += [(k, d, ("model.safetensors", w))
                     for k, d, w in tensor_set_mutants(rng, original, rest - rest // 2)]
        for index, (kind, detail, payload) in enumerate(made):
            target = root / f"{fmt}-{index:04d}"
            if original.is_file():
                target = target.with_suffix(".gguf")
                if callable(payload):
                    payload(target)
                else:
                    target.write_bytes(payload)
            else:
                shutil.copytree(original, target)
                name, content = payload
                file = target / name
                if content is None:
                    file.unlink()
                elif callable(content):
                    file.unlink()
                    content(file)
                elif isinstance(content, bytes):
                    file.write_bytes(content)
                else:
                    file.write_text(content)
            mutants.append(Mutant(fmt, kind, detail, target))
    return mutants


def logits_digest(path: Path) -> str:
    """Load like `lowbit generate` (quantized blocks kept) and digest the logits of the model's forward pass and
    of the engine (compiled step where it applies) on a fixed prompt."""
    import hashlib

    import torch

    from lowbit.engine.runner import Engine
    from lowbit.models.loading import load_model

    model, _ = load_model(path, keep_quantized=True)
    with torch.no_grad():
        forward = model(torch.tensor([PROMPT])).logits.float()
    engine = Engine(model, context=32)
    step = engine.logits(PROMPT).float()
    return hashlib.sha256(forward.numpy().tobytes() + step.numpy().tobytes()).hexdigest()


CLI_ARGS = ("generate", "-p", "Once", "-n", "2", "--threads", "1")   # the digests' thread count


def cli_verdict(path: Path) -> dict[str, Any]:
    """`lowbit generate PATH` run through the CLI's own entry point (lowbit.cli.main, what `python -m lowbit.cli`
    exits with) in this process: its exit code, its "lowbit: error:" lines and whether a traceback escaped."""
    import contextlib
    import io
    import traceback

    from lowbit.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main([CLI_ARGS[0], str(path), *CLI_ARGS[1:]])
        except SystemExit as exc:       # argparse and friends
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001  (what `python -m lowbit.cli` would print as a traceback)
            traceback.print_exc()
            code = 1
    text = err.getvalue()
    return {"exit": code, "errors": [line for line in text.splitlines() if line.startswith("lowbit: error:")],
            "traceback": "Traceback" in text}


def worker(judge: str = "real") -> None:
    """Read mutant paths (one per line), answer one JSON line each: {"digest"}, or {"error"} with the CLI's verdict
    on the same file (`lowbit generate` must exit 2 with that one line), or {"exception"}. `judge="misbehaving"`
    loads nothing and misbehaves as each file's name says (misbehaving_digest), for the harness's self-test."""
    started = time.perf_counter()
    digest, verdict = logits_digest, cli_verdict
    if judge == "misbehaving":
        digest, verdict = misbehaving_digest, misbehaving_cli_verdict
    else:
        import logging

        import torch

        import lowbit.cli  # noqa: F401  (every import a mutant's load makes, before time limits start)
        import lowbit.engine.runner  # noqa: F401
        import lowbit.models.loading  # noqa: F401

        logging.disable(logging.WARNING)
        torch.set_num_threads(1)
    from lowbit.errors import LowbitError

    print(json.dumps({"ready": time.perf_counter() - started}), flush=True)
    for line in sys.stdin:
        path = Path(line.strip())
        try:
            answer = {"digest": digest(path)}
        except LowbitError as exc:
            answer = {"error": str(exc), "cli": verdict(path)}
        except Exception as exc:  # noqa: BLE001  (the fuzz test reports these as failures)
            answer = {"exception": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(answer), flush=True)


def misbehaving_digest(path: Path) -> str:
    """A judge that does what a broken reader would, as the file's name says (the harness must see each): the
    original's digest, another digest, a one-line or two-line LowbitError, another exception (a traceback for the
    user), an abort (a crash in C) or no answer (a hang)."""
    from lowbit.errors import LowbitError

    behaviour = path.name
    if behaviour in ("original", "identical"):
        return "the original's logits"
    if behaviour == "different":
        return "other logits"
    if behaviour in ("error", "cli"):
        raise LowbitError(f"{path}: a one-line error")
    if behaviour == "multiline":
        raise LowbitError(f"{path}: an error\nover two lines")
    if behaviour == "traceback":
        raise KeyError("a reader's unchecked lookup")
    if behaviour == "crash":
        os.abort()
    if behaviour == "hang":
        time.sleep(3600)
    raise AssertionError(f"no behaviour named {behaviour!r}")


def misbehaving_cli_verdict(path: Path) -> dict[str, Any]:
    """`lowbit generate`'s verdict as a broken CLI would give it for a file named "cli" (exit 1, a traceback), as
    the real one does for the others."""
    if path.name == "cli":
        return {"exit": 1, "errors": [], "traceback": True}
    return {"exit": 2, "errors": [f"lowbit: error: {path}: a one-line error"], "traceback": False}


class Worker:
    """A worker subprocess that imports torch and lowbit once and judges mutants one after another; restarted
    (imports again) only after a crash or a hang. `start()` returns at once, so the imports overlap whatever the
    caller does next (building the originals); the first `ask` waits for them without a mutant's time limit."""

    def __init__(self, cwd: Path, import_timeout: float = 600.0, judge: str = "real"):
        self.cwd, self.proc, self.import_timeout, self.ready = cwd, None, import_timeout, False
        self.starts, self.import_seconds, self.judge = 0, 0.0, judge

    def start(self) -> "Worker":
        code = f"import sys; sys.path.insert(0, 'tests'); import fuzzing; fuzzing.worker({self.judge!r})"
        env = {**os.environ, "PYTHONFAULTHANDLER": "0", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=self.cwd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
                                     bufsize=1)
        self.ready = False
        self.starts += 1
        return self

    def _line(self, timeout: float) -> str | None:
        """The worker's next answer line; None if none came within `timeout`, "" if it died."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def _wait_ready(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if not self.ready:
            line = self._line(self.import_timeout)
            if not line or "ready" not in json.loads(line):
                self.stop()
                raise RuntimeError(f"the fuzz worker did not start within {self.import_timeout:.0f} s")
            self.ready, self.import_seconds = True, json.loads(line)["ready"]

    def ask(self, path: Path, timeout: float) -> tuple[str, Any]:
        """(outcome, detail) for one path: digest (hex), error (message, CLI verdict), exception, crash or hang."""
        self._wait_ready()
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        line = self._line(timeout)
        if line is None:
            self.stop()
            return "hang", f"no answer in {timeout:.0f} s"
        if not line:
            code = self.proc.wait()
            self.proc = None
            return "crash", f"worker exited with {code}"
        answer = json.loads(line)
        if "digest" in answer:
            return "digest", answer["digest"]
        if "error" in answer:
            return "error", (answer["error"], answer["cli"])
        return "exception", answer["exception"]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def judge_error(message: str, cli: dict[str, Any]) -> tuple[str, str]:
    """A LowbitError is accepted when its message is one line and `lowbit generate` on the same file exits 2 with
    exactly that one "lowbit: error:" line and no traceback."""
    if "\n" in message.strip():
        return "multiline", message
    if cli["exit"] != 2 or len(cli["errors"]) != 1 or cli["traceback"]:
        return "cli", f"lowbit generate exited {cli['exit']} with {len(cli['errors'])} error lines" + (
            " and a traceback" if cli["traceback"] else "") + f" (load said: {message[:150]})"
    return "error", message


def run_mutants(mutants: list[Mutant], originals: dict[str, Path], cwd: Path, timeout: float = MUTANT_TIMEOUT_S,
                worker: Worker | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Every mutant's outcome (identical / error / different / exception / multiline / cli / crash / hang) next
    to its format, class and detail, and the originals' digests, judged by `worker` (a long-lived one shared by
    several runs, or a fresh one stopped at the end). A mutant that hangs is retried once in a fresh worker
    (whose imports do not count against the limit) before it counts as a hang."""
    own = worker is None
    worker = worker or Worker(cwd)
    try:
        reference = {}
        for fmt, path in originals.items():
            outcome, value = worker.ask(path, worker.import_timeout)
            if outcome != "digest":
                raise RuntimeError(f"the original {fmt} model does not load: {outcome}: {value}")
            reference[fmt] = value
        results = []
        for mutant in mutants:
            started = time.perf_counter()
            outcome, value = worker.ask(mutant.path, timeout)
            if outcome == "hang":
                outcome, value = worker.ask(mutant.path, timeout)
            if outcome == "digest":
                outcome = "identical" if value == reference[mutant.format] else "different"
                value = ""
            elif outcome == "error":
                outcome, value = judge_error(*value)
            results.append({"format": mutant.format, "kind": mutant.kind, "detail": mutant.detail,
                            "outcome": outcome, "message": value, "seconds": round(time.perf_counter() - started, 3),
                            "path": str(mutant.path)})
        return results, reference
    finally:
        if own:
            worker.stop()


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{mutation class: {outcome: count}} plus a "total" row."""
    table: dict[str, dict[str, int]] = {}
    for r in results:
        for row in (r["kind"], "total"):
            table.setdefault(row, {})
            table[row][r["outcome"]] = table[row].get(r["outcome"], 0) + 1
    return table


def format_table(table: dict[str, dict[str, int]]) -> str:
    outcomes = list(OUTCOMES)
    lines = [f"{'class':<12}" + "".join(f"{o:>11}" for o in outcomes)]
    for row, counts in sorted(table.items(), key=lambda kv: (kv[0] == "total", kv[0])):
        lines.append(f"{row:<12}" + "".join(f"{counts.get(o, 0):>11}" for o in outcomes))
    return "\n".join(lines)


ORIGINAL_FORMATS = ("gguf-q8_0", "gguf-q4_k_m", "native-rtn4", "gptq", "bnb-nf4")


def build_originals(stories: Path, root: Path, formats: tuple[str, ...] = ORIGINAL_FORMATS) -> dict[str, Path]:
    """The valid models the mutants come from, all written by lowbit from stories260K: GGUF Q8_0 and Q4_K_M files,
    a native RTN 4-bit folder, a GPTQ folder (4-bit, symmetric; the MLP, whose width 172 GPTQ cannot pack, kept in
    float) and a bitsandbytes NF4 folder."""
    import logging

    from lowbit.api import save
    from lowbit.formats.gguf import export_gguf
    from lowbit.methods.base import QuantizeConfig
    from lowbit.methods.pipeline import quantize_model
    from lowbit.models.loading import load_model

    logging.disable(logging.WARNING)
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    float_model, tok = load_model(stories)
    for gguf_type in ("Q8_0", "Q4_K_M"):
        if f"gguf-{gguf_type.lower()}" in formats:
            out[f"gguf-{gguf_type.lower()}"] = export_gguf(float_model, tok, root / f"stories-{gguf_type}.gguf",
                                                           type=gguf_type, progress=False)
    for fmt, config in (("native-rtn4", QuantizeConfig(method="rtn", bits=4, group_size=32)),
                        ("gptq", QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=True,
                                                skip=("lm_head", "mlp"))),
                        ("bnb-nf4", QuantizeConfig(method="nf4"))):
        if fmt not in formats:
            continue
        model = copy.deepcopy(float_model)
        quantize_model(model, config, progress=False)
        out[fmt] = save(model, root / fmt, format={"native-rtn4": "lowbit", "gptq": "gptq", "bnb-nf4": "bnb"}[fmt],
                        tokenizer=tok)
    logging.disable(logging.NOTSET)
    return out
