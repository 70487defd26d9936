"""Fills a folder (default ``.gpu/``, git-ignored) with what ``scale_gpu.py`` needs on a GPU machine
that reaches no network and receives at most 64 MiB of files.

    .venv/bin/python benchmarks/gpu/carry.py            # here, with network to PyPI
    # there (its own python3 with torch + CUDA):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
    PYTHONPATH=/tmp/site:src python3 benchmarks/gpu/scale_gpu.py --random-weights .gpu/arch --out ...

* ``whl/``: this project's pinned transformers, peft and bitsandbytes wheels (Python 3.12,
  manylinux), bitsandbytes cut to its CPU and CUDA 13 libraries (43 -> 5 MB; CUDA 12 builds need
  ``--keep-cuda 12``);
* ``arch/<model>/``: each packaged model's config and tokenizer files without its weights (the
  checkpoints are 440-540 MB): ``scale_gpu.py --random-weights`` builds the same architectures
  with random weights, which changes neither throughput nor memory.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from hyperadalora.models import resolve_model_path

PINNED = ("transformers", "peft", "bitsandbytes")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def pinned_versions(pyproject: Path) -> dict[str, str]:
    """``name -> version`` of :data:`PINNED` as ``pyproject.toml`` pins them (``name==version``)."""
    text = pyproject.read_text()
    found = {}
    for name in PINNED:
        match = re.search(rf'"{name}==([^"]+)"', text)
        if match is None:
            raise ValueError(f"{pyproject} pins no {name}==VERSION")
        found[name] = match.group(1)
    return found


def download(versions: dict[str, str], dest: Path) -> None:
    """The wheels for CPython 3.12 on x86-64 Linux, without their dependencies."""
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["--platform=manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version=3.12", "--implementation=cp", *platforms, "-d", str(dest),
                    *[f"{n}=={v}" for n, v in versions.items()]], check=True)


def strip_libraries(wheel: Path, keep_cuda: str) -> None:
    """Rewrites ``wheel`` without the native libraries of other CUDA versions, ROCm and XPU."""
    drop = re.compile(rf"libbitsandbytes_(rocm|xpu|cuda(?!{keep_cuda})\d+)")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if drop.search(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):  # the dropped files' lines go too
                data = b"".join(line for line in data.splitlines(keepends=True) if not drop.search(line.decode()))
            dst.writestr(item, data)
    tmp.replace(wheel)


def copy_architecture(name: str, dest: Path) -> None:
    """The packaged model's files without its weights."""
    source = resolve_model_path(name)
    dest.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES:
            shutil.copy(f, dest / f.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", default=".gpu")
    parser.add_argument("--models", default="smollm2,mpnet")
    parser.add_argument("--keep-cuda", default="13", help="major CUDA version of the GPU machine's torch")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    dest = Path(args.dest)
    shutil.rmtree(dest / "whl", ignore_errors=True)
    (dest / "whl").mkdir(parents=True)
    download(pinned_versions(root / "pyproject.toml"), dest / "whl")
    for wheel in (dest / "whl").glob("bitsandbytes-*.whl"):
        strip_libraries(wheel, args.keep_cuda)
    for name in args.models.split(","):
        copy_architecture(name, dest / "arch" / name)
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {total / 2**20:.1f} MiB to carry")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
