"""DyLoRA: LoRA trained with a rank ``b ~ U{1..r}`` sampled every step (Valipour et al., 2023).

Training uses ``B[:, :b] A[:b]`` scaled by ``alpha / b``; evaluation uses the full rank ``r``
with ``alpha / r``. The sampled ``b`` is drawn in ``after_step`` (and once at wrap time) from
the model's DyLoRA generator so that runs are reproducible.
"""

from __future__ import annotations

from .lora import LoRA


class DyLoRA(LoRA):
    """LoRA whose training rank is truncated to a sampled ``b``."""

    name = "dylora"

    def effective_factors(self, layer, factors):
        a, b = factors["A"], factors["B"]
        if layer.training:
            k = layer.dylora_b
            return a[:k], b[:, :k], layer.lora_alpha / k
        return a, b, layer.lora_alpha / layer.r
