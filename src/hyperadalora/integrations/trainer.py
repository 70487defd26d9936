"""Hugging Face ``Trainer`` integration: the training contract (DESIGN.md section 4) inside ``Trainer``.

In transformers 5.23 one optimizer step of ``Trainer`` runs, in this order::

    for each micro-batch:  training_step()          # model.train(); forward; loss.backward()
    clip (max_grad_norm > 0) / grad-norm logging    # every trainable parameter's .grad
    callback.on_pre_optimizer_step
    optimizer.step()
    callback.on_optimizer_step                      # <- after_step(global_step) here
    lr_scheduler.step(); model.zero_grad()
    state.global_step += 1; callback.on_step_end    # (too late: the gradients are gone)
    on_save after a checkpoint was written          # <- our adapter + allocator state

so :class:`AdaptedModelCallback` calls ``model.after_step(state.global_step)`` in
``on_optimizer_step``: once per optimizer step (not per micro-batch), after the step and before
``zero_grad``, with the 0-based index of the step just taken (set
``AllocatorConfig.total_step`` to ``max_steps``). The loss already includes the AdaLoRA
orthogonality regulariser through the model's forward.

There is no callback between the last micro-batch's backward and gradient clipping, which is
where ``backward_hypernetworks()`` (``HyperConfig(generate="per_step")``) must run. With a plain
``Trainer`` the callback runs it in ``on_pre_optimizer_step``, which is right only without
clipping (``max_grad_norm=0``); with clipping it raises. :class:`AdaptedTrainer` (or
:class:`AdaptedTrainerMixin` for your own ``Trainer`` subclass) runs it at the right moment and
also:

* uses the inner model's forward signature (column removal, label names, loss kwargs), so
  ``remove_unused_columns`` works as with the bare model;
* gives the hypernetworks their own learning rate (``HyperConfig.lr``);
* weights the regulariser ``gamma * R`` exactly once per optimizer step whatever
  ``Trainer`` does to the loss (it does not divide a loss normalised by ``num_items_in_batch``
  by the accumulation steps, and multiplies it by the number of processes under DDP);
* adds ``total_rank`` and the unweighted ``regularizer`` to its training logs, so the
  ``report_to`` callbacks (TensorBoard, wandb, MLflow, ...) and ``state.log_history`` get them;
* writes small checkpoints (the adapter, not the frozen base model; works with tied
  embeddings) and restores them, allocator state included, with ``resume_from_checkpoint``;
* prepares the model for DDP when launched with several processes
  (:func:`~hyperadalora.integrations.distributed.prepare_ddp`).

Checkpoints: each ``checkpoint-<step>/`` gets ``hyperadalora_adapter/`` (``save_adapter``
format: ``ha.load_adapter(base, ".../checkpoint-500/hyperadalora_adapter")`` works), next to
``Trainer``'s optimizer, scheduler, RNG and trainer state.

Use::

    from hyperadalora.integrations.trainer import AdaptedTrainer
    model = ha.wrap(base, ha.AdapterConfig(method="adalora", ...,
                    allocator=ha.AllocatorConfig(total_step=args.max_steps, ...)))
    trainer = AdaptedTrainer(model=model, args=args, train_dataset=ds)   # adds the callback
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

or, with a plain ``Trainer`` (``remove_unused_columns=False``; no clipping with ``per_step``)::

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[AdaptedModelCallback()])
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..adapted_model import AdaptedModel
from .common import require_adapted, unwrap_adapted

__all__ = ["ADAPTER_SUBDIR", "AdaptedModelCallback", "AdaptedTrainer", "AdaptedTrainerMixin", "refuse_foreign_sharding"]

logger = logging.get_logger(__name__)

ADAPTER_SUBDIR = "hyperadalora_adapter"
"""Name of the adapter folder written inside every ``Trainer`` checkpoint folder."""


def _checkpoint_dir(args, state) -> str:
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


class AdaptedModelCallback(TrainerCallback):
    """Keeps the hyperadalora training contract inside ``transformers.Trainer``.

    * ``on_optimizer_step``: ``model.after_step(state.global_step)`` (rank allocation, recurrent
      hypernetwork states, DyLoRA rank), after ``optimizer.step()`` and before ``zero_grad``.
    * ``on_pre_optimizer_step``: ``backward_hypernetworks()`` if nobody ran it yet (enough
      without gradient clipping; with ``max_grad_norm > 0`` this raises: use
      :class:`AdaptedTrainer`, which runs it before clipping).
    * ``on_save``: writes the adapter (weights, config, allocator state) to
      ``<output_dir>/checkpoint-<step>/hyperadalora_adapter`` (main process only).
    * ``on_train_begin`` of a resumed run (``state.global_step > 0``): restores the allocator
      state from that folder of the checkpoint being resumed (``Trainer`` itself restores
      weights and buffers but knows nothing of the importance scores and budget); raises if it
      cannot find it, rather than continuing with a reset allocator.
    * several processes: installs the gradient averaging of
      :func:`~hyperadalora.integrations.distributed.prepare_ddp` if it is missing.

    Args:
        model: The AdaptedModel; by default the ``model`` that ``Trainer`` passes to callbacks.
        save_adapter: Write the adapter folder on every checkpoint.
    """

    def __init__(self, model: AdaptedModel | None = None, save_adapter: bool = True) -> None:
        self.model = model
        self.save_adapter = save_adapter
        self.resume_from: str | None = None  # set by AdaptedTrainer to the checkpoint being resumed
        self.restored = False  # set once the adapter state of the resumed checkpoint is loaded
        self.trainer_saves_adapter = False  # AdaptedTrainer writes the folder itself in _save

    def _adapted(self, kwargs: dict[str, Any]) -> AdaptedModel:
        return require_adapted(self.model if self.model is not None else kwargs.get("model"), "AdaptedModelCallback")

    def on_train_begin(self, args, state, control, **kwargs):
        model = self._adapted(kwargs)
        self._check_distributed(model)
        if state.global_step > 0 and not self.restored:
            path = os.path.join(self.resume_from or _checkpoint_dir(args, state), ADAPTER_SUBDIR)
            if not os.path.isdir(path):
                raise RuntimeError(
                    f"resuming at step {state.global_step}, but {path} does not exist, so the AdaLoRA allocator state "
                    "(importance scores, budget) and hyper states cannot be restored. Resume from a checkpoint "
                    "written with AdaptedModelCallback, use AdaptedTrainer (it finds the checkpoint itself), or set "
                    "callback.resume_from to the checkpoint folder.")
            model.load_adapter_weights(path)
            logger.info(f"hyperadalora: restored adapter and allocator state from {path}")
        self.restored = False
        return control

    def _check_distributed(self, model: AdaptedModel) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() == 1:
            return
        if model.source.grad_sync is None:
            from .distributed import sync_generated_gradients

            model.source.grad_sync = lambda: sync_generated_gradients(model)
        if model.source.per_step:
            hyper_ids = {id(p) for p in model.hypernetwork_parameters()}
            hyper_names = {n for n, p in model.named_parameters() if id(p) in hyper_ids}
            ignored = set(model.__dict__.get("_ddp_params_and_buffers_to_ignore", []))
            if not hyper_names <= ignored:
                raise RuntimeError(
                    "HyperConfig(generate='per_step') under DDP needs the hypernetwork parameters left out of DDP: "
                    "call hyperadalora.integrations.distributed.prepare_ddp(model) before creating the Trainer, "
                    "or use AdaptedTrainer, which does it")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self._adapted(kwargs)
        if model.source.backward_hypernetworks() and args.max_grad_norm > 0:
            raise RuntimeError(
                "HyperConfig(generate='per_step') with Trainer gradient clipping: Trainer clipped the gradients before "
                "the hypernetworks received theirs. Use hyperadalora.integrations.trainer.AdaptedTrainer (or "
                "AdaptedTrainerMixin), which calls backward_hypernetworks() before clipping, or set max_grad_norm=0.")
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Trainer increments state.global_step after this callback: this is the 0-based step index.
        model = self._adapted(kwargs)
        model.after_step(state.global_step)
        # AllocatorConfig.compact: Trainer zeroes the gradients after this callback, as optimizer_step does.
        model.compact(kwargs.get("optimizer"))
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self.save_adapter or self.trainer_saves_adapter or not args.should_save:
            return control
        checkpoint = _checkpoint_dir(args, state)
        if os.path.isdir(checkpoint):
            self._adapted(kwargs).save_adapter(os.path.join(checkpoint, ADAPTER_SUBDIR))
        else:
            logger.warning(f"hyperadalora: no checkpoint folder {checkpoint} to save the adapter into (custom "
                           "output directory for hyperparameter search?); the adapter was not saved with it")
        return control


def refuse_foreign_sharding(trainer: Any) -> None:
    """Refuses a ``Trainer`` whose accelerate plugin would shard the model itself (FSDP, DeepSpeed).

    accelerate's FSDP wrapping does not know that the orthogonality regulariser and the allocator
    read whole factors and gradients; :func:`~hyperadalora.integrations.fsdp.shard` does. Checked
    when the trainer is built, before anything trains.

    Raises:
        ValueError: Naming the ways that shard correctly.
    """
    plugin = ("FSDP" if getattr(trainer, "is_fsdp_enabled", False) else
              "DeepSpeed" if getattr(trainer, "is_deepspeed_enabled", False) else None)
    if plugin is not None:
        raise ValueError(f"{type(trainer).__name__} under accelerate's {plugin} plugin would shard the model without "
                         "hyperadalora's gathers (the orthogonality regulariser and the allocator read whole factors "
                         "and gradients): use `hyperadalora train ... distributed=fsdp` (also under accelerate launch "
                         "with an FSDP config), or shard() in a plain loop (examples/fsdp_sst2.py); see "
                         "docs/distributed.md")


class AdaptedTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before ``Trainer``) to train an AdaptedModel.

    See the module docstring for what it changes; everything else is ``Trainer``'s.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        refuse_foreign_sharding(self)
        adapted = require_adapted(self.model, type(self).__name__)
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, AdaptedModelCallback)), None)
        if callback is None:
            callback = AdaptedModelCallback()
            self.add_callback(callback)
        callback.trainer_saves_adapter = True
        self._adapted_callback = callback
        # Behave as Trainer does on the bare model: its forward signature, labels and loss kwargs.
        from transformers.utils import can_return_loss, find_labels

        inner = adapted.model
        self._signature_columns = None
        if self.args.label_names is None:
            self.label_names = find_labels(inner.__class__)
        self.can_return_loss = can_return_loss(inner.__class__)
        if hasattr(inner, "accepts_loss_kwargs"):
            self.model_accepts_loss_kwargs = inner.accepts_loss_kwargs
        else:
            import inspect

            params = inspect.signature(inner.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
        if self.args.world_size > 1:
            from .distributed import prepare_ddp

            prepare_ddp(adapted)  # before accelerate wraps the model in DDP

    # -- the adapted model, not the wrapper, decides what the inputs are ----------------------
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            import inspect

            inner = require_adapted(self.model, type(self).__name__).model
            self._signature_columns = list(inspect.signature(inner.forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})

    # -- optimizer: HyperConfig.lr for the hypernetworks ---------------------------------------
    def create_optimizer(self, model=None):
        had_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        adapted = unwrap_adapted(self.model if model is None else model)
        if had_optimizer or adapted is None or adapted.adapter_config.hyper.lr is None:
            return optimizer
        hyper_ids = {id(p) for p in adapted.hypernetwork_parameters()}
        extra = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in hyper_ids]
            if mine:
                group["params"] = [p for p in group["params"] if id(p) not in hyper_ids]
                extra.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                              "lr": adapted.adapter_config.hyper.lr})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        for group in extra:
            optimizer.add_param_group(group)
        return optimizer

    # -- backward_hypernetworks before clipping ---------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of this optimizer step
            adapted = unwrap_adapted(model)
            if adapted is not None:
                adapted.backward_hypernetworks()
        return loss

    # -- the regulariser counts once per optimizer step ----------------------------------------
    def _loss_scale(self, num_items_in_batch) -> int:
        """The factor ``Trainer.compute_loss`` multiplies the loss by (processes, with
        ``average_tokens_across_devices`` and a loss normalised by ``num_items_in_batch``)."""
        if (self.args.average_tokens_across_devices and (self.model_accepts_loss_kwargs or self.compute_loss_func)
                and num_items_in_batch is not None):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels_taken = (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        model_loss = outputs.get("loss") if hasattr(outputs, "get") else None
        # The model added gamma * R to its loss; Trainer then scaled the loss by `included`.
        included = self._loss_scale(num_items_in_batch) if (
            isinstance(model_loss, torch.Tensor) and not labels_taken and self.compute_loss_func is None) else 0
        loss = self.count_regularizer_once(model, loss, included, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def count_regularizer_once(self, model, loss: torch.Tensor, included: float,
                               num_items_in_batch=None) -> torch.Tensor:
        """``loss`` with the regulariser ``gamma * R`` weighted so that it counts once per optimizer step.

        Args:
            model: The model ``compute_loss`` ran (an AdaptedModel, possibly wrapped).
            loss: The micro-batch loss ``compute_loss`` returns to ``training_step``.
            included: How many times ``gamma * R`` is already in ``loss`` (0 when the loss was not
                taken from the adapted model's output, e.g. SFTTrainer's token log-probabilities).
            num_items_in_batch: What ``Trainer`` passed to ``compute_loss``.

        Returns:
            ``loss`` plus the missing (or minus the surplus) ``gamma * R``; unchanged outside training
            or for a method without regulariser.
        """
        adapted = unwrap_adapted(model)
        if not (adapted is not None and adapted.uses_regularizer and adapted.training and torch.is_grad_enabled()
                and getattr(self, "current_gradient_accumulation_steps", None)):
            return loss
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:  # as Trainer.training_step decides it
            scaled_for_ga = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                             or self.compute_loss_func is not None)
        # Trainer divides by the accumulation steps unless the loss is "scaled for GA"; we want
        # gamma * R once per optimizer step in total.
        wanted = 1.0 / self.current_gradient_accumulation_steps if scaled_for_ga else 1.0
        if included != wanted:
            loss = loss + (wanted - included) * adapted.adapter_config.gamma * adapted.regularizer()
        return loss

    # -- our scalars reach every logging callback (TensorBoard, wandb, MLflow, ...) ----------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds ``total_rank`` and, with a regulariser, its unweighted ``regularizer`` to training logs.

        Both are the values at the logging step (``loss`` is Trainer's mean over the logging
        interval); evaluation logs (no ``loss`` key) are left as they are.
        """
        adapted = unwrap_adapted(self.model)
        if adapted is not None and "loss" in logs:
            logs["total_rank"] = sum(adapted.ranks.values())
            if adapted.uses_regularizer:
                with torch.no_grad():
                    logs["regularizer"] = float(adapted.regularizer())
        super().log(logs, start_time)

    # -- small checkpoints: the adapter, not the frozen base model -------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        require_adapted(self.model, type(self).__name__).save_adapter(os.path.join(output_dir, ADAPTER_SUBDIR))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        from transformers.trainer import TRAINING_ARGS_NAME

        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_adapter_checkpoint(self, checkpoint: str) -> bool:
        path = os.path.join(checkpoint, ADAPTER_SUBDIR)
        if not os.path.isdir(path):
            return False
        require_adapted(self.model, type(self).__name__).load_adapter_weights(path)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self._load_adapter_checkpoint(resume_from_checkpoint):
            self._adapted_callback.restored = True
        else:  # no adapter folder: let Trainer load its weights; the callback then explains what is missing
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            self._adapted_callback.resume_from = resume_from_checkpoint

    def _load_best_model(self) -> None:
        if not self._load_adapter_checkpoint(self.state.best_model_checkpoint):
            super()._load_best_model()


class AdaptedTrainer(AdaptedTrainerMixin, Trainer):
    """``transformers.Trainer`` for an :class:`~hyperadalora.AdaptedModel` (see the module docstring)."""
