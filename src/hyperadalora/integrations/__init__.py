"""Integrations with the training ecosystem.

* :mod:`hyperadalora.integrations.trainer`: Hugging Face ``Trainer`` (a callback that keeps the
  training contract, and :class:`~hyperadalora.integrations.trainer.AdaptedTrainer`, a small
  ``Trainer`` subclass that also gets gradient clipping, the regulariser weight, parameter groups
  and checkpoints right).
* :mod:`hyperadalora.integrations.sft`: TRL ``SFTTrainer``
  (:class:`~hyperadalora.integrations.sft.AdaptedSFTTrainer`: the same contract, with SFTTrainer's
  fused LM head and token-averaged loss; needs ``pip install hyperadalora[trl]``).
* :mod:`hyperadalora.integrations.distributed`: multi-process data parallel (``torch.distributed``
  / DDP): keeps allocator decisions and hypernetwork states identical on every rank and checks it;
  and fully sharded training (FSDP2, ``shard``; implemented in
  :mod:`hyperadalora.integrations.fsdp`), with whole-adapter saving and exact resuming.

The submodules are imported on demand (``import hyperadalora.integrations.trainer``), so that
importing one does not pull in the other's dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdaptedModelCallback": "trainer",
    "AdaptedTrainer": "trainer",
    "AdaptedTrainerMixin": "trainer",
    "AdaptedSFTTrainer": "sft",
    "prepare_ddp": "distributed",
    "wrap_ddp": "distributed",
    "sync_generated_gradients": "distributed",
    "assert_in_sync": "distributed",
    "state_checksums": "distributed",
    "shard": "fsdp",
    "save_checkpoint": "fsdp",
    "load_checkpoint": "fsdp",
    "clip_grad_norm_": "fsdp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
