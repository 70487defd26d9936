"""Data-parallel ``AdaptedSFTTrainer`` run, for tests/unit/test_trl_integration.py.

Run by ``torchrun --nproc_per_node 2 trl_ddp_worker.py OUT_DIR`` (gloo, CPU): each rank trains the
AdaLoRA hyper-source run of the test on its half of every global batch (``Trainer`` hands rank
``k`` micro-batch ``2 s + k`` of the sequential data at step ``s``, so the two halves are the
one-process batch) and writes ``OUT_DIR/rank<k>.json`` (losses averaged over the ranks, rank
pattern, budget, state checksums) and ``OUT_DIR/rank<k>.safetensors`` (trainable parameters).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

import test_trl_integration as t  # noqa: E402
from hyperadalora.integrations.distributed import state_checksums  # noqa: E402


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))  # a crashed peer fails fast
    rank, world = dist.get_rank(), dist.get_world_size()
    work = Path(out_dir) / f"rank{rank}"
    config = t.run_config(work, "adalora", "hyper")
    losses, model, _ = t.sft_run(work, config, per_device_train_batch_size=config.batch_size // world)
    mean = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(mean)
    mean /= world
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              str(Path(out_dir) / f"rank{rank}.safetensors"))
    result = {"world": world, "losses": mean.tolist(), "rank_pattern": model.rank_pattern,
              "budget": model.allocator.budget, "steps_taken": model.steps_taken,
              "checksums": state_checksums(model)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
