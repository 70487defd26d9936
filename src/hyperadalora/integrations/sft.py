"""TRL ``SFTTrainer`` integration: supervised fine-tuning of an :class:`~hyperadalora.AdaptedModel`.

:class:`AdaptedSFTTrainer` is ``trl.SFTTrainer`` (trl 1.16) with
:class:`~hyperadalora.integrations.trainer.AdaptedTrainerMixin`, so everything the Hugging Face
``Trainer`` integration does holds here too: ``after_step`` once per optimizer step (AdaLoRA rank
allocation, recurrent hypernetwork states, DyLoRA rank sampling), ``backward_hypernetworks()``
before gradient clipping, ``HyperConfig.lr`` in its own parameter group, adapter-only checkpoints
that ``resume_from_checkpoint`` restores with the allocator state, DDP preparation. Two things
``SFTTrainer`` does by itself need more:

* Fused LM head. ``SFTTrainer`` replaces the forward of the model it is given by one that runs the
  backbone and scores only the label tokens (``fused_lm_head=True``, no full logits). On an
  ``AdaptedModel`` that forward would call the backbone directly, past the adapted model's own
  forward: the hypernetworks would not generate fresh factors for the forward (with gradient
  accumulation or activation checkpointing the hyper source then fails in the backward), and the
  training-forward bookkeeping would be skipped. :class:`AdaptedSFTTrainer` moves the patch onto
  the wrapped model, so every forward goes through the ``AdaptedModel`` first.
* Loss. ``SFTTrainer`` computes the loss from the per-token log-probabilities, not from the model's
  ``.loss``, so the AdaLoRA orthogonality regulariser is not in it. :class:`AdaptedSFTTrainer` adds
  ``gamma * R`` so that it counts once per optimizer step: ``gamma * R / grad_accum`` per
  micro-batch (the token loss is already normalised over the whole step), not multiplied by the
  number of processes (``SFTTrainer`` multiplies its token loss by it before DDP averages).

Loss averaging: ``SFTTrainer`` divides the summed token loss by the number of label tokens of the
whole optimizer step, over all micro-batches and processes (``num_items_in_batch``);
``hyperadalora train`` (:func:`~hyperadalora.train.step.optimizer_step`) averages each micro-batch's
own token mean. The two agree with ``gradient_accumulation_steps=1``, or when every micro-batch has
the same number of label tokens; otherwise every token of the step weighs the same in
``SFTTrainer`` (a micro-batch with more label tokens weighs more).

Use::

    from datasets import Dataset
    from trl import SFTConfig
    from hyperadalora.data.instruct import build_causal_lm_features, read_instruction_data
    from hyperadalora.integrations.sft import AdaptedSFTTrainer

    base, tok = load_model("smollm2", task="causal-lm")
    model = ha.wrap(base, ha.AdapterConfig(method="adalora", target_modules="all-linear",
                                           allocator=ha.AllocatorConfig(total_step=200, target_r=4)))
    rows = read_instruction_data("alpaca", "train", data_dir)
    train = Dataset.from_list(build_causal_lm_features(rows, tok, 256))  # or {"prompt", "completion"} rows
    args = SFTConfig(output_dir="out", max_steps=200, activation_checkpointing=False, bf16=False)
    AdaptedSFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok).train()

See ``examples/sft_alpaca.py``.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from torch import nn
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from ..adapted_model import AdaptedModel
from .common import require_adapted
from .trainer import AdaptedTrainerMixin

__all__ = ["AdaptedSFTTrainer", "check_sft_setup"]

FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")
"""The per-token fields ``SFTTrainer.compute_loss`` reads from the fused LM head (its loss and metrics)."""

_FUSED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # wrapped models that already carry the fused head


def _refusals(adapted: AdaptedModel, args: Any, kwargs: dict[str, Any]) -> list[str]:
    """What :class:`AdaptedSFTTrainer` cannot do with these arguments, one sentence each."""
    problems = []
    if kwargs.get("peft_config") is not None:
        problems.append("peft_config was given together with a model hyperadalora already adapted: SFTTrainer would "
                        "wrap it in a second (peft) adapter. Pass peft_config=None (the adapter is the one of "
                        "ha.wrap(base, AdapterConfig(...))), or give trl.SFTTrainer the bare base model instead")
    if kwargs.get("compute_loss_func") is not None:
        problems.append("compute_loss_func is not supported (deprecated in trl 1.16; it runs a second forward of the "
                        "adapted model): subclass AdaptedSFTTrainer and override compute_loss")
    if getattr(args, "label_smoothing_factor", 0) > 0:
        problems.append("label_smoothing_factor > 0 is not supported (deprecated in trl 1.16; it runs a second "
                        "forward of the adapted model): set label_smoothing_factor=0")
    if getattr(args, "use_liger_kernel", False):
        problems.append("use_liger_kernel=True is not supported: Liger's kernels replace the model's layers and could "
                        "bypass the adapted linears; set use_liger_kernel=False")
    template = getattr(args, "chat_template_path", None)
    if template is not None and not (os.path.isfile(template) and template.endswith((".jinja", ".j2"))):
        problems.append(f"chat_template_path={template!r} would clone another model's chat template and add tokens, "
                        "resizing the embeddings of the already adapted (frozen) base model; pass a .jinja file or "
                        "set the template on the tokenizer before wrapping")
    parallel = getattr(args, "parallelism_config", None)
    if parallel is not None and getattr(parallel, "sp_enabled", False):
        problems.append("sequence parallelism (parallelism_config with sp_size > 1) is not supported: SFTTrainer then "
                        "takes the model's own loss and the regulariser would be counted per rank")
    head = adapted.model.get_output_embeddings() if hasattr(adapted.model, "get_output_embeddings") else None
    if head is None:
        problems.append(f"{type(adapted.model).__name__} has no LM head (get_output_embeddings() is None): "
                        "SFTTrainer trains causal language models; use AdaptedTrainer for other tasks")
    elif any(head is layer for layer in adapted.layer_list):
        problems.append("an adapter on the LM head is not supported: SFTTrainer's fused LM head multiplies by "
                        "lm_head.weight directly, so the adapter would never train; leave the head out of "
                        "target_modules ('all-linear' does), or list it in modules_to_save to train it fully")
    return problems


def check_sft_setup(model: Any, args: Any = None, kwargs: dict[str, Any] | None = None) -> AdaptedModel:
    """Checks, before any work, that :class:`AdaptedSFTTrainer` can train ``model`` with ``args``.

    Args:
        model: What was passed as ``model``.
        args: The ``SFTConfig`` / ``TrainingArguments`` (or ``None``).
        kwargs: The other keyword arguments of the trainer.

    Returns:
        The AdaptedModel inside ``model``.

    Raises:
        TypeError: ``model`` is not an AdaptedModel (a model id, a bare or peft model).
        ValueError: Naming every refused option and what to do instead.
    """
    if isinstance(model, str):
        raise TypeError(f"AdaptedSFTTrainer needs an adapted model, got the model id {model!r}: load it "
                        "(hyperadalora.models.load_model or AutoModelForCausalLM.from_pretrained), wrap it with "
                        "hyperadalora.wrap(model, AdapterConfig(...)) and pass the result")
    adapted = require_adapted(model, "AdaptedSFTTrainer")
    problems = _refusals(adapted, args, kwargs or {})
    if problems:
        raise ValueError("AdaptedSFTTrainer: " + "; ".join(problems))
    return adapted


def _fuse_inside(adapted: AdaptedModel) -> None:
    """Moves SFTTrainer's fused LM head from the AdaptedModel onto the model it wraps."""
    adapted.__dict__.pop("forward", None)  # SFTTrainer's instance-level patch of the wrapper
    if adapted.model not in _FUSED:  # once per model, however many trainers are built on it
        add_fused_lm_head(adapted.model, outputs=FUSED_OUTPUTS)
        _FUSED.add(adapted.model)


class AdaptedSFTTrainer(AdaptedTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for an :class:`~hyperadalora.AdaptedModel` (see the module docstring).

    Every method x source (LoRA, DoRA, DyLoRA, AdaLoRA; direct or hypernetwork factors) trains
    step for step as with ``hyperadalora train`` (same rows, order, seed and optimizer settings;
    tests/unit/test_trl_integration.py).

    Supported ``SFTConfig`` options (everything ``SFTTrainer`` itself does to the data and the
    loss is kept): tokenised datasets (``input_ids`` + ``labels``, e.g. from
    :func:`~hyperadalora.data.instruct.build_causal_lm_features`: the same features as
    ``hyperadalora train``), text / prompt-completion / conversational datasets with SFTTrainer's
    own tokenisation, ``completion_only_loss``, ``assistant_only_loss``, ``max_length`` /
    ``truncation_mode``, ``packing`` and ``padding_free``, ``shuffle_dataset``, ``loss_type``
    (``nll``, ``dft``), gradient accumulation, ``max_grad_norm``, ``activation_checkpointing``
    (``gradient_checkpointing``; SFTConfig turns it on by default), ``bf16`` / ``fp16`` autocast,
    a ``.jinja`` ``chat_template_path``, ``eos_token`` / ``pad_token``, evaluation, checkpoints and
    ``resume_from_checkpoint``, DDP (``torchrun``). Compared step for step with
    ``hyperadalora train`` (tests/unit/test_trl_integration.py): tokenised features, gradient
    accumulation, clipping, fp32 without activation checkpointing, resuming from a checkpoint, and
    two processes (torchrun) against one; prompt-completion rows with packing and activation
    checkpointing are checked for the contract (after_step once per step, pruning, trained
    hypernetworks); fp16 / bf16 and ``loss_type="dft"`` are not tested. To reproduce a
    ``hyperadalora train`` run, put the rows in the run's order
    (:func:`~hyperadalora.train.build.batch_order`), set ``train_sampling_strategy="sequential"``
    and ``shuffle_dataset=False``, and use the same AdamW settings and learning-rate schedule (the
    tests use a constant rate: ``lr_scheduler_type="constant"`` against ``warmup_steps=0``,
    ``min_lr_ratio=1``).

    Refused with a ``ValueError`` before any work (:func:`check_sft_setup`): ``peft_config``
    (the model is already adapted), ``compute_loss_func`` and ``label_smoothing_factor > 0``
    (deprecated in trl; a second forward), ``use_liger_kernel``, a ``chat_template_path`` that
    clones another model's template (it adds tokens), sequence parallelism, an adapter on the LM
    head, a model without LM head; a model id or a model not made by ``hyperadalora.wrap`` is a
    ``TypeError``. ``AllocatorConfig.compact='final'`` cuts the factors and SFTTrainer's optimizer
    state once the final budget is fixed, as with ``AdaptedTrainer``.

    Args:
        model: The AdaptedModel (a causal LM wrapped by ``hyperadalora.wrap``).
        args: An ``SFTConfig`` (a ``TrainingArguments`` is converted by SFTTrainer); ``None``:
            SFTTrainer's defaults.
        **kwargs: The other ``SFTTrainer`` arguments, by keyword (``train_dataset``,
            ``processing_class``, ``data_collator``, ``callbacks``, ``optimizers``, ...).
    """

    def __init__(self, model: AdaptedModel, args: Any = None, **kwargs: Any) -> None:
        adapted = check_sft_setup(model, args, kwargs)
        super().__init__(model, args, **kwargs)
        _fuse_inside(adapted)

    # SFTTrainer's prepared datasets carry the columns it chose (``seq_lengths`` for packing), not
    # those of the model's forward signature.
    _set_signature_columns_if_needed = SFTTrainer._set_signature_columns_if_needed

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = SFTTrainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        # SFTTrainer's loss comes from the token log-probabilities: gamma * R is not in it yet.
        loss = self.count_regularizer_once(model, loss, 0, num_items_in_batch)
        return (loss, result[1]) if return_outputs else loss
