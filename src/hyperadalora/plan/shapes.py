"""Model shapes for the planner: the linears of one block, exact parameter counts, presets.

Two block families are covered: ``llama`` (RMSNorm, grouped-query attention, SwiGLU MLP; also
SmolLM2, Mistral and Qwen2 shapes) and ``bert`` (post-LayerNorm BERT / RoBERTa / MPNet encoders).
A shape is read from a Hugging Face ``config.json`` or taken from :data:`PRESETS`.

Preset sources (the published ``config.json`` of each checkpoint):

| preset | checkpoint | hidden | intermediate | layers | heads | kv heads | vocab | tied |
|---|---|---|---|---|---|---|---|---|
| llama-1b | meta-llama/Llama-3.2-1B | 2048 | 8192 | 16 | 32 | 8 | 128256 | yes |
| llama-3b | meta-llama/Llama-3.2-3B | 3072 | 8192 | 28 | 24 | 8 | 128256 | yes |
| llama-8b | meta-llama/Llama-3.1-8B | 4096 | 14336 | 32 | 32 | 8 | 128256 | no |
| llama-13b | meta-llama/Llama-2-13b-hf | 5120 | 13824 | 40 | 40 | 40 | 32000 | no |
| llama-34b | codellama/CodeLlama-34b-hf | 8192 | 22016 | 48 | 64 | 8 | 32000 | no |
| llama-70b | meta-llama/Llama-3.1-70B | 8192 | 28672 | 80 | 64 | 8 | 128256 | no |
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FAMILIES = ("llama", "bert")
TASKS = ("causal-lm", "sequence-classification")
# model_type -> block family (HF config.json's "model_type").
MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert", "roberta": "bert",
               "mpnet": "bert"}


class PlanInputError(ValueError):
    """A model, precision or setup the planner cannot use (the message names the allowed values)."""


@dataclass(frozen=True)
class Linear:
    """One linear layer of a block: ``name`` (its module suffix), ``d_out x d_in``, and a bias or not."""

    name: str
    d_out: int
    d_in: int
    bias: bool

    @property
    def params(self) -> int:
        return self.d_out * self.d_in + (self.d_out if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    """The sizes that fix a transformer's parameters, activations and FLOPs.

    Attributes:
        name: A label for tables.
        family: ``llama`` or ``bert`` (the block's structure).
        hidden: Model width.
        intermediate: MLP width.
        layers: Number of blocks.
        heads: Query heads.
        kv_heads: Key / value heads (grouped-query attention; ``heads`` for plain attention).
        head_dim: Width of one head.
        vocab: Vocabulary size.
        task: ``causal-lm`` (an LM head over the vocabulary) or ``sequence-classification``.
        num_labels: Classes of a classification head.
        tied: The LM head shares the input embedding (``tie_word_embeddings``).
        attention_bias: Biases on q, k, v, o (llama family; Qwen2 has them on q, k, v only).
        qkv_bias_only: Biases on q, k, v but not o (Qwen2).
        max_positions: Learned position embeddings (bert family).
        type_vocab: Token-type embeddings (BERT; 0 for RoBERTa / MPNet).
        relative_buckets: MPNet's relative-attention buckets (0 for none).
        classifier: ``pooler`` (BERT: pooler dense + linear) or ``dense`` (RoBERTa / MPNet:
            a dense + out_proj head without a pooler).
        attention_names: Module suffixes of q, k, v and the attention output (bert family).
        hidden_dropout: Dropout after the attention output and the MLP (saved masks).
        attention_dropout: Dropout on the attention probabilities (forces the non-fused path).
    """

    name: str
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    task: str = "causal-lm"
    num_labels: int = 2
    tied: bool = False
    attention_bias: bool = False
    qkv_bias_only: bool = False
    max_positions: int = 0
    type_vocab: int = 0
    relative_buckets: int = 0
    classifier: str = "pooler"
    attention_names: tuple[str, ...] = ("query", "key", "value", "attention.output.dense")
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise PlanInputError(f"ModelShape.family={self.family!r}; allowed values: {', '.join(FAMILIES)}")
        if self.task not in TASKS:
            raise PlanInputError(f"ModelShape.task={self.task!r}; allowed values: {', '.join(TASKS)}")
        for f in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab"):
            if getattr(self, f) < 1:
                raise PlanInputError(f"ModelShape.{f}={getattr(self, f)} must be >= 1")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def block_linears(self) -> list[Linear]:
        """The linears of one block, in module order, named by their HF module suffix."""
        h, f = self.hidden, self.intermediate
        if self.family == "llama":
            qkv_b = self.attention_bias or self.qkv_bias_only
            return [Linear("q_proj", self.q_dim, h, qkv_b), Linear("k_proj", self.kv_dim, h, qkv_b),
                    Linear("v_proj", self.kv_dim, h, qkv_b), Linear("o_proj", h, self.q_dim, self.attention_bias),
                    Linear("gate_proj", f, h, False), Linear("up_proj", f, h, False),
                    Linear("down_proj", h, f, False)]
        attn = [Linear(n, h, h, True) for n in self.attention_names]
        return attn + [Linear("intermediate.dense", f, h, True), Linear("output.dense", h, f, True)]

    def head_linears(self) -> list[Linear]:
        """Linears after the blocks: the pooler / classifier or the LM head (tied: none)."""
        h = self.hidden
        if self.task == "causal-lm":
            return [] if self.tied else [Linear("lm_head", self.vocab, h, False)]
        if self.family == "llama":
            return [Linear("score", self.num_labels, h, False)]
        if self.classifier == "pooler":
            return [Linear("pooler.dense", h, h, True), Linear("classifier", self.num_labels, h, True)]
        return [Linear("classifier.dense", h, h, True), Linear("classifier.out_proj", self.num_labels, h, True)]

    def adaptable_head_linears(self) -> list[Linear]:
        """Head-side linears that ``all-linear`` adapts (BERT's pooler; never a task head)."""
        return [lin for lin in self.head_linears() if lin.name == "pooler.dense"]

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts: ``embeddings``, ``blocks``, ``final_norm``, ``head``, ``total``."""
        h = self.hidden
        block = sum(lin.params for lin in self.block_linears())
        if self.family == "llama":
            block += 2 * h  # two RMSNorm weights
            emb, final_norm = self.vocab * h, h
        else:
            block += 4 * h  # two LayerNorms (weight + bias)
            emb = (self.vocab + self.max_positions + self.type_vocab) * h + 2 * h  # + embedding LayerNorm
            final_norm = 0
        blocks = self.layers * block + self.relative_buckets * self.heads
        head = sum(lin.params for lin in self.head_linears())
        return {"embeddings": emb, "blocks": blocks, "final_norm": final_norm, "head": head,
                "total": emb + blocks + final_norm + head}

    def replace(self, **changes) -> ModelShape:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _llama(name: str, hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tied: bool) -> ModelShape:
    return ModelShape(name, "llama", hidden, inter, layers, heads, kv, hidden // heads, vocab, tied=tied)


PRESETS: dict[str, ModelShape] = {
    "llama-1b": _llama("llama-1b", 2048, 8192, 16, 32, 8, 128256, True),
    "llama-3b": _llama("llama-3b", 3072, 8192, 28, 24, 8, 128256, True),
    "llama-8b": _llama("llama-8b", 4096, 14336, 32, 32, 8, 128256, False),
    "llama-13b": _llama("llama-13b", 5120, 13824, 40, 40, 40, 32000, False),
    "llama-34b": _llama("llama-34b", 8192, 22016, 48, 64, 8, 32000, False),
    "llama-70b": _llama("llama-70b", 8192, 28672, 80, 64, 8, 128256, False),
}


def shape_from_hf_config(config: dict, name: str = "model", task: str | None = None,
                         num_labels: int = 2) -> ModelShape:
    """Reads a Hugging Face ``config.json`` dict.

    Args:
        config: The parsed ``config.json``.
        name: Label for tables.
        task: ``causal-lm`` or ``sequence-classification``; ``None``: causal-lm for the llama
            family, sequence-classification for encoders.
        num_labels: Classes of a classification head.

    Raises:
        PlanInputError: A ``model_type`` outside :data:`MODEL_TYPES`.
    """
    mtype = config.get("model_type")
    if mtype not in MODEL_TYPES:
        raise PlanInputError(f"model_type {mtype!r} is not covered by the planner; supported: "
                             f"{', '.join(sorted(MODEL_TYPES))}")
    family = MODEL_TYPES[mtype]
    heads = config["num_attention_heads"]
    common = dict(name=name, family=family, hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                  layers=config["num_hidden_layers"], heads=heads, vocab=config["vocab_size"], num_labels=num_labels,
                  task=task or ("causal-lm" if family == "llama" else "sequence-classification"))
    if family == "llama":
        return ModelShape(kv_heads=config.get("num_key_value_heads") or heads,
                          head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                          tied=bool(config.get("tie_word_embeddings", False)),
                          attention_bias=bool(config.get("attention_bias", False)),
                          qkv_bias_only=mtype == "qwen2", hidden_dropout=0.0,
                          attention_dropout=float(config.get("attention_dropout", 0.0)), **common)
    return ModelShape(kv_heads=heads, head_dim=config["hidden_size"] // heads,
                      max_positions=config.get("max_position_embeddings", 0),
                      type_vocab=config.get("type_vocab_size", 0),
                      attention_names=("attn.q", "attn.k", "attn.v", "attn.o") if mtype == "mpnet" else
                      ModelShape.attention_names,
                      relative_buckets=config.get("relative_attention_num_buckets", 0) if mtype == "mpnet" else 0,
                      classifier="pooler" if mtype == "bert" else "dense",
                      tied=bool(config.get("tie_word_embeddings", True)),
                      hidden_dropout=float(config.get("hidden_dropout_prob", 0.0)),
                      attention_dropout=float(config.get("attention_probs_dropout_prob", 0.0)), **common)


def resolve_shape(name_or_path: str, task: str | None = None, num_labels: int = 2) -> ModelShape:
    """A preset name, a packaged short name (``minilm``, ``mpnet``, ``smollm2``), a model folder or
    a ``config.json`` path, as a :class:`ModelShape`.

    Raises:
        PlanInputError: Not a preset, packaged name, folder or file.
    """
    key = str(name_or_path)
    if key in PRESETS:
        shape = PRESETS[key]
        return shape if task in (None, shape.task) else shape.replace(task=task, num_labels=num_labels)
    from ..models import SHORT_NAMES, resolve_model_path

    path = Path(key).expanduser()
    if key in SHORT_NAMES:
        path = Path(resolve_model_path(key))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanInputError(f"unknown model {key!r}: use a preset ({', '.join(PRESETS)}), a packaged model "
                             f"({', '.join(SHORT_NAMES)}), a model folder or a config.json path")
    return shape_from_hf_config(json.loads(path.read_text()), name=key, task=task, num_labels=num_labels)
