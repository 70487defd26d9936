"""The random generators' states: snapshot, convert to tensors + JSON, restore (training checkpoints).

Covers torch's CPU (and CUDA) generators, Python's and NumPy's Mersenne Twisters and a DyLoRA
model's rank sampler: everything a resumed run needs to draw the same random numbers.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch


def rng_snapshot(model=None) -> dict[str, Any]:
    """The generators' states as they are now, unconverted (cheap enough to take every step).

    Args:
        model: An :class:`~hyperadalora.AdaptedModel`, whose DyLoRA rank generator is included.

    Returns:
        A snapshot for :func:`capture_rng` / :func:`save_training_checkpoint`.
    """
    cuda = (torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    try:
        import numpy as np

        numpy_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        numpy_state = None
    return {"torch_cpu": torch.get_rng_state(), "torch_cuda": cuda, "python": random.getstate(),
            "numpy": numpy_state, "dylora": model.rng_state() if model is not None else None}


def capture_rng(model=None, snapshot: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global generators' states (and a DyLoRA model's rank sampler) as tensors + JSON values.

    Args:
        model: An :class:`~hyperadalora.AdaptedModel`, whose DyLoRA rank generator is included.
        snapshot: A :func:`rng_snapshot` taken earlier (default: the states now).

    Returns:
        ``(tensors, meta)``: ``torch_cpu``, ``torch_cuda_<i>`` (when CUDA is initialised),
        ``python_mt``, ``numpy_mt`` and ``dylora`` tensors; the scalar parts of Python's and
        NumPy's states in ``meta``.
    """
    snap = snapshot if snapshot is not None else rng_snapshot(model)
    tensors = {"torch_cpu": snap["torch_cpu"]}
    for i, state in enumerate(snap["torch_cuda"]):
        tensors[f"torch_cuda_{i}"] = state
    version, mt, gauss = snap["python"]
    tensors["python_mt"] = torch.tensor(mt, dtype=torch.int64)
    meta: dict[str, Any] = {"python_version": version, "python_gauss_next": gauss}
    if snap["numpy"] is not None:
        name, key, pos, has_gauss, cached = snap["numpy"]
        tensors["numpy_mt"] = torch.from_numpy(key.astype("int64"))
        meta["numpy"] = {"name": name, "pos": int(pos), "has_gauss": int(has_gauss),
                         "cached_gaussian": float(cached)}
    if snap["dylora"] is not None:
        tensors["dylora"] = snap["dylora"]
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], model=None) -> None:
    """Sets the generators back to what :func:`capture_rng` recorded.

    CUDA states are restored when CUDA is available with the same number of devices; otherwise a
    warning says that GPU randomness (dropout on the GPU) will differ from the original run.
    """
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            print(f"hyperadalora: warning: the checkpoint holds {len(cuda)} CUDA generator state(s) but "
                  f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s) are visible; "
                  "GPU random numbers will differ from the original run", file=sys.stderr, flush=True)
    random.setstate((meta["python_version"], tuple(int(v) for v in tensors["python_mt"].tolist()),
                     meta["python_gauss_next"]))
    if "numpy_mt" in tensors and "numpy" in meta:
        import numpy as np

        n = meta["numpy"]
        np.random.set_state((n["name"], tensors["numpy_mt"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if model is not None and "dylora" in tensors:
        model.set_rng_state(tensors["dylora"])


__all__ = ["capture_rng", "restore_rng", "rng_snapshot"]
