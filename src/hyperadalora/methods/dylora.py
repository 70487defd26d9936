"""DyLoRA: LoRA trained with a rank ``b ~ U{1..r}`` sampled every step (Valipour et al., 2023).

Training uses ``B[:, :b] A[:b]`` scaled by ``alpha / b``; evaluation uses the full rank ``r``
with ``alpha / r``. The sampled ``b`` is drawn once at wrap time and after every optimizer
step from the method's own generator (seeded by ``AdapterConfig.seed``, 0 when unset), so that
runs are reproducible; :meth:`rng_state` / :meth:`set_rng_state` let a resumed run continue the
same sequence.
"""

from __future__ import annotations

import torch

from .lora import LoRA


class DyLoRA(LoRA):
    """LoRA whose training rank is truncated to a sampled ``b``."""

    name = "dylora"
    # No PiSSA: a sampled rank b < r would see W0 - s B0 A0 + s' B0[:, :b] A0[:b] != W0 at step 0.
    inits = ("default",)

    def __init__(self, config=None) -> None:
        super().__init__(config)
        seed = config.seed if config is not None and config.seed is not None else 0
        self.generator = torch.Generator().manual_seed(seed)

    def init_layer(self, layer, w0, generator):
        super().init_layer(layer, w0, generator)
        layer.dylora_b = layer.r

    def bind_layers(self, layers):
        self._sample(layers)

    def after_step(self, layers, global_step):
        self._sample(layers)

    def _sample(self, layers) -> None:
        # Per-module ranks (rank_pattern): b ~ U{1..largest r}; a module of rank r_m uses min(b, r_m).
        top = max(layer.r for layer in layers)
        b = int(torch.randint(1, top + 1, (1,), generator=self.generator))
        for layer in layers:
            layer.dylora_b = b

    def sampled_rank(self, layers):
        return layers[0].dylora_b

    def rng_state(self):
        return self.generator.get_state()

    def set_rng_state(self, state):
        self.generator.set_state(state)

    def effective_factors(self, layer, factors):
        a, b = factors["A"], factors["B"]
        if layer.training:
            k = min(layer.dylora_b, layer.r)
            return a[:k], b[:, :k], layer.lora_alpha / k
        return a, b, layer.lora_alpha / layer.r
