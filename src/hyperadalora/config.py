"""Typed, validated configuration for adapters, rank allocation and factor sources.

Every config is a frozen dataclass validated in ``__post_init__``: a bad value raises
``ValueError`` (or ``TypeError`` for a wrong type) naming the field and the allowed values,
at construction time rather than deep inside training. Configs round-trip through plain
JSON-compatible dicts (``to_dict`` / ``from_dict``), which is how adapters are saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .allocation import POLICY_REGISTRY
from .allocation.sensitivity_math import BUDGET_UNITS, DIAGONAL_FORMS
from .methods import METHOD_REGISTRY, AdapterMethod

METHODS = tuple(METHOD_REGISTRY)
SOURCES = ("direct", "hyper")
POLICIES = tuple(POLICY_REGISTRY)
COMPACT_MODES = ("off", "final")
INITS = tuple(dict.fromkeys(i for m in METHOD_REGISTRY.values() for i in m.inits))
ORTH_REG_FORMS = ("peft", "paper")


def check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raises ValueError naming ``owner.name`` and the allowed values unless ``value`` is one of them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def check_int(owner: str, name: str, value: Any, minimum: int | None = None) -> None:
    """Raises TypeError unless ``value`` is an int (not a bool), ValueError if below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{owner}.{name}={value} must be >= {minimum}")


def check_float(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raises unless ``value`` is a finite number within ``[low, high]`` (``*_open``: bound excluded)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}.{name} must be a number, got {type(value).__name__} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{owner}.{name}={value} must be a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{owner}.{name}={value} must be {bound}")
    if high is not None and (value > high or (high_open and value == high)):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise ValueError(f"{owner}.{name}={value} must be {bound}")


class JsonConfig:
    """Mixin: dict / JSON round trip with unknown-key checking."""

    _nested: ClassVar[dict[str, type]] = {}

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-compatible dict of every field (nested configs included)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, JsonConfig):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Builds the config from a dict, rejecting unknown keys by name."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names, key=str)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known fields: {sorted(names)}")
        kwargs = dict(data)
        for key, sub in cls._nested.items():
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = sub.from_dict(kwargs[key])
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialises to JSON; also writes ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path):
        """Parses JSON text, or reads it from an existing file path."""
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class AllocatorConfig(JsonConfig):
    """Rank allocation: AdaLoRA's schedule and scoring, or Sensitivity-LoRA's one-shot ranks.

    ``policy="sensitivity"`` (any method) decides every module's rank once, before the adapters
    are created, from a calibration pass on the base model (:mod:`hyperadalora.allocation.sensitivity`);
    the adapters are then built at those ranks (``AdapterConfig.rank_pattern``). With AdaLoRA,
    ``then`` says whether an in-training policy keeps pruning from those initial ranks
    (``then="adalora"`` / ``"sigma-grad"``, with the schedule fields below) or the ranks stay as
    decided (``then="none"``, the paper's method; the schedule fields are then unused).

    Attributes:
        total_step: Total number of optimizer steps of the run (required when ranks change in
            training: the budget schedule is defined relative to it).
        target_r: Average rank per adapted module at the end of the budget phase.
        tinit: Steps of initial warm-up before any pruning.
        tfinal: Steps at the end with the final budget fixed.
        deltaT: Re-allocate every ``deltaT`` steps during the budget phase.
        beta1: EMA coefficient of the sensitivity (``adalora`` policy).
        beta2: EMA coefficient of the uncertainty (``adalora`` policy).
        policy: ``adalora`` (peft / AdaLoRA's smoothed sensitivity x uncertainty of each
            (P column, lam_i, Q row) triplet; masked values may recover at a later allocation,
            as in peft) or ``sigma-grad`` (HyperAdaLoRA Appendix D: ``|lam * dL/dlam|``;
            a pruned value stays exactly zero for the rest of training), or ``sensitivity``
            (Sensitivity-LoRA: ranks from the base model's Hessian diagonals, decided before the wrap).
        then: ``sensitivity`` only: the in-training policy after the one-shot allocation,
            ``none`` (ranks fixed) or an adaptive policy name (AdaLoRA only; it prunes from the
            allocated, mixed initial ranks by one global threshold).
        calibration: ``sensitivity``: where the calibration rows come from: ``train`` (the
            run's training rows) or a data directory in ``data_dir``'s layout (a ``.jsonl`` /
            ``.json`` file for ``task=instruct``), whose training rows are used.
        calibration_rows: ``sensitivity``: number of calibration rows (a seeded sample; the
            paper found 10% of its set as good as all of it, Kendall tau 0.986).
        calibration_max_length: ``sensitivity``: tokens per calibration row (``None``: the run's
            ``max_length``).
        calibration_batch_size: ``sensitivity``: rows per calibration forward pass.
        avg_rank: ``sensitivity``: average rank (total = ``avg_rank`` x number of matrices;
            ``None``: ``AdapterConfig.r``, so the budget equals a uniform adapter's).
        min_rank: ``sensitivity``: smallest rank; 0 lets a module drop out (left unadapted).
        max_rank: ``sensitivity``: largest rank (``None``: ``min(d_in, d_out)`` of each matrix,
            which always caps).
        budget: ``sensitivity``: what is split in proportion to the scores: ``ranks`` (the
            paper: ``avg_rank`` x number of matrices, exact) or ``params`` (``avg_rank`` x the sum of
            every matrix's ``d_in + d_out``, a uniform LoRA's parameter count, at most that and
            short of it by less than one rank; for comparisons at equal trainable parameters).
        topk_fraction: ``sensitivity``: fraction of the Hessian diagonal averaged by ``S_T``.
        alpha: ``sensitivity``: energy fraction defining the effective rank ``S_E``.
        diagonal: ``sensitivity``: ``channel`` (the ``d_in`` input-channel values) or ``weight``
            (each value repeated ``d_out`` times, as the per-weight Hessian diagonal is; differs
            for mixed shapes such as LLaMA's MLP and GQA's k / v).
        compact: ``off`` (default: pruned components stay masked at full rank, as in peft) or
            ``final``: once the final budget is fixed (step ``total_step - tfinal``), the
            factors and their optimizer state are cut to the kept components, so compute and
            memory shrink with the ranks (a hypernetwork source needs per-token generation; see
            :meth:`~hyperadalora.AdaptedModel.compact`).
    """

    THEN_NONE: ClassVar[str] = "none"

    total_step: int | None = None
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    policy: str = "adalora"
    then: str = "none"
    calibration: str = "train"
    calibration_rows: int = 256
    calibration_max_length: int | None = None
    calibration_batch_size: int = 16
    avg_rank: int | None = None
    min_rank: int = 1
    max_rank: int | None = None
    budget: str = "ranks"
    topk_fraction: float = 0.5
    alpha: float = 0.85
    diagonal: str = "channel"
    compact: str = "off"

    def __post_init__(self) -> None:
        owner = "AllocatorConfig"
        check_choice(owner, "policy", self.policy, POLICIES)
        check_choice(owner, "compact", self.compact, COMPACT_MODES)
        self._check_sensitivity(owner)
        if not self.ranks_change:
            return  # a one-shot allocation has no budget schedule
        if self.total_step is None:
            raise ValueError(
                f"{owner}.total_step is required for AdaLoRA: set it to the number of optimizer steps of the run "
                "(the rank budget schedule is defined relative to it)"
            )
        check_int(owner, "total_step", self.total_step, 1)
        check_int(owner, "target_r", self.target_r, 1)
        check_int(owner, "tinit", self.tinit, 0)
        check_int(owner, "tfinal", self.tfinal, 0)
        check_int(owner, "deltaT", self.deltaT, 1)
        check_float(owner, "beta1", self.beta1, 0.0, 1.0, low_open=True, high_open=True)
        check_float(owner, "beta2", self.beta2, 0.0, 1.0, low_open=True, high_open=True)
        if self.tinit + self.tfinal >= self.total_step:
            raise ValueError(
                f"{owner}: tinit ({self.tinit}) + tfinal ({self.tfinal}) must be < total_step ({self.total_step}) "
                "so that a budget phase exists; decrease tinit/tfinal or increase total_step"
            )

    def _check_sensitivity(self, owner: str) -> None:
        policy = POLICY_REGISTRY[self.policy]
        adaptive = tuple(n for n, p in POLICY_REGISTRY.items() if p.adaptive)
        if policy.decides_before_wrap:
            check_choice(owner, "then", self.then, (self.THEN_NONE, *adaptive))
        elif self.then != self.THEN_NONE:
            before = ", ".join(n for n, p in POLICY_REGISTRY.items() if p.decides_before_wrap)
            raise ValueError(f"{owner}.then={self.then!r} is only used with policy={before}, not {self.policy!r}")
        if not isinstance(self.calibration, str) or not self.calibration:
            raise ValueError(f"{owner}.calibration must be 'train' or a data path, got {self.calibration!r}")
        for name in ("calibration_rows", "calibration_batch_size"):
            check_int(owner, name, getattr(self, name), 1)
        for name in ("calibration_max_length", "avg_rank", "max_rank"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name), 1)
        check_int(owner, "min_rank", self.min_rank, 0)
        if self.max_rank is not None and self.max_rank < self.min_rank:
            raise ValueError(f"{owner}: max_rank ({self.max_rank}) must be >= min_rank ({self.min_rank})")
        check_float(owner, "topk_fraction", self.topk_fraction, 0.0, 1.0, low_open=True)
        check_float(owner, "alpha", self.alpha, 0.0, 1.0, low_open=True)
        check_choice(owner, "diagonal", self.diagonal, DIAGONAL_FORMS)
        check_choice(owner, "budget", self.budget, BUDGET_UNITS)

    @property
    def decides_before_wrap(self) -> bool:
        """Whether the policy decides per-module ranks on the base model before the wrap."""
        return POLICY_REGISTRY[self.policy].decides_before_wrap

    @property
    def ranks_change(self) -> bool:
        """Whether ranks change during training (an adaptive policy runs; the schedule is used)."""
        return POLICY_REGISTRY[self.policy].training_policy(self).adaptive


@dataclass(frozen=True)
class HyperConfig(JsonConfig):
    """Hypernetwork factor source settings (used when ``AdapterConfig.source == "hyper"``).

    Attributes:
        arch: Hypernetwork body: ``attention`` (one BERT layer per ``layers``), ``mlp`` or ``cnn``.
        tokens: Token layout preset (DESIGN.md section 2): ``rank`` (a token per rank component),
            ``rows`` (a token per row of the long side), ``elements`` (a token per scalar) or
            ``patch`` (each rank vector cut into ``patch_width``-wide pieces).
        rank_span: Overrides the preset's rank span (rank components per token).
        width_span: Overrides the preset's width span (columns per token).
        patch_width: Width of a ``patch`` token.
        hidden: Hidden width of the bodies (FFN ``hidden * 1200 / 312``). Default 128; the paper's
            TinyBERT-sized body is ``hidden=312`` (what ``benchmarks/`` reproduces the paper with).
        lam_hidden: Hidden width of the ``lam`` hypernetwork (``None``: ``hidden``). A ``lam``
            token carries ``rank_span`` scalars, so a TinyBERT-wide body there mostly transforms
            its context embeddings while costing as much as the ``P`` or ``Q`` body
            (benchmarks/results/step_cost_goal_b16.md).
        layers: Number of body layers.
        mode: How the state evolves. ``recurrent`` (paper Eqs. 4-6): ``F = S + c*H(S)`` and
            after each optimizer step ``S <- F``, so the state integrates the generated
            residual. ``reparam``: ``F = S0 + c*H(S0)``, the state stays at its initial value.
            ``anchored``: ``F = S0 + c*H(S)`` and ``S <- F``: still recurrent (the hypernetwork
            reads the current factor, as in Eq. 4) but the state tracks the generated factor
            instead of integrating it: each step moves the state by the *change* of the
            hypernetwork output, ``c*(H_t(S_t) - H_{t-1}(S_{t-1}))``, as large as one optimizer
            step moves a directly trained factor (DESIGN.md section 2, "scale of the generated
            step").
        generate: ``per_forward`` regenerates the factors in every training forward (plain
            ``loss.backward(); optimizer.step()`` loops work unchanged). ``per_step`` generates
            them once per optimizer step, however many micro-batches are accumulated: the
            model reads detached copies, and :meth:`AdaptedModel.backward_hypernetworks` (call
            it before gradient clipping, or let :meth:`AdaptedModel.attach_optimizer` call it
            before ``optimizer.step()``) pushes their accumulated gradient into the
            hypernetworks.
        checkpointing: Activation checkpointing of the hypernetworks: only their inputs stay
            alive through the model's forward and backward, and their activations are recomputed
            when the gradient reaches them (one more hypernetwork forward per generation, less
            peak memory; benchmarks/results/step_cost_goal_b16.md).
        max_tokens_per_call: Upper bound on ``modules x tokens`` per body call; larger groups
            are split by module and run with activation checkpointing, so that long token
            sequences (the ``elements`` and ``rows`` layouts) fit in memory. ``None``: no bound.
        output_scale: Multiplier of the generated residual (``F = S + output_scale * H(S)``);
            ``None`` means ``1 / sqrt(hidden)``, so that one learning rate means about one step
            size for a directly trained factor and a generated one (DESIGN.md section 2).
        context: Add learned per-module and per-rank-position embeddings to every token, so
            that zero-initialised factors (lam, LoRA's B) are not generated identically
            everywhere (the symmetry trap).
        lr: Learning rate for the hypernetwork parameters when the training loop builds
            parameter groups (``None``: the run's learning rate).
        task_embeddings: Number of learned task embeddings (0: none). With ``N > 0`` every
            hypernetwork adds the current task's embedding to every token, so that one set of
            hypernetworks generates each task's factors (HyperFormer-style multi-task training:
            ``hyperadalora multitask``, ``model.set_task(i)``); a single-task run started from such
            hypernetworks with ``task_embeddings=1`` (``init_from``) starts its embedding at the
            mean of the source tasks'.
    """

    ARCHS: ClassVar[tuple[str, ...]] = ("attention", "mlp", "cnn")
    TOKENS: ClassVar[tuple[str, ...]] = ("rank", "rows", "elements", "patch")
    MODES: ClassVar[tuple[str, ...]] = ("recurrent", "reparam", "anchored")
    GENERATE: ClassVar[tuple[str, ...]] = ("per_forward", "per_step")

    arch: str = "attention"
    # Defaults chosen from benchmarks/results (MiniLM, SST-2, 300 steps, batch 16, 2-core CPU):
    # * tokens="rank": the cheapest layout per step (hyper/direct step time 1.10 at batch 16,
    #   step_cost_hyper_b16) and the fastest to learn: at lr 1e-3 the smoothed loss reached 0.6
    #   at step 81-83 (rank) vs 118 (patch, which also costs 1.46x a direct step and stalled at
    #   0.63 at lr 3e-3); "rows" and "elements" cost many direct steps per step
    #   (step_cost_hyper_slow_layouts), too slow to train here.
    # * mode="anchored": keeps the paper's recurrence (the hypernetwork reads the previous
    #   generated factor) without its integration; it had the lowest final loss of the modes
    #   (0.387 at lr 1e-3; reparam 0.415 at 3e-3) and matched reparam step for step at 1e-3, but
    #   stalled at 3e-3 where reparam still learned. The paper's "recurrent" did not learn at
    #   any lr tried (0.68-0.69 from 1e-5 to 3e-3). None of them reached direct AdaLoRA's loss at
    #   its best lr (0.360): hyper is faster only against direct at the same, too low, lr.
    #   convergence_quick.md has every figure.
    tokens: str = "rank"
    rank_span: int | None = None
    width_span: int | None = None
    patch_width: int = 64
    # * hidden=128, not TinyBERT's 312 (the paper's size): the hypernetworks' cost is a fixed ~0.1 s
    #   per optimizer step and their AdamW state; at 312 (5.87 M parameters for MiniLM's 36 linears)
    #   a batch-16 step needs 1.13x the direct step's memory, at 128 (1.59 M) 1.04x, and 1.03x vs
    #   1.01x at batch 64 (step_cost_goal_b16 / _b64). On SST-2 / MiniLM, 3 seeds at lr 1e-3, 128
    #   learned as well (final loss 0.399 vs 0.407, 172 vs 165 steps to AdaLoRA's target, dev 0.796
    #   vs 0.801), and at 3e-3 better (0.343 vs 0.385); on MPNet / SST-2 (2 seeds) a little behind,
    #   within the seed spread (0.258 vs 0.244, 132 vs 126 steps; results/beyond_h128*.md).
    hidden: int = 128
    lam_hidden: int | None = None
    layers: int = 1
    mode: str = "anchored"
    output_scale: float | None = None
    context: bool = True
    lr: float | None = None
    generate: str = "per_forward"
    checkpointing: bool = False
    max_tokens_per_call: int | None = 65536
    task_embeddings: int = 0

    def __post_init__(self) -> None:
        owner = "HyperConfig"
        check_int(owner, "task_embeddings", self.task_embeddings, 0)
        check_choice(owner, "arch", self.arch, self.ARCHS)
        check_choice(owner, "tokens", self.tokens, self.TOKENS)
        check_choice(owner, "mode", self.mode, self.MODES)
        check_choice(owner, "generate", self.generate, self.GENERATE)
        if self.max_tokens_per_call is not None:
            check_int(owner, "max_tokens_per_call", self.max_tokens_per_call, 1)
        check_int(owner, "hidden", self.hidden, 1)
        if self.lam_hidden is not None:
            check_int(owner, "lam_hidden", self.lam_hidden, 1)
        check_int(owner, "layers", self.layers, 1)
        check_int(owner, "patch_width", self.patch_width, 1)
        for name in ("rank_span", "width_span"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name), 1)
        if self.output_scale is not None:
            check_float(owner, "output_scale", self.output_scale, 0.0, low_open=True)
        if self.lr is not None:
            check_float(owner, "lr", self.lr, 0.0, low_open=True)
        for name in ("context", "checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{owner}.{name} must be a bool, got {getattr(self, name)!r}")

    def hidden_for(self, singular_values: bool) -> int:
        """The body width of a kind's hypernetwork (``lam_hidden`` for the singular values, the
        kind a method declares as ``AdapterMethod.singular_value_kind``)."""
        return self.lam_hidden if singular_values and self.lam_hidden is not None else self.hidden

    def scale_for(self, singular_values: bool) -> float:
        """The effective output scale of a kind's hypernetwork (``1/sqrt`` of its width)."""
        return self.output_scale if self.output_scale is not None else self.hidden_for(singular_values) ** -0.5


@dataclass(frozen=True)
class AdapterConfig(JsonConfig):
    """What to adapt and how.

    Attributes:
        method: ``lora``, ``adalora``, ``dora`` or ``dylora`` (DESIGN.md section 1).
        r: Rank of each adapter (AdaLoRA: the initial rank ``init_r``; DyLoRA: the maximum rank).
        lora_alpha: Scaling numerator. LoRA / DoRA / DyLoRA scale by ``lora_alpha / r``
            (DyLoRA: ``/ b`` for the sampled rank b); AdaLoRA scales by
            ``lora_alpha / (r + 1e-5)`` as peft does.
        lora_dropout: Dropout on the adapter input.
        target_modules: Module names (a module matches when its name equals one or ends with
            ``"." + name``), a regular expression (full match), or ``"all-linear"`` (every linear
            layer except the output / classification head).
        modules_to_save: Extra modules (e.g. a classification head) trained fully and saved
            with the adapter.
        source: ``direct`` (factors are trained parameters) or ``hyper`` (generated by a
            hypernetwork; see :class:`HyperConfig`).
        gamma: Weight of the orthogonality regulariser (AdaLoRA family; peft's
            ``orth_reg_weight``).
        orth_reg: ``peft`` (mean over all P and Q of the Frobenius norm ``||P^T P - I||_F``,
            as peft computes it) or ``paper`` (sum over modules of squared norms, paper Eq. 7).
        allocator: Rank allocation settings (required for ``adalora``).
        hyper: Hypernetwork settings (used when ``source == "hyper"``).
        seed: Seed for the adapter initialisation and the hypernetworks' (``None``: use torch's global
            RNG, like peft).
        init: Factor initialisation: ``default`` (as peft initialises each method) or ``pissa``
            (LoRA and DoRA: factors from the top-r singular vectors of ``W0`` and the base replaced
            by the residual, as peft's ``init_lora_weights="pissa"``; see
            :mod:`hyperadalora.methods.lora` for merge, save and export).
        rank_pattern: Per-module ranks overriding ``r`` (peft's name): ``{module: rank}``, a
            module matching a key when its name equals it or ends with ``"." + key`` (an exact
            name wins). Rank 0 leaves the module unadapted. Set by ``allocator.policy="sensitivity"``
            before the wrap, and saved with the adapter so that loading and export rebuild the
            same shapes. ``None``: every module has rank ``r``.
        init_from: A saved adapter folder, or a run folder holding ``adapter/``, whose trained
            factors (``direct``) or hypernetworks and factor states (``hyper``) initialise this
            adapter (transfer from a source task; :mod:`hyperadalora.transfer`). Method, source,
            hypernetwork shape and ranks must match; the allocator state, the saved heads
            (``modules_to_save``) and the step count start fresh. ``None``: initialise as ``init`` says.
    """

    _nested: ClassVar[dict[str, type]] = {"allocator": AllocatorConfig, "hyper": HyperConfig}

    method: str = "lora"
    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    source: str = "direct"
    gamma: float = 0.5
    orth_reg: str = "peft"
    allocator: AllocatorConfig | None = None
    hyper: HyperConfig = field(default_factory=HyperConfig)
    seed: int | None = None
    init: str = "default"
    rank_pattern: dict[str, int] | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        owner = "AdapterConfig"
        self._check_rank_pattern(owner)
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise TypeError(f"{owner}.init_from must be a folder path (a saved adapter or a run), got {self.init_from!r}")
        check_choice(owner, "method", self.method, METHODS)
        check_choice(owner, "init", self.init, INITS)
        if self.init not in self.method_class.inits:
            supporting = ", ".join(n for n, m in METHOD_REGISTRY.items() if self.init in m.inits)
            raise ValueError(f"{owner}.init={self.init!r} is not supported by method={self.method!r} "
                             f"(methods supporting it: {supporting}; {self.method!r} supports "
                             f"{', '.join(self.method_class.inits)})")
        check_choice(owner, "source", self.source, SOURCES)
        check_choice(owner, "orth_reg", self.orth_reg, ORTH_REG_FORMS)
        check_int(owner, "r", self.r)
        if self.r <= 0:
            raise ValueError(f"{owner}.r={self.r} must be a positive integer (the adapter rank)")
        check_float(owner, "lora_alpha", self.lora_alpha, 0.0, low_open=True)
        check_float(owner, "lora_dropout", self.lora_dropout, 0.0, 1.0, high_open=True)
        check_float(owner, "gamma", self.gamma)
        if self.gamma < 0:
            raise ValueError(f"{owner}.gamma={self.gamma} must be >= 0 (orthogonality regulariser weight)")
        if self.seed is not None:
            check_int(owner, "seed", self.seed)
        # Normalise list-like fields to tuples so the frozen config stays hashable / immutable.
        tm = self.target_modules
        if isinstance(tm, (list, tuple, set, frozenset)):
            tm = tuple(sorted(tm)) if isinstance(tm, (set, frozenset)) else tuple(tm)
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(f"{owner}.target_modules must be non-empty module names, got {self.target_modules!r}")
            object.__setattr__(self, "target_modules", tm)
        elif not isinstance(tm, str) or not tm:
            raise TypeError(
                f"{owner}.target_modules must be a list of module names, a regex string or 'all-linear', got {tm!r}"
            )
        mts = self.modules_to_save
        if isinstance(mts, str):
            mts = (mts,)
        if not isinstance(mts, (list, tuple)) or not all(isinstance(m, str) and m for m in mts):
            raise TypeError(f"{owner}.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        object.__setattr__(self, "modules_to_save", tuple(mts))
        if isinstance(self.allocator, dict):
            object.__setattr__(self, "allocator", AllocatorConfig.from_dict(self.allocator))
        if isinstance(self.hyper, dict):
            object.__setattr__(self, "hyper", HyperConfig.from_dict(self.hyper))
        if self.allocator is not None and not isinstance(self.allocator, AllocatorConfig):
            raise TypeError(f"{owner}.allocator must be an AllocatorConfig (or a dict of its fields), "
                            f"got {type(self.allocator).__name__} ({self.allocator!r})")
        if not isinstance(self.hyper, HyperConfig):
            raise TypeError(f"{owner}.hyper must be a HyperConfig (or a dict of its fields), "
                            f"got {type(self.hyper).__name__} ({self.hyper!r})")
        self._check_allocator(owner)

    def _check_rank_pattern(self, owner: str) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict) or not self.rank_pattern:
            raise TypeError(f"{owner}.rank_pattern must be a non-empty mapping of module name -> rank, "
                            f"got {self.rank_pattern!r}")
        for key, rank in self.rank_pattern.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{owner}.rank_pattern keys must be module names, got {key!r}")
            check_int(owner, f"rank_pattern[{key!r}]", rank, 0)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))  # a copy: the config owns it

    def rank_for(self, module: str) -> int:
        """The rank of ``module``: its ``rank_pattern`` entry (exact name first, then suffix), else ``r``."""
        pattern = self.rank_pattern or {}
        if module in pattern:
            return pattern[module]
        return next((rank for key, rank in pattern.items() if module.endswith("." + key)), self.r)

    def _check_allocator(self, owner: str) -> None:
        alloc = self.allocator
        if self.method_class.uses_allocator:
            if alloc is None:
                raise ValueError(
                    f"{owner}: method={self.method!r} needs allocator=AllocatorConfig(total_step=..., target_r=...) "
                    "(AdaLoRA's budget schedule needs the run's total number of optimizer steps)"
                )
            if alloc.ranks_change and alloc.target_r > (alloc.avg_rank or self.r):
                raise ValueError(
                    f"{owner}: allocator.target_r ({alloc.target_r}) must be <= r ({alloc.avg_rank or self.r}), "
                    "the initial (average) rank that AdaLoRA prunes down from"
                )
            h = self.hyper
            if self.allocator.compact != "off" and self.source == "hyper" and (
                    h.tokens != "rank" or h.arch != "mlp" or h.context or h.rank_span not in (None, 1)):
                raise ValueError(
                    f"{owner}: allocator.compact={self.allocator.compact!r} with source='hyper' needs hyper.tokens='rank', "
                    "hyper.arch='mlp' and hyper.context=False: attention and convolution bodies and rank-position "
                    "embeddings read every rank component of a factor together, so cutting the pruned ones away would "
                    "change what the kept ones are generated as")
        elif alloc is not None and (alloc.ranks_change or not alloc.decides_before_wrap):
            allocating = ", ".join(repr(n) for n, m in METHOD_REGISTRY.items() if m.uses_allocator)
            before = ", ".join(repr(n) for n, p in POLICY_REGISTRY.items() if p.decides_before_wrap)
            raise ValueError(f"{owner}: allocator is only used with method={allocating}, not {self.method!r}, "
                             f"except allocator.policy={before} with then='none' (ranks decided before training)")

    @property
    def method_class(self) -> type[AdapterMethod]:
        """The registered class of :attr:`method` (what it supports: allocator, regulariser, inits)."""
        return METHOD_REGISTRY[self.method]
