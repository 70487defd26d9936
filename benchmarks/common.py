"""Shared helpers for the benchmarks: machine facts, versions, result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
MINILM_ENCODER_LINEARS = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                          r"|intermediate\.dense|output\.dense)")


def machine() -> dict:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def versions() -> dict:
    """Library versions that matter for the figures."""
    import transformers

    import hyperadalora

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "hyperadalora": hyperadalora.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def write_results(name: str, result: dict, table: list[str]) -> Path:
    """Writes ``results/<name>.json`` and ``results/<name>.md``; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    return path
