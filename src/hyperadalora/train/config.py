"""The run configuration: one frozen dataclass, validated on construction.

A run is described by :class:`RunConfig`; the adapter itself by the nested
:class:`~hyperadalora.AdapterConfig` (not duplicated here). Configs come from a YAML preset
(``configs/*.yaml``, :mod:`.presets`) and ``key=value`` overrides (:mod:`.overrides`), dotted for
nested fields::

    cfg = load_run_config("sst2_minilm_adalora", ["steps=50", "adapter.allocator.target_r=4"])

For AdaLoRA the allocator's schedule follows the run: ``adapter.allocator.total_step`` is the
run's ``steps`` (set it only to the same value), ``tinit`` and ``tfinal`` default to 10% and
20% of ``steps``, and a missing ``allocator`` section is created. The resolved config (every
value explicit) is what a run directory's ``config.yaml`` holds; it loads back unchanged.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import METHODS, AdapterConfig, AllocatorConfig, JsonConfig, check_choice, check_float, check_int
from ..allocation import POLICY_REGISTRY
from ..methods import METHOD_REGISTRY
from .overrides import coerce
from ..quant import PRECISIONS, QUANTIZE_CHOICES
from ..tasks import SPECS
from .reporting.registry import REPORT_TO

#: ``RunConfig.distributed`` choices (see :mod:`.parallel`).
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda")

TASK_NAMES = tuple(SPECS)
EXPORTS = ("none", "peft", "merged")


@dataclass(frozen=True)
class RunConfig(JsonConfig):
    """One training / evaluation run.

    Attributes:
        task: What to train and evaluate: a GLUE task (``rte``, ``wnli``, ``sst2``, ``mrpc``,
            ``cola``; dev accuracy, MCC for CoLA, F1 for MRPC), ``alpaca`` (instruction tuning,
            BLEU-4 / ROUGE-1 of greedy generations), ``gsm8k`` (exact match of the final number),
            ``instruct`` (any instruction data set, see ``data_source``), ``humaneval``
            (pass@1 in a sandbox; evaluation only) or ``classify`` (a sequence classifier on
            ``data_source``'s ``text`` / ``text_pair`` / ``label`` columns, any labels; accuracy
            and macro F1).
        model: ``minilm``, ``mpnet``, ``smollm2`` (the packaged real checkpoints), a local
            Hugging Face model folder, or a hub id ``owner/name`` when online.
        data_dir: Data directory holding ``rte/``, ``sst2/``, ``alpaca/``, ... (as
            ``../shared/data``); ``null``: ``$HYPERADALORA_DATA_DIR``, else the Hugging Face hub
            through ``datasets`` when online.
        data_source: Your own rows instead of the task's data set (needed by ``instruct`` and
            ``classify``): a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a folder
            (``save_to_disk``, or ``train.<ext>`` / ``test.<ext>`` files), or a hub data set id
            when online; read through ``datasets``. Columns: ``instruction`` / ``input`` /
            ``output`` (instruction tasks), ``text`` / ``text_pair`` / ``label`` (``classify``),
            the GLUE hub's (GLUE tasks).
        eval_data_source: The held-out rows (a file, folder or hub id); ``null``: the eval split
            of a folder or hub data set, or, for a single file, its last ``eval_rows`` rows (10%
            if ``eval_rows`` is null), which are then not trained on.
        labels: ``classify`` only: the head's classes in order; ``null``: the training split's
            labels, sorted (numerically when all are integers), recorded here by the run.
        output_dir: Folder in which the run directory is created.
        run_name: Name of the run directory; ``null``: ``<task>-<model>-<method>[-hyper]-<time>``.
        seed: Seed of the adapter initialisation, the data order and dropout.
        steps: Optimizer steps of the run (AdaLoRA's budget schedule is defined over them).
        batch_size: Examples per micro-batch (over all processes when several share the run).
        grad_accum: Micro-batches per optimizer step (effective batch: ``batch_size * grad_accum``).
        max_length: Tokens per training example (longer ones are truncated).
        train_rows: Use only the first N training rows (``null``: all).
        lr: Peak learning rate of AdamW (hypernetworks: ``adapter.hyper.lr`` when set).
        weight_decay: AdamW weight decay.
        warmup_steps: Steps of linear warm-up up to ``lr``; ``null``: ``warmup_ratio * steps``.
        warmup_ratio: Warm-up as a fraction of ``steps`` (used when ``warmup_steps`` is null).
        min_lr_ratio: The cosine decay ends at ``min_lr_ratio * lr``.
        max_grad_norm: Clip the gradient's global L2 norm to this; 0 turns clipping off.
        eval_every: Evaluate (and save the adapter) every N optimizer steps; 0: only at the end.
        eval_loss_every: Every N optimizer steps and after the last, the held-out loss: the
            teacher-forced task loss (no regulariser) of the evaluation rows, as the training loss
            is taken (a classifier's labels, an instruction task's response tokens), recorded as
            ``eval_loss`` in that step's ``log.jsonl`` row and drawn in ``loss.png``. Cheap beside
            generation, and free of the batch-to-batch noise of the training loss; 0: off.
        save_every: Write a training checkpoint (``checkpoints/step-<N>/``: adapter, optimizer,
            scheduler, RNG and data position, for ``hyperadalora train --resume``) every N
            optimizer steps; 0: at every evaluation (``eval_every``). A checkpoint is also
            written after the last step and on Ctrl-C.
        keep_checkpoints: How many training checkpoints to keep (the newest; older ones are
            deleted once a newer one is complete).
        eval_rows: Evaluate on the first N held-out rows (``null``: all of them).
        eval_batch_size: Examples per evaluation / generation batch.
        max_new_tokens: Greedy generation length for the instruction, GSM8K and HumanEval tasks.
        sandbox_timeout_s: HumanEval: seconds allowed per problem's tests.
        sandbox_memory_mb: HumanEval: memory limit of each sandboxed test process.
        sandbox_workers: HumanEval: test processes run in parallel.
        threads: torch CPU threads (``null``: torch's default).
        progress: Show a progress bar with loss and ETA on the terminal.
        precision: ``fp32``, ``bf16`` or ``fp16``: the base model's weights are loaded in this
            dtype and the forward runs under ``torch.autocast`` of it; adapter factors,
            hypernetworks and optimizer state stay float32 (master weights). See docs/scale.md.
        quantize: ``null``, ``4bit`` (NF4 + double quantisation, QLoRA), ``nf4``, ``fp4`` or
            ``8bit``: load the base through bitsandbytes (``pip install hyperadalora[quant]``).
        gradient_checkpointing: Recompute the base model's activations in the backward
            (transformers' non-reentrant activation checkpointing): less memory, more compute.
        compile: ``torch.compile`` the base model (the adapted layers included) before training.
        loss_chunk_tokens: Causal-LM tasks: ``> 0`` takes the training loss that many positions
            at a time, each chunk's logits recomputed in the backward, so the whole
            ``(tokens, vocabulary)`` logits are never held (:mod:`hyperadalora.chunked_loss`);
            ``0``: the model's own loss. Same loss and gradients, less memory, one more output
            projection per step.
        device: Where one process trains: ``auto`` (the GPU when torch sees one, as the Hugging
            Face Trainer; else the CPU), ``cpu`` or ``cuda`` (refused when there is none). Under
            ``torchrun`` each process takes its ``LOCAL_RANK``'s GPU.
        distributed: How the run spreads over processes: ``auto`` (one process: ``none``; under
            ``torchrun``: ``ddp``; under ``accelerate launch`` with an FSDP config: ``fsdp``),
            ``none``, ``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2, every parameter
            sharded). ``batch_size`` stays the global micro-batch, split evenly over the
            processes; rank 0 alone writes the run directory. See docs/distributed.md.
        report_to: Experiment tracker that also receives the log rows, evaluations and a per-module
            rank image at every evaluation: ``none``, ``tensorboard`` (``RUN_DIR/tensorboard``),
            ``wandb`` (offline, ``RUN_DIR/wandb``; ``$WANDB_MODE`` overrides) or ``mlflow``
            (``RUN_DIR/mlflow.db``; ``$MLFLOW_TRACKING_URI`` overrides). Needs
            ``pip install hyperadalora[<name>]``; ``log.jsonl`` stays the source of truth.
        export: What a completed run also writes beside ``adapter/``: ``none``, ``peft`` (a
            standard peft LoRA adapter in ``RUN_DIR/peft_adapter``, as ``hyperadalora export RUN
            --out`` writes it) or ``merged`` (a transformers model folder with the adapter folded
            in and the tokenizer, ``RUN_DIR/merged``; not on a quantised base).
        adapter: The adapter (:class:`~hyperadalora.AdapterConfig`): ``adapter.method``,
            ``adapter.r``, ``adapter.allocator.*``, ``adapter.hyper.*``, ...
    """

    task: str = "rte"
    model: str = "minilm"
    data_dir: str | None = None
    data_source: str | None = None
    eval_data_source: str | None = None
    labels: tuple[str, ...] | None = None
    output_dir: str = "runs"
    run_name: str | None = None
    seed: int = 0
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 128
    train_rows: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.06
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 0
    eval_loss_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_rows: int | None = None
    eval_batch_size: int = 32
    max_new_tokens: int = 128
    sandbox_timeout_s: float = 10.0
    sandbox_memory_mb: int = 1024
    sandbox_workers: int = 2
    threads: int | None = None
    progress: bool = True
    precision: str = "fp32"
    quantize: str | None = None
    gradient_checkpointing: bool = False
    compile: bool = False
    loss_chunk_tokens: int = 0
    device: str = "auto"
    distributed: str = "auto"
    report_to: str = "none"
    export: str = "none"
    adapter: AdapterConfig | None = None

    def __post_init__(self) -> None:
        owner = "RunConfig"
        check_choice(owner, "task", self.task, TASK_NAMES)
        for name in ("model", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{owner}.{name} must be a non-empty string, got {value!r}")
        for name in ("data_dir", "data_source", "eval_data_source", "run_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{owner}.{name} must be a non-empty string or null, got {value!r}")
        if self.run_name is not None and ("/" in self.run_name or self.run_name in (".", "..")):
            raise ValueError(f"{owner}.run_name={self.run_name!r} must be a plain folder name (no '/')")
        check_int(owner, "seed", self.seed, 0)
        for name in ("steps", "batch_size", "grad_accum", "max_length", "eval_batch_size", "max_new_tokens",
                     "sandbox_memory_mb", "sandbox_workers"):
            check_int(owner, name, getattr(self, name), 1)
        check_int(owner, "eval_every", self.eval_every, 0)
        check_int(owner, "eval_loss_every", self.eval_loss_every, 0)
        check_int(owner, "save_every", self.save_every, 0)
        check_int(owner, "keep_checkpoints", self.keep_checkpoints, 1)
        check_int(owner, "loss_chunk_tokens", self.loss_chunk_tokens, 0)
        for name in ("train_rows", "eval_rows", "threads"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name), 1)
        if self.warmup_steps is not None:
            check_int(owner, "warmup_steps", self.warmup_steps, 0)
        check_float(owner, "lr", self.lr, 0.0, low_open=True)
        check_float(owner, "weight_decay", self.weight_decay, 0.0)
        check_float(owner, "warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_float(owner, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_float(owner, "max_grad_norm", self.max_grad_norm, 0.0)
        check_float(owner, "sandbox_timeout_s", self.sandbox_timeout_s, 0.0, low_open=True)
        for name in ("progress", "gradient_checkpointing", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{owner}.{name} must be a bool, got {getattr(self, name)!r}")
        check_choice(owner, "precision", self.precision, tuple(PRECISIONS))
        check_choice(owner, "report_to", self.report_to, REPORT_TO)
        check_choice(owner, "distributed", self.distributed, DISTRIBUTED)
        check_choice(owner, "device", self.device, DEVICES)
        check_choice(owner, "export", self.export, EXPORTS)
        if self.export == "merged" and self.quantize is not None:
            raise ValueError(f"{owner}: export=merged on a quantize={self.quantize} base would write dequantised "
                             "weights; use export=peft, or afterwards `hyperadalora export RUN --merged OUT "
                             "--dequantize`")
        if self.quantize is not None:
            check_choice(owner, "quantize", self.quantize, QUANTIZE_CHOICES)
        self._check_data()
        object.__setattr__(self, "adapter", resolve_adapter(self.adapter, self.steps))

    def _check_data(self) -> None:
        owner, spec = "RunConfig", SPECS[self.task]
        if self.loss_chunk_tokens and spec.model_task != "causal-lm":
            raise ValueError(f"{owner}.loss_chunk_tokens={self.loss_chunk_tokens} applies to causal-LM tasks (its "
                             f"logits span the vocabulary); task={self.task!r} is {spec.model_task}: set it to 0")
        if spec.needs_source and self.data_source is None:
            raise ValueError(f"{owner}: task={self.task!r} needs data_source=<a .jsonl/.json/.csv/.parquet file, a "
                             "folder or a hub data set id>")
        if self.labels is None:
            return
        if spec.model_task != "sequence-classification" or spec.num_labels:
            raise ValueError(f"{owner}.labels is only used with task='classify' (its classes come from the data), "
                             f"not {self.task!r}; drop it")
        labels = tuple(str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in self.labels)
        if len(labels) < 2 or not all(isinstance(v, str) and v for v in labels) or len(set(labels)) != len(labels):
            raise ValueError(f"{owner}.labels must be at least two distinct non-empty label names, got {self.labels!r}")
        object.__setattr__(self, "labels", labels)

    @property
    def effective_warmup_steps(self) -> int:
        """Warm-up steps actually used (``warmup_steps``, else ``warmup_ratio * steps``)."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return int(math.floor(self.warmup_ratio * self.steps))

    def default_run_name(self, stamp: str) -> str:
        """``<task>-<model>-<method>[-hyper]-<stamp>`` (the model's folder name for paths)."""
        model = Path(self.model).name if ("/" in self.model or Path(self.model).exists()) else self.model
        model = re.sub(r"[^A-Za-z0-9_.-]+", "_", model) or "model"
        source = "-hyper" if self.adapter.source == "hyper" else ""
        return f"{self.task}-{model}-{self.adapter.method}{source}-{stamp}"

    def to_yaml(self, path: str | Path | None = None) -> str:
        """Serialises to YAML (every value explicit); also writes ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> RunConfig:
        """Parses YAML text, or reads it from a file path (values coerced by the fields' types)."""
        text = str(text_or_path)
        if "\n" not in text and Path(text).is_file():
            text = Path(text).read_text()
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"RunConfig YAML must hold a mapping of RunConfig fields, got {type(data).__name__}")
        return cls.from_dict(coerce(cls, data, ""))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated again)."""
        data = self.to_dict()
        data.update({k: (v.to_dict() if isinstance(v, JsonConfig) else v) for k, v in changes.items()})
        return RunConfig.from_dict(data)


def resolve_adapter(adapter: AdapterConfig | dict | None, steps: int) -> AdapterConfig:
    """Builds the run's :class:`AdapterConfig`, tying AdaLoRA's allocator schedule to ``steps``."""
    if isinstance(adapter, AdapterConfig):
        if adapter.allocator is not None and adapter.allocator.total_step != steps:
            raise ValueError(f"adapter.allocator.total_step ({adapter.allocator.total_step}) must equal the run's "
                             f"steps ({steps}): AdaLoRA's budget schedule is defined over the run's optimizer steps")
        return adapter
    if adapter is None:
        adapter = {}
    if not isinstance(adapter, dict):
        raise TypeError(f"RunConfig.adapter must be a mapping of AdapterConfig fields, got {type(adapter).__name__}")
    data = dict(adapter)
    method = data.get("method", AdapterConfig.method)
    check_choice("AdapterConfig", "method", method, METHODS)
    alloc = data.get("allocator")
    if METHOD_REGISTRY[method].uses_allocator:
        if isinstance(alloc, AllocatorConfig):
            alloc = alloc.to_dict()
        if alloc is not None and not isinstance(alloc, dict):
            raise TypeError(f"adapter.allocator must be a mapping of AllocatorConfig fields, got {alloc!r}")
        alloc = dict(alloc or {})
        if alloc.get("total_step") is None:
            alloc["total_step"] = steps
        elif alloc["total_step"] != steps:
            raise ValueError(f"adapter.allocator.total_step ({alloc['total_step']}) must equal the run's steps "
                             f"({steps}); leave it out and it follows steps")
        alloc.setdefault("tinit", steps // 10)
        alloc.setdefault("tfinal", steps // 5)
        data["allocator"] = alloc
    elif alloc is not None and not _decides_before_wrap(alloc):
        allocating = ", ".join(n for n, m in METHOD_REGISTRY.items() if m.uses_allocator)
        raise ValueError(f"adapter.allocator is only used with adapter.method={allocating} (or, for every method, "
                         f"with adapter.allocator.policy=sensitivity), not {method!r}; drop it (override "
                         "adapter.allocator=null)")
    return AdapterConfig.from_dict(data)


def _decides_before_wrap(alloc: AllocatorConfig | dict) -> bool:
    """Whether an allocator section names a policy that decides ranks before the wrap (any method)."""
    policy = alloc.policy if isinstance(alloc, AllocatorConfig) else alloc.get("policy", AllocatorConfig.policy)
    return policy in POLICY_REGISTRY and POLICY_REGISTRY[policy].decides_before_wrap


__all__ = ["RunConfig", "TASK_NAMES", "resolve_adapter"]
