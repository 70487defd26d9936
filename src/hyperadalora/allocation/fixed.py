"""The fixed policy: every module keeps its configured rank (LoRA, DoRA, DyLoRA)."""

from __future__ import annotations

from .base import RankPolicy


class FixedRanks(RankPolicy):
    """Ranks never change; :meth:`update_and_allocate` only counts calls."""

    name = "fixed"
    adaptive = False

    def update_and_allocate(self, global_step: int) -> int:
        self.steps_seen += 1
        self.last_step = global_step
        return self.budget
