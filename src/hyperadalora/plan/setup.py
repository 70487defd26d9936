"""The training setup a plan is made for: batch, sequence, devices, precision, checkpointing."""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import PlanInputError

PRECISIONS = ("fp32", "bf16", "fp16", "4bit", "8bit")
# Bytes per frozen linear weight: 4-bit NF4 is 0.5 B plus one fp32 absmax per 64 values; with
# double quantisation the absmax is an 8-bit code plus one fp32 scale per 256 blocks (QLoRA,
# Dettmers et al. 2023, section 3). LLM.int8 keeps one fp32 scale per output row (added per layer).
NF4_BLOCK = 64
NF4_DQ_BLOCK = 256


@dataclass(frozen=True)
class TrainSetup:
    """One optimizer step's shape and the hardware it runs on.

    Attributes:
        batch: Sequences per optimizer step, all devices together.
        seq_len: Tokens per sequence.
        gpus: Devices; FSDP fully shards base weights, adapters, hypernetworks, gradients and
            optimizer state across them, and each device runs its share of the batch.
        micro_batch: Sequences per device per forward (``None``: ``ceil(batch / gpus)``, no
            accumulation); more than that accumulates micro-batches.
        precision: ``fp32``, ``bf16``, ``fp16`` (base weights and activations), ``4bit`` (NF4
            base linears, bf16 compute) or ``8bit`` (int8 base linears, bf16 compute).
        checkpointing: Activation checkpointing of every block (only block inputs are kept;
            the forward of each block runs again in the backward).
        double_quant: NF4 double quantisation of the absmax scales (``4bit`` only).
        overhead_gib: Fixed per-device overhead (CUDA context, allocator slack, NCCL buffers).
        device_gib: Device memory, for the "fits" column.
    """

    batch: int = 8
    seq_len: int = 2048
    gpus: int = 1
    micro_batch: int | None = None
    precision: str = "bf16"
    checkpointing: bool = False
    double_quant: bool = True
    overhead_gib: float = 1.0
    device_gib: float = 80.0

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "gpus"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanInputError(f"TrainSetup.{name}={value!r} must be an integer >= 1")
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise PlanInputError(f"TrainSetup.micro_batch={self.micro_batch!r} must be an integer >= 1 or None")
        if self.precision not in PRECISIONS:
            raise PlanInputError(f"TrainSetup.precision={self.precision!r}; allowed values: {', '.join(PRECISIONS)}")
        if self.overhead_gib < 0 or self.device_gib <= 0:
            raise PlanInputError("TrainSetup.overhead_gib must be >= 0 and device_gib > 0")

    @property
    def per_device_batch(self) -> int:
        """Sequences each device processes per optimizer step."""
        return -(-self.batch // self.gpus)

    @property
    def micro(self) -> int:
        """Sequences per device per forward."""
        return min(self.micro_batch or self.per_device_batch, self.per_device_batch)

    @property
    def accumulation(self) -> int:
        """Forwards per device per optimizer step."""
        return -(-self.per_device_batch // self.micro)

    @property
    def act_bytes(self) -> int:
        """Bytes of one activation element (compute dtype)."""
        return 4 if self.precision == "fp32" else 2

    def linear_weight_bytes(self, params: float, rows: int) -> float:
        """Bytes of ``params`` frozen linear weights with ``rows`` output rows in all."""
        if self.precision == "4bit":
            scale = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DQ_BLOCK)) if self.double_quant else 4 / NF4_BLOCK
            return params * (0.5 + scale)
        if self.precision == "8bit":
            return params + 4 * rows
        return params * self.act_bytes

    @property
    def other_weight_bytes(self) -> int:
        """Bytes per frozen non-linear parameter (embeddings, norms, head: bf16 under 4/8-bit)."""
        return self.act_bytes
