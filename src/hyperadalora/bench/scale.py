"""Training at scale, measured the same way on any device (issue 23, items 6 and 7).

One *configuration* is a model, a :class:`Setting` (precision, quantised base, activation
checkpointing) and a variant: our LoRA, AdaLoRA and HyperAdaLoRA, or peft's LoRA and AdaLoRA
(:data:`VARIANTS`), all on the same base, target modules (``all-linear``), rank and optimizer
(AdamW over float32 master weights; one step is :func:`hyperadalora.train.step.optimizer_step`
with the setting's precision, for peft's models too). :func:`measure_config` loads, adapts and
trains one configuration and reports its peak memory above what the process held before the
model was loaded:

* on a GPU, ``torch.cuda.max_memory_allocated`` (tensors only);
* on the CPU, the process's peak resident set (``VmHWM`` of ``/proc/self/status``, reset with
  ``/proc/self/clear_refs`` once the model is built, so the load's transient is not counted):
  torch keeps no allocation statistics for CPU tensors, and the resident set is what a user's
  machine must hold. Run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``
  (:func:`measure_in_subprocess`) so freed tensors leave the resident set.

Used by ``benchmarks/gpu/scale_gpu.py`` (GPU) and ``hyperadalora bench scale_cpu`` (this CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant import PRECISIONS, QUANTIZE_CHOICES, precision_dtype, upcast_trainable_

VARIANTS = ("lora", "adalora", "hyperadalora", "peft-lora", "peft-adalora")
#: The peft variant each of ours is compared with (HyperAdaLoRA is an AdaLoRA).
PEFT_TWIN = {"lora": "peft-lora", "adalora": "peft-adalora", "hyperadalora": "peft-adalora"}
MODELS = {"smollm2": "causal-lm", "mpnet": "sequence-classification"}


@dataclass(frozen=True)
class Setting:
    """How the base model is held and run.

    Attributes:
        name: Its label in the results.
        precision: ``fp32`` / ``bf16`` / ``fp16``: the base weights' dtype (of a quantised base: the
            compute dtype) and the forward's autocast.
        quantize: ``None`` or a bitsandbytes choice (``4bit``: NF4 + double quantisation, QLoRA).
        checkpointing: Activation checkpointing of the base model (non-reentrant).
        loss_chunk_tokens: ``> 0``: our models take the causal-LM loss that many positions at a
            time (:mod:`hyperadalora.chunked_loss`); peft's have no such loss and are refused.
    """

    name: str
    precision: str = "fp32"
    quantize: str | None = None
    checkpointing: bool = False
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"Setting.precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"Setting.quantize {self.quantize!r}: choose None or one of {', '.join(QUANTIZE_CHOICES)}")


#: Positions per chunk of the ``_chunk`` settings' loss: 256 x 49,152 fp32 logits are 48 MiB at a time
#: (SmolLM2), against 384 MiB for the whole 4 x 512 batch.
CHUNK_TOKENS = 256
# "4bit" computes in bf16 (QLoRA's recipe, for GPUs); "4bit_fp32" computes in fp32: on a CPU without
# bf16 instructions (AVX2 only) a bf16 matmul costs ~17x an fp32 one (BENCHMARKS.md, issue 23 item 6).
SETTINGS = {s.name: s for s in (Setting("fp32"), Setting("bf16", "bf16"), Setting("4bit", "bf16", "4bit"),
                                Setting("4bit_ckpt", "bf16", "4bit", checkpointing=True),
                                Setting("4bit_fp32", "fp32", "4bit"),
                                Setting("4bit_fp32_ckpt", "fp32", "4bit", checkpointing=True),
                                Setting("fp32_chunk", loss_chunk_tokens=CHUNK_TOKENS),
                                Setting("4bit_ckpt_chunk", "bf16", "4bit", True, CHUNK_TOKENS),
                                Setting("4bit_fp32_ckpt_chunk", "fp32", "4bit", True, CHUNK_TOKENS))}


def tiny_model(name: str, setting: Setting, folder: Path, device: torch.device | None = None):
    """A tiny random stand-in of ``name`` (smoke runs), saved and reloaded like a real checkpoint
    (a quantised one straight onto ``device``, default the CPU)."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from ..quant import bnb_config

    if name == "smollm2":
        cls, cfg = LlamaForCausalLM, LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2,
                                                  intermediate_size=96, tie_word_embeddings=False)
    else:
        cls, cfg = BertForSequenceClassification, BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, intermediate_size=96)
    if not (folder / name / "config.json").is_file():
        cls(cfg).save_pretrained(folder / name)
    dtype = precision_dtype(setting.precision)
    kwargs = ({"quantization_config": bnb_config(setting.quantize, dtype),
               "device_map": quantized_device_map(device or torch.device("cpu"))} if setting.quantize
              else {"dtype": dtype})
    return cls.from_pretrained(folder / name, **kwargs)


def quantized_device_map(device: torch.device) -> str:
    """The ``device_map`` that loads a bitsandbytes model onto ``device`` (it quantises while loading)."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def random_weights_folder(architecture: Path, task: str, out: Path, seed: int = 0) -> Path:
    """A model folder with ``architecture``'s config and tokenizer files and random weights.

    For machines that cannot receive the packaged checkpoints (a lent GPU gets at most 64 MiB of
    files): throughput and memory depend on the architecture, not on the weights' values.

    Args:
        architecture: A folder with ``config.json`` and the tokenizer files (its weights, if any,
            are not read).
        task: A :data:`MODELS` task (``causal-lm`` or ``sequence-classification``).
        out: Where the folder is written (reused when it already holds ``model.safetensors``).
        seed: Seeds the random initialisation.

    Returns:
        ``out``, loadable with :func:`hyperadalora.models.load_model`.

    Raises:
        FileNotFoundError: ``architecture`` has no ``config.json``.
    """
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if not (Path(architecture) / "config.json").is_file():
        raise FileNotFoundError(f"{architecture} has no config.json: copy the model's config and tokenizer files there")
    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(architecture).iterdir():
            if f.is_file() and f.suffix not in (".safetensors", ".bin", ".gguf", ".pt"):
                shutil.copy(f, out / f.name)
        cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        torch.manual_seed(seed)
        cls.from_config(AutoConfig.from_pretrained(architecture)).save_pretrained(out)
    return out


def load_base(name: str, setting: Setting, device: torch.device, tiny_folder: Path | None = None,
              model_folder: Path | None = None):
    """The base model of ``name`` held as ``setting`` says, on ``device``.

    Args:
        tiny_folder: Build a tiny stand-in there (:func:`tiny_model`) instead.
        model_folder: Load this folder (e.g. a :func:`random_weights_folder`) instead of the
            packaged checkpoint of ``name``.
    """
    if tiny_folder is not None:
        model = tiny_model(name, setting, tiny_folder, device)
    else:
        from ..models import load_model

        model, _ = load_model(str(model_folder) if model_folder else name, task=MODELS[name],
                              dtype=precision_dtype(setting.precision), quantize=setting.quantize,
                              device=quantized_device_map(device) if setting.quantize else None)
    model.config.use_cache = False  # training: no key / value cache
    if device.type == "cpu":  # every setting (the committed measurements did so); see models.own_memory_
        from ..models import own_memory_

        own_memory_(model)
    return model if setting.quantize else model.to(device)


def adapt(model, variant: str, task: str, total_steps: int, r: int):
    """``model`` adapted as ``variant``: AdaLoRA prunes ``r`` -> ``r // 2`` over ``total_steps``."""
    import hyperadalora as ha

    from .experiments.step_model import PeftAdaLoraSteps

    saved = ["classifier"] if task == "sequence-classification" else []
    if variant.startswith("peft-"):
        import peft

        common = dict(target_modules="all-linear", modules_to_save=saved or None, lora_dropout=0.0,
                      task_type="SEQ_CLS" if saved else "CAUSAL_LM")
        if variant == "peft-adalora":
            cfg = peft.AdaLoraConfig(init_r=r, target_r=r // 2, total_step=total_steps, tinit=1, tfinal=1,
                                     lora_alpha=2 * r, **common)
            return PeftAdaLoraSteps(peft.get_peft_model(model, cfg))  # its after_step allocates
        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, **common))
    method = "lora" if variant == "lora" else "adalora"
    alloc = ha.AllocatorConfig(total_step=total_steps, target_r=r // 2, tinit=1, tfinal=1) if method == "adalora" else None
    cfg = ha.AdapterConfig(method=method, source="hyper" if variant == "hyperadalora" else "direct", r=r,
                           lora_alpha=2 * r, target_modules="all-linear", modules_to_save=saved, allocator=alloc)
    return ha.wrap(model, cfg)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Hugging Face's non-reentrant activation checkpointing on the transformers model inside ``model``."""
    from transformers import PreTrainedModel

    from ..train.build import enable_activation_checkpointing

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None:
        raise ValueError(f"{type(model).__name__} holds no transformers model to checkpoint")
    enable_activation_checkpointing(inner)


def make_trainer(model: torch.nn.Module, setting: Setting, lr: float = 1e-4) -> Callable[[dict], float]:
    """``step(batch) -> loss``: one AdamW step of the library's :func:`optimizer_step` (no clipping)."""
    from ..train.step import optimizer_step

    upcast_trainable_(model)  # float32 master weights, for peft's models as for ours
    if setting.checkpointing:
        enable_checkpointing(model)
    if setting.loss_chunk_tokens:
        enable = getattr(model, "enable_chunked_loss", None)
        if enable is None:
            raise ValueError(f"setting {setting.name}: {type(model).__name__} has no chunked loss (peft computes the "
                             "whole logits); measure peft's twin at the setting without '_chunk'")
        enable(setting.loss_chunk_tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    counter = [0]

    def step(batch: dict) -> float:
        stats = optimizer_step(model, opt, [batch], step_index=counter[0], max_grad_norm=0.0,
                               precision=setting.precision)
        counter[0] += 1
        return float(stats.loss)

    return step


def build(name: str, setting: Setting, variant: str, total_steps: int, r: int, device: torch.device,
          lr: float = 1e-4, tiny_folder: Path | None = None, model_folder: Path | None = None
          ) -> Callable[[dict], float]:
    """:func:`make_trainer` of a freshly loaded (see :func:`load_base`) and adapted configuration."""
    model = adapt(load_base(name, setting, device, tiny_folder, model_folder), variant, MODELS[name], total_steps, r)
    return make_trainer(model, setting, lr)


def random_batch(task: str, size: int, seq: int, vocab: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens (labels: the tokens for a causal LM, else random classes)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, seq), generator=g)
    labels = ids.clone() if task == "causal-lm" else torch.randint(0, 2, (size,), generator=g)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                         "labels": labels}.items()}


def alpaca_batches(tokenizer, n: int, size: int, seq: int, data_dir: str | os.PathLike | None) -> list[dict]:
    """``n`` causal-LM batches of ``size`` rows of exactly ``seq`` tokens: Alpaca examples, packed
    (prompt and response, EOS between), so every batch is full and alike in cost."""
    from ..data.instruct import format_prompt, read_instruction_data

    need, ids = n * size * seq, []
    for ex in read_instruction_data("alpaca", "train", data_dir):
        ids += tokenizer(format_prompt(ex, tokenizer) + ex.output)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"Alpaca holds {len(ids)} tokens, fewer than the {need} of {n} batches of {size} x {seq}")
    rows = torch.tensor(ids[:need]).view(n, size, seq)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]


def short_batch(batch: dict, tokens: int = 8) -> dict:
    """The first row of ``batch``, cut to ``tokens`` tokens (a cheap warm-up step)."""
    return {k: v[:1, :tokens] if v.dim() == 2 else v[:1] for k, v in batch.items()}


def current_memory(device: torch.device) -> int:
    """Bytes held now: allocated GPU tensors, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status_kib("VmRSS:") * 1024


def reset_peak(device: torch.device) -> None:
    """Starts a new peak-memory mark (CPU: the kernel's peak RSS, via ``/proc/self/clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since :func:`reset_peak` (GPU: allocated tensors; CPU: resident set)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM:") * 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1])


def measure_config(name: str, setting: Setting, variant: str, batches: list[dict], *, steps: int, warmup: int,
                   total_steps: int, r: int, device: torch.device, tiny_folder: Path | None = None,
                   warm_batch: dict | None = None, model_folder: Path | None = None) -> dict:
    """Loads, adapts and trains one configuration for ``warmup`` + ``steps`` steps (cycling ``batches``).

    ``tiny_folder`` / ``model_folder``: see :func:`load_base`. ``warm_batch`` (e.g. one short
    row): one step on it before the peak mark is reset, so the
    optimizer and allocator state exist before the measured steps (a cheap stand-in for a full
    warm-up step where steps are expensive).

    Returns:
        ``peak_mib`` (peak memory of the training steps above what was held before loading,
        see the module docstring), ``model_mib`` (held once built, same baseline), ``seconds``
        (wall time of the ``steps`` timed steps), ``final_loss`` and ``losses``.
    """
    before = current_memory(device)
    step = build(name, setting, variant, total_steps, r, device, tiny_folder=tiny_folder, model_folder=model_folder)
    built = current_memory(device)
    if warm_batch is not None:
        step(warm_batch)
    reset_peak(device)
    losses, seconds, cpu_seconds = [], 0.0, 0.0
    for i in range(warmup + steps):
        start, cpu = time.perf_counter(), time.process_time()
        losses.append(step(batches[i % len(batches)]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            seconds += time.perf_counter() - start
            cpu_seconds += time.process_time() - cpu
    mib = 2.0 ** 20
    return {"model": name, "setting": setting.name, "variant": variant, "peak_mib": (peak_memory(device) - before) / mib,
            "model_mib": (built - before) / mib, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "final_loss": losses[-1], "losses": losses}


def measure_in_subprocess(spec: dict, threads: int = 1) -> dict:
    """:func:`measure_config` of ``spec`` (its keyword arguments, ``setting`` by name, ``batches``
    as ``{"random": [size, seq]}`` or ``{"alpaca": [n, size, seq, data_dir]}``) in a fresh CPU process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "hyperadalora.bench.scale", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"measuring {spec.get('variant')} / {spec.get('setting')} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _subprocess_main(spec: dict) -> dict:
    import bitsandbytes  # noqa: F401  (imported before the baseline: libraries are not the run's memory)
    import peft  # noqa: F401
    from transformers import BertForSequenceClassification, LlamaForCausalLM  # noqa: F401

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cpu")
    source, params = next(iter(spec.pop("batches").items()))
    if source == "alpaca":
        n, size, seq, data_dir = params
        batches = alpaca_batches(tokenizer_of(spec["name"]), n, size, seq, data_dir)
    else:
        batches = [random_batch(MODELS[spec["name"]], params[0], params[1], 128, device)]
    setting = SETTINGS[spec.pop("setting")]
    tiny = spec.pop("tiny_folder", None)
    if spec.pop("warm", False):
        spec["warm_batch"] = short_batch(batches[0])
    return measure_config(spec.pop("name"), setting, spec.pop("variant"), batches, device=device,
                          tiny_folder=Path(tiny) if tiny else None, **spec)


def tokenizer_of(name: str):
    """The tokenizer of the packaged model ``name`` (read from its local folder)."""
    from transformers import AutoTokenizer

    from ..models import resolve_model_path

    return AutoTokenizer.from_pretrained(str(resolve_model_path(name)), local_files_only=True)


if __name__ == "__main__":
    print(json.dumps(_subprocess_main(json.loads(sys.argv[1]))))
