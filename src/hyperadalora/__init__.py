"""hyperadalora: adaptive-rank, hypernetwork-accelerated low-rank adapters for transformers.

Public API::

    import hyperadalora as ha
    model = ha.wrap(hf_model, ha.AdapterConfig(method="adalora", r=12,
                    allocator=ha.AllocatorConfig(total_step=1000, target_r=8)))
    loss = model(**batch).loss        # includes the orthogonality regulariser in training mode
    loss.backward(); opt.step(); model.after_step(step); opt.zero_grad()
    model.save_adapter("out/")        # later: ha.load_adapter(base_model, "out/")
"""

from .adapted_model import AdaptedModel, wrap
from .checkpoint import load_adapter
from .config import AdapterConfig, AllocatorConfig, HyperConfig
from .export import export_peft_lora
from .export_merged import export_merged
from .layers import AdaptedLinear
from .version import __version__

__all__ = [
    "AdaptedLinear",
    "AdaptedModel",
    "AdapterConfig",
    "AllocatorConfig",
    "HyperConfig",
    "__version__",
    "export_merged",
    "export_peft_lora",
    "load_adapter",
    "wrap",
]
