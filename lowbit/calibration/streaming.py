"""Layer-wise streaming quantization: never hold more than one decoder block's float weights in memory.

The model is built on the meta device (no memory), the parts outside the decoder blocks (embeddings, final
norm, head, rotary tables) are loaded from the safetensors shards, and then each block in turn is loaded
from the shards, calibrated on the activations entering it, quantized, run to produce the next block's
activations, written to a per-block safetensors file, and freed. At the end the per-block files are merged,
by copying bytes, into the single `model.safetensors` of lowbit's native format. Peak memory is about one
float block plus the calibration activations plus the non-block weights, instead of the whole model.
"""
from __future__ import annotations

import gc
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from lowbit.errors import CorruptFile, LowbitError, unreadable_weights
from lowbit.methods.base import Method, QuantizeConfig, get_method

log = logging.getLogger("lowbit")

_COPY_CHUNK = 64 << 20
STREAMING_HINT = ("even one decoder layer and its calibration activations do not fit in the memory left; free "
                  "memory or lower --calib-samples")


class ShardIndex:
    """Which safetensors file holds each tensor of an HF folder (headers only; no tensor is read). Given the
    model, a tensor the checkpoint names otherwise (GPT-NeoX's embed_out for lm_head) is found under the model's
    name too, through transformers' own renamings for that model; its name on disk stays (`expert_tensors` reads
    the layouts on disk itself)."""

    def __init__(self, folder: Path, model: nn.Module | None = None):
        from lowbit.formats.hf_quantized import weight_files

        self.folder = Path(folder)
        files = weight_files(self.folder)
        if not files:
            raise LowbitError(f"{folder} has no *.safetensors files; layer-wise streaming reads safetensors shards "
                              "(convert .bin checkpoints with transformers first)")
        self.file_of: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        self.file_of[key] = file
            except (SafetensorError, OSError) as exc:
                raise unreadable_weights(file, exc) from exc
        self.disk_name: dict[str, str] = {}    # the model's name -> the checkpoint's, where they differ
        if model is not None:
            for key, name in checkpoint_renames(model, list(self.file_of)).items():
                self.file_of.setdefault(name, self.file_of[key])
                self.disk_name.setdefault(name, key)

    def keys_under(self, prefix: str) -> list[str]:
        return [k for k in self.file_of if k.startswith(prefix)]

    def load(self, keys: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Read `keys` (floating tensors cast to `dtype`), opening each shard once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.file_of[key], []).append(key)
        out = {}
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in names:
                        t = f.get_tensor(self.disk_name.get(name, name))
                        out[name] = t.to(dtype) if t.is_floating_point() else t
            except (SafetensorError, OSError, MemoryError, RuntimeError) as exc:
                raise unreadable_weights(file, exc, STREAMING_HINT) from exc
        return out


def checkpoint_renames(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """The checkpoint keys among `keys` that transformers renames when it loads them into `model` (its
    conversion mapping's WeightRenamings, legacy ones included), and their names in the model. Its converters,
    which change tensors as well as names (fusing experts), are not applied. transformers 4 (pyproject allows
    4.56) has no such mapping (nor core_model_loading): no key is renamed, rather than the import failing."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return {}

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    renamed = {key: apply_renamings(key, renamings) for key in keys}
    return {key: name for key, name in renamed.items() if name != key}


def meta_skeleton(config: Any) -> nn.Module:
    """The model's modules with every tensor on the meta device (allocates nothing)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    return model.eval()


def rebuild_computed_buffers(model: nn.Module, names: list[str]) -> None:
    """Give the modules `names` of a meta skeleton real values for the buffers no checkpoint holds, which
    transformers computes when it builds a module (non-persistent: rotary inv_freq tables, Gemma's embed_scale):
    as from_pretrained does after loading on the meta device, the model's own `_init_weights` is run on each
    module owning such a buffer, on the CPU. Its other tensors are meta stand-ins meanwhile, so that the init
    writes nothing but those buffers (not the loaded embedding it would otherwise redraw)."""
    from transformers import PreTrainedModel

    initialisers: dict[str, nn.Module] | None = None    # found on the first module that needs one: most blocks have none
    for name in names:
        module = model.get_submodule(name)
        computed = [b for b, t in module._buffers.items()
                    if t is not None and t.is_meta and b in module._non_persistent_buffers_set]
        if not computed:
            continue
        if initialisers is None:
            initialisers = {n: m for n, m in model.named_modules() if isinstance(m, PreTrainedModel)}
        owner = max((n for n in initialisers if not n or name == n or name.startswith(n + ".")), key=len)
        for b in computed:
            module._buffers[b] = torch.full_like(module._buffers[b], _unwritten(module._buffers[b].dtype), device="cpu")
        kept = {k: t for k, t in module._parameters.items() if t is not None}
        kept_buffers = {k: t for k, t in module._buffers.items() if t is not None and k not in computed}
        try:
            for k, p in kept.items():
                module._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for k, t in kept_buffers.items():
                module._buffers[k] = torch.empty_like(t, device="meta")
            with torch.no_grad():
                initialisers[owner]._init_weights(module)
        finally:
            module._parameters.update(kept)
            module._buffers.update(kept_buffers)
        unset = [b for b in computed if _holds_unwritten(module._buffers[b])]
        if unset:
            raise LowbitError(f"streaming cannot compute {name}.{unset[0]} ({type(module).__name__}) off the meta "
                              "device; quantize without streaming")


def _unwritten(dtype: torch.dtype) -> float | int | bool:
    """What a computed buffer is filled with before its init, to tell whether the init wrote it: NaN, the
    smallest integer (never a table's entry), or False for masks (which cannot be told apart)."""
    if dtype.is_floating_point:
        return float("nan")
    return False if dtype == torch.bool else torch.iinfo(dtype).min


def _holds_unwritten(buffer: torch.Tensor) -> bool:
    if buffer.is_floating_point():
        return bool(buffer.isnan().any())
    return buffer.dtype != torch.bool and bool((buffer == _unwritten(buffer.dtype)).any())


def materialise_outside_blocks(model: nn.Module, index: ShardIndex, blocks_path: str) -> None:
    """Load every tensor that is not part of a decoder block (embeddings, final norm, head)."""
    prefix = blocks_path + "."
    wanted = [k for k in model.state_dict() if not k.startswith(prefix)]
    present = [k for k in wanted if k in index.file_of]
    model.load_state_dict(index.load(present), strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    rebuild_computed_buffers(model, [n for n, _ in model.named_modules() if not n.startswith(prefix)])
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix)]
    if still_meta:
        raise CorruptFile(f"{index.folder}: the checkpoint lacks {still_meta[:5]}; it is incomplete")


def load_block(model: nn.Module, index: ShardIndex, blocks_path: str, i: int) -> nn.Module:
    """Give block i real weights from the shards (replacing its meta tensors); expert weights are read from
    whichever layout the checkpoint uses (`expert_tensors`)."""
    from lowbit.models.arch import architecture_for

    block = model.get_submodule(f"{blocks_path}.{i}")
    prefix = f"{blocks_path}.{i}."
    keys = [prefix + k for k in block.state_dict()]
    tensors = index.load([k for k in keys if k in index.file_of])
    experts = architecture_for(model).experts
    absent = [k for k in keys if k not in tensors]
    if absent and experts is not None:
        tensors.update(expert_tensors(index, experts, prefix, absent))
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CorruptFile(f"{index.folder}: the checkpoint lacks {missing[:5]}; it is incomplete")
    block.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True, assign=True)
    rebuild_computed_buffers(model, [f"{blocks_path}.{i}" + (f".{n}" if n else "") for n, _ in block.named_modules()])
    return block


def expert_tensors(index: ShardIndex, experts: Any, prefix: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The per-expert (and router) tensors `keys` of one block (lowbit's unfused names) read from the other
    layouts a checkpoint may use: the family's own names on disk (Mixtral's block_sparse_moe.experts.{e}.w1),
    or transformers' fused 3-D tensors (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]).
    Keys found in neither are left out (the caller reports them)."""
    import re

    pattern = re.compile(rf"(.*{re.escape(experts.path)})\.(\d+)\.(\w+)\.weight")
    fused: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        name = key[len(prefix):]
        match = pattern.fullmatch(name)
        disk = name
        if match and experts.disk_projections and match.group(3) in experts.projections:
            projection = experts.disk_projections[experts.projections.index(match.group(3))]
            disk = f"{match.group(1)}.{match.group(2)}.{projection}.weight"
        for on_disk, in_model in experts.disk_renames:
            disk = disk.replace(in_model, on_disk)
        if prefix + disk in index.file_of:
            out[key] = index.load([prefix + disk])[prefix + disk]
            continue
        if match is None:
            continue
        gate_up, down = (f"{prefix}{match.group(1)}.{p}" for p in ("gate_up_proj", "down_proj"))
        if gate_up not in index.file_of or down not in index.file_of:
            continue
        if gate_up not in fused:
            fused.update(index.load([gate_up, down]))
        e, projection = int(match.group(2)), match.group(3)
        inter = fused[gate_up].shape[1] // 2
        parts = {"gate_proj": fused[gate_up][e, :inter], "up_proj": fused[gate_up][e, inter:],
                 "down_proj": fused[down][e]}
        if projection in parts:
            out[key] = parts[projection].clone()
    return out


def quantized_layer_tensors(name: str, qw: Any, bias: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict]:
    """One quantized layer's tensors under lowbit's native names, and its manifest entry."""
    tensors = {f"{name}.{key}": value.contiguous() for key, value in qw.scheme.to_tensors(qw).items()}
    if bias is not None:
        tensors[f"{name}.bias"] = bias.detach().contiguous()
    return tensors, {"scheme": qw.scheme.to_config(), "shape": list(qw.shape), "group_size": qw.group_size}


def block_tensors(block: nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A quantized block's tensors as lowbit's native format names them, and its manifest entries."""
    from lowbit.runtime.surgery import quantized_modules

    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    quantized = dict(quantized_modules(block))
    for name, module in quantized.items():
        layer, layers[f"{prefix}.{name}"] = quantized_layer_tensors(f"{prefix}.{name}", module.qweight, module.bias)
        tensors.update(layer)
    skip = tuple(f"{n}." for n in quantized)
    for key, value in block.state_dict().items():
        if not key.startswith(skip):
            tensors[f"{prefix}.{key}"] = value.detach().contiguous()
    return tensors, layers


_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory (save_file first builds the whole
    file as one bytes object, which would double the peak memory for the embedding and head)."""
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_CODES:
            raise LowbitError(f"cannot write tensor {name} of dtype {t.dtype}")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    with open(path, "wb") as f:
        _write_header(f, header)
        for name in names:
            t = tensors[name].detach().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def _write_header(f, header: dict[str, Any]) -> None:
    """safetensors' header: its length (u64 little-endian), then the JSON padded with spaces to 8 bytes."""
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)


def merge_safetensors(parts: list[Path], out: Path) -> None:
    """Concatenate safetensors files (distinct keys) into one, copying tensor bytes without loading them."""
    entries = []   # (name, dtype, shape, source file, absolute start, length)
    for part in parts:
        with open(part, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            entries.append((name, info["dtype"], info["shape"], part, base + begin, end - begin))
    entries.sort(key=lambda e: e[0])
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, _, _, length in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        offset += length
    with open(out, "wb") as dst:
        _write_header(dst, header)
        handles: dict[Path, Any] = {}
        try:
            for _, _, _, part, start, length in entries:
                src = handles.get(part) or handles.setdefault(part, open(part, "rb"))
                src.seek(start)
                remaining = length
                while remaining:
                    chunk = src.read(min(_COPY_CHUNK, remaining))
                    if not chunk:
                        raise CorruptFile(f"{part} ended early while merging shards")
                    dst.write(chunk)
                    remaining -= len(chunk)
        finally:
            for h in handles.values():
                h.close()


class ShardSource:
    """Blocks read from the safetensors shards of an HF folder into the meta skeleton, one at a time."""

    def __init__(self, model: nn.Module, index: ShardIndex, blocks_path: str):
        self.model = model
        self.index = index
        self.blocks_path = blocks_path

    def block(self, i: int) -> nn.Module:
        return load_block(self.model, self.index, self.blocks_path, i)


class PartFiles:
    """Sink writing each finished block to its own safetensors part file (then dropping its weights), and the
    quantized Linears outside the blocks to the rest; `merge` joins them into lowbit's native weights file."""

    def __init__(self, model: nn.Module, blocks_path: str, folder: Path):
        self.model = model
        self.blocks = model.get_submodule(blocks_path)
        self.block_root = blocks_path + "."
        self.folder = folder
        self.parts: list[Path] = []
        self.layers: dict[str, Any] = {}      # manifest entries of the quantized layers
        self.rest: dict[str, torch.Tensor] = {}
        self.tied: dict[str, str] = {}        # tied parameter -> the one stored

    def put_block(self, i: int, prefix: str, block: nn.Module) -> None:
        tensors, entries = block_tensors(block, prefix)
        part = self.folder / f".block-{i:05d}.safetensors"
        write_safetensors(tensors, part)
        self.parts.append(part)
        self.layers.update(entries)
        self.blocks[i] = nn.Module()     # drop the block's weights; only its file remains
        del tensors
        gc.collect()

    def put_outside(self, name: str, module: nn.Module, qweight: Any) -> None:
        tensors, self.layers[name] = quantized_layer_tensors(name, qweight, getattr(module, "bias", None))
        self.rest.update(tensors)

    def finish(self) -> None:
        """Everything else outside the blocks (embeddings, norms, a skipped head), then merge the parts."""
        from lowbit.formats.native import WEIGHTS

        quantized_prefixes = tuple(f"{n}." for n in self.layers)
        seen: dict[int, str] = {}
        for key, value in self.model.state_dict().items():
            if key.startswith(self.block_root) or key.startswith(quantized_prefixes) or key in self.rest:
                continue
            ptr = value.data_ptr()
            if ptr in seen and value.numel():
                self.tied[key] = seen[ptr]
                continue
            seen[ptr] = key
            self.rest[key] = value.detach().contiguous()
        rest_file = self.folder / ".rest.safetensors"
        write_safetensors(self.rest, rest_file)
        merge_safetensors(self.parts + [rest_file], self.folder / WEIGHTS)
        for part in self.parts + [rest_file]:
            part.unlink()


def stream_quantize(source: str | Path, out: str | Path, config: QuantizeConfig, calibration: Any = None,
                    progress: bool = True) -> Path:
    """Quantize the HF folder `source` block by block from its safetensors shards into lowbit format at `out`.

    `calibration`: token ids [n, L], a CalibrationRequest with a text file, or a text file path (calibrated
    methods only; streaming cannot generate calibration text, since that needs the whole model at once).
    """
    from lowbit.formats.atomic import atomic_dir
    from lowbit.formats.native import FORMAT_VERSION, MANIFEST, save_hf_side_files
    from lowbit.methods.pipeline import walk
    from lowbit.models.arch import architecture_for
    from lowbit.models.loading import load_config, load_tokenizer

    source, out = Path(source), Path(out)
    hf_config = load_config(source)
    arch = architecture_for(hf_config)
    method: Method = get_method(config)
    if method.needs_calibration and (calibration is None or getattr(calibration, "text_file", "") is None):
        raise LowbitError("layer-wise streaming needs calibration text (--calib FILE): self-generated text "
                          "would need the whole model in memory")
    model = meta_skeleton(hf_config)
    index = ShardIndex(source, model)
    with torch.device("meta"):
        arch.prepare(model)     # experts as one Linear per projection, allocating nothing
    materialise_outside_blocks(model, index, arch.blocks_path)
    tokenizer = load_tokenizer(source)
    model.tokenizer = tokenizer
    with atomic_dir(out) as tmp:
        sink = PartFiles(model, arch.blocks_path, tmp)
        walk(method, ShardSource(model, index, arch.blocks_path), sink, calibration, progress,
             desc=f"{method.name} stream")
        model.lowbit_config = config
        manifest = {"format": "lowbit", "version": FORMAT_VERSION, "quantization": config.to_dict(),
                    "layers": sink.layers, "tied": sink.tied, "streamed": True}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        save_hf_side_files(model, tokenizer, tmp)
    return out


def stream_from_cli(args: Any, config: QuantizeConfig) -> Path:
    """`lowbit quantize MODEL --stream ...`: checks the CLI arguments and runs `stream_quantize`."""
    from lowbit.methods.base import CalibrationRequest
    from lowbit.models.loading import resolve_model_path

    if args.format != "lowbit":
        raise LowbitError(f"--stream writes lowbit's native format; drop --format {args.format} (or drop --stream)")
    source = resolve_model_path(args.model)
    if not source.is_dir():
        raise LowbitError(f"--stream reads an HF folder with safetensors shards, and {source} is not a folder")
    calibration = CalibrationRequest(None, args.calib, args.calib_samples, args.calib_len, args.seed)
    return stream_quantize(source, args.output, config, calibration=calibration)
