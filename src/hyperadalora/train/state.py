"""What a run has recorded so far: log rows, evaluations, loss EMA, rank history, adapter checkpoint.

This is the part of a training checkpoint's ``trainer_state.json`` that belongs to the loop;
:meth:`RunState.from_checkpoint` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Steps whose mean loss is the run's early loss; afterwards a smoothed loss above
#: ``DIVERGE_FACTOR`` times it marks the step as diverging (``"diverging": true`` in the log).
EARLY_STEPS = 10
DIVERGE_FACTOR = 3.0


@dataclass
class RunState:
    """The loop's records (saved with every training checkpoint).

    Attributes:
        log_rows: One row per optimizer step done (what ``log.jsonl`` holds).
        evals: Every evaluation's ``{"step", **metrics}``.
        rank_history: ``[(step, [rank per module])]`` at step 0 and whenever a rank changed
            (AdaLoRA; empty otherwise).
        loss_ema: Exponential moving average of the loss (0.9), not bias-corrected.
        ema_n: Steps in ``loss_ema``.
        checkpoint: ``{"step", "reason"}`` of the adapter in ``RUN_DIR/adapter``, or None.
        last_predictions: The last evaluation's per-row predictions (not saved in checkpoints).
        early_loss: Mean loss of the first :data:`EARLY_STEPS` steps (so far).
        diverged_at: The first step whose smoothed loss exceeded ``DIVERGE_FACTOR * early_loss``.
    """

    log_rows: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    rank_history: list[tuple[int, list[int]]] = field(default_factory=list)
    loss_ema: float = 0.0
    ema_n: int = 0
    checkpoint: dict[str, Any] | None = None
    last_predictions: list[dict] = field(default_factory=list)
    early_loss: float = 0.0
    diverged_at: int | None = None

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], log_rows: list[dict]) -> RunState:
        """The records of a training checkpoint's trainer state, with the log rows kept up to it."""
        return cls(log_rows=log_rows, evals=list(state["evals"]),
                   rank_history=[(s, list(r)) for s, r in state["rank_history"]],
                   loss_ema=state["loss_ema"], ema_n=state["ema_n"], checkpoint=state["checkpoint"],
                   early_loss=state.get("early_loss", 0.0), diverged_at=state.get("diverged_at"))

    def record_step(self, row: dict) -> float:
        """Adds a step's log row (setting its ``diverging`` flag); returns the bias-corrected loss EMA."""
        self.log_rows.append(row)
        self.ema_n += 1
        self.loss_ema = 0.9 * self.loss_ema + 0.1 * row["loss"]
        smoothed = self.loss_ema / (1 - 0.9 ** self.ema_n)
        if self.ema_n <= EARLY_STEPS:
            self.early_loss += (row["loss"] - self.early_loss) / self.ema_n
        row["diverging"] = self.ema_n > EARLY_STEPS and smoothed > DIVERGE_FACTOR * abs(self.early_loss)
        if row["diverging"] and self.diverged_at is None:
            self.diverged_at = row["step"]
        return smoothed

    def record_ranks(self, step: int, ranks: list[int]) -> None:
        """Adds ``ranks`` to the history when they differ from the last entry (or it is the first)."""
        if not self.rank_history or ranks != self.rank_history[-1][1]:
            self.rank_history.append((step, ranks))

    def trainer_state(self, reason: str, data: dict[str, Any]) -> dict[str, Any]:
        """The JSON trainer state of a training checkpoint (``data``: the data position)."""
        return {"reason": reason, "loss_ema": self.loss_ema, "ema_n": self.ema_n,
                "rank_history": [[s, r] for s, r in self.rank_history], "evals": self.evals,
                "checkpoint": self.checkpoint, "data": data, "early_loss": self.early_loss,
                "diverged_at": self.diverged_at}

    @property
    def mean_step_time(self) -> float | None:
        """Mean ``step_time`` of the logged steps (None before the first)."""
        return sum(r["step_time"] for r in self.log_rows) / len(self.log_rows) if self.log_rows else None


__all__ = ["RunState"]
