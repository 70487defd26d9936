"""Starting an adapter from another run's (``AdapterConfig.init_from``): transfer across tasks.

What transfers is what was *learned about adapting this base model*: the trained factors of the
``direct`` source, or the hypernetworks of the ``hyper`` source together with the factor states
they read and write (HyperFormer / Text-to-LoRA style amortisation, issue 20). What belongs to
the source run's own task or schedule does not: the task heads (``modules_to_save``), the
allocator state (AdaLoRA's scores and masks: a new task is scored afresh, so masks start full)
and the method's buffers (e.g. ``rank_mask``, PiSSA's initial factors).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """The adapter folder ``path`` names: itself, or ``path/adapter`` for a run folder.

    Raises:
        FileNotFoundError: Neither holds an ``adapter_config.json``.
    """
    folder = Path(path)
    for candidate in (folder, folder / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"init_from={str(path)!r} is neither a saved adapter nor a run folder with adapter/ "
                            f"(no {CONFIG_NAME} in it or in its adapter/ folder); train the source run first, or "
                            "point init_from at its folder")


def transferable_tensors(model) -> dict[str, torch.Tensor]:
    """The live tensors of ``model`` that :func:`initialize_from` overwrites, keyed as saved on disk."""
    out: dict[str, torch.Tensor] = dict(model.source.state_tensors())
    for name, layer in model.adapted_layers.items():
        for key, t in model.method.state_tensors(layer).items():
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:  # trained (DoRA's magnitude), not buffers
                out[f"{name}.{key}"] = t
    return out


def _is_task_table(key: str) -> bool:
    """Whether ``key`` is a hypernetwork's task-embedding table (``HyperConfig.task_embeddings``)."""
    return key.startswith("hyper.") and key.endswith(".task_emb")


@torch.no_grad()
def initialize_from(model, path: str | os.PathLike) -> list[str]:
    """Copies the transferable tensors of the adapter at ``path`` into the freshly wrapped ``model``.

    Returns:
        The keys copied.

    Raises:
        FileNotFoundError: ``path`` holds no adapter.
        ValueError: The saved adapter has another method or source, or a tensor is missing or
            has another shape (another base model, rank or hypernetwork configuration). A
            task-embedding table of another number of tasks is not an error: every task here
            starts at the mean of the saved tasks' embeddings (multi-task hypernetworks started on
            a new task).
    """
    folder = resolve_adapter_dir(path)
    saved, _ = read_adapter_config(folder)
    ours = model.adapter_config
    if (saved.method, saved.source) != (ours.method, ours.source):
        raise ValueError(f"init_from={str(path)!r} holds a method={saved.method!r} adapter with source={saved.source!r}; this "
                         f"run is method={ours.method!r} with source={ours.source!r}: start from a run of the same method and source")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    targets = transferable_tensors(model)
    untaken = sorted(k for k in tensors if _is_task_table(k) and k not in targets)
    if untaken:
        count = tensors[untaken[0]].shape[0]
        raise ValueError(f"init_from={str(path)!r} holds hypernetworks trained with {count} task "
                         "embeddings (hyperadalora multitask); without one they would generate for no task: set "
                         "adapter.hyper.task_embeddings=1 (a new task starts at the mean of theirs)")
    for key, target in targets.items():
        if key not in tensors:
            raise ValueError(f"init_from: {folder / WEIGHTS_NAME} has no tensor {key!r} (the source run adapted "
                             "other modules or used another hypernetwork configuration)")
        if _is_task_table(key) and tensors[key].shape[1:] == target.shape[1:]:
            # A new task's embedding starts at the mean of the source tasks' (every target row alike).
            tensors[key] = tensors[key].mean(dim=0, keepdim=True).expand_as(target)
        if tensors[key].shape != target.shape:
            raise ValueError(f"init_from: tensor {key!r} is {tuple(tensors[key].shape)} in {folder} and "
                             f"{tuple(target.shape)} here: use the same base model, ranks and hypernetwork settings")
    for key, target in targets.items():
        target.data.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
    model.source.invalidate()
    return sorted(targets)


__all__ = ["initialize_from", "resolve_adapter_dir", "transferable_tensors"]
