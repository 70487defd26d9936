"""Task definitions: where a task's rows come from, how they become batches, how it is scored.

=============  ==================  ======================================  =========================
task           model head          held-out rows                           primary metric
=============  ==================  ======================================  =========================
``rte``        classification (2)  GLUE dev                                accuracy
``wnli``       classification (2)  GLUE dev                                accuracy
``sst2``       classification (2)  GLUE dev                                accuracy
``mrpc``       classification (2)  GLUE dev                                F1 (accuracy also given)
``cola``       classification (2)  GLUE dev                                Matthews corr. (+ accuracy)
``alpaca``     causal LM           ``alpaca/test.jsonl``                   ROUGE-1 (and BLEU-4)
``gsm8k``      causal LM           ``gsm8k/test.jsonl``                    exact match, final number
``instruct``   causal LM           ``eval_data_source`` / held-out tail    ROUGE-1 (and BLEU-4)
``humaneval``  causal LM           ``humaneval/HumanEval.jsonl.gz``        pass@1 (evaluation only)
``classify``   classification (n)  ``eval_data_source`` / held-out tail    accuracy (+ macro F1)
=============  ==================  ======================================  =========================

Rows come from the data directory (``--data-dir`` / ``data_dir`` / ``$HYPERADALORA_DATA_DIR``),
else from the Hugging Face hub through ``datasets`` when online (:func:`resolve_data`). Every
task can instead read ``data_source`` (and ``eval_data_source``): a local JSON / JSONL / CSV /
Parquet file or folder, a ``save_to_disk`` folder, or a hub id when online
(:mod:`hyperadalora.data.user`); a single set of rows (a file) has its tail held out for
evaluation unless ``eval_data_source`` is set (:meth:`Task.source_train_rows`). GLUE tasks read
the hub's columns there (``sentence1`` / ``sentence2`` or ``sentence``, ``label``), ``classify``
reads ``text`` / ``text_pair`` / ``label`` with any labels (:mod:`hyperadalora.data.classify`).
Instruction tasks train a causal LM with the loss on the response only
(:mod:`hyperadalora.data.instruct`) and are evaluated by greedy generation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.glue import COLUMNS, DATA_DIR_ENV, GlueExample, glue_example_from_row, read_glue, resolve_data_dir
from .data.instruct import has_chat_template
from .data.user import check_online, is_single_set, load_user_rows, offline

GLUE_TASKS = ("rte", "wnli", "sst2", "mrpc", "cola")
INSTRUCTION_TASKS = ("alpaca", "gsm8k", "instruct")
EVAL_ONLY_TASKS = ("humaneval",)
USER_TASKS = ("classify",)
ALL_TASKS = GLUE_TASKS + INSTRUCTION_TASKS + EVAL_ONLY_TASKS + USER_TASKS
HUB = "hub"  # what resolve_data returns when rows come from the Hugging Face hub
# Codex / HumanEval stop sequences: a completion ends where the next top-level block begins.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
# A chat model answers in a fenced block that holds the whole function (see humaneval_prompt); it
# ends at the fence or at top-level code that would run on import (tests, prints).
HUMANEVAL_CHAT_STOPS = ("\n```", "\nif __name__", "\nprint(", "\nassert")
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
HUMANEVAL_COLUMNS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs from the model and how it is scored.

    Attributes:
        name: The task name.
        model_task: ``sequence-classification`` or ``causal-lm`` (:func:`hyperadalora.models.load_model`).
        num_labels: Classes of the classification head (0 for causal LMs, and for a classifier
            whose classes come from the data: ``RunConfig.labels``, see :func:`head_size`).
        primary_metric: The key of the headline metric in the evaluation results.
        eval_split: The name of the held-out split.
        trainable: Whether the task has training rows.
        needs_source: Whether ``data_source`` must be given (the task has no data of its own).
    """

    name: str
    model_task: str
    num_labels: int
    primary_metric: str
    eval_split: str
    trainable: bool = True
    needs_source: bool = False


SPECS: dict[str, TaskSpec] = {
    **{t: TaskSpec(t, "sequence-classification", 2,
                   {"cola": "matthews_corrcoef", "mrpc": "f1"}.get(t, "accuracy"), "dev")
       for t in GLUE_TASKS},
    "alpaca": TaskSpec("alpaca", "causal-lm", 0, "rouge1", "test"),
    "gsm8k": TaskSpec("gsm8k", "causal-lm", 0, "exact_match", "test"),
    "instruct": TaskSpec("instruct", "causal-lm", 0, "rouge1", "test", needs_source=True),
    "humaneval": TaskSpec("humaneval", "causal-lm", 0, "pass@1", "test", trainable=False),
    "classify": TaskSpec("classify", "sequence-classification", 0, "accuracy", "test", needs_source=True),
}


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; raises ``ValueError`` naming the allowed tasks."""
    if name not in SPECS:
        raise ValueError(f"unknown task {name!r}; allowed values: {', '.join(ALL_TASKS)}")
    return SPECS[name]


def head_size(config: Any) -> int:
    """Classes of ``config.task``'s head: the spec's, or ``len(config.labels)`` for labels from the data.

    Raises:
        ValueError: A classifier whose labels come from the data, but ``config.labels`` is not
            set yet (:meth:`Task.settle` sets it from the training rows).
    """
    spec = task_spec(config.task)
    if spec.model_task == "sequence-classification" and not spec.num_labels:
        if not config.labels:
            raise ValueError(f"task {config.task!r}: the head's classes are not known yet; they come from the "
                             "training rows (or set labels=[...])")
        return len(config.labels)
    return max(spec.num_labels, 1)


def hub_available() -> bool:
    """Whether rows can come from the hub: ``datasets`` installed and no offline switch set."""
    import importlib.util

    return offline() is None and importlib.util.find_spec("datasets") is not None


def no_data_message(task: str) -> str:
    return (f"no data for task {task!r}: pass --data-dir DIR (or data_dir=DIR) or set {DATA_DIR_ENV}=DIR, "
            f"a folder with {task}/ as in ../shared/data; or give your own rows with data_source=FILE; or, when "
            "online, install `datasets` (pip install datasets) to read the Hugging Face hub")


def resolve_data(data_dir: str | os.PathLike | None, task: str, data_source: str | None = None) -> Path | str:
    """The data directory (``data_dir``, else ``$HYPERADALORA_DATA_DIR``), else :data:`HUB`.

    With ``data_source`` set (rows from the user's source) no directory is needed: :data:`HUB`
    then stands for "no data directory", even offline.

    Raises:
        FileNotFoundError: The given directory does not exist.
        ValueError: No directory, no ``data_source`` and no way to reach the hub (the message
            names the options).
    """
    if data_dir is not None or os.environ.get(DATA_DIR_ENV):
        return resolve_data_dir(data_dir).resolve()
    if hub_available() or data_source is not None:
        return HUB
    raise ValueError(no_data_message(task))


def _hub_load(path: str, name: str | None, split: str, task: str):
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(no_data_message(task)) from exc
    check_online(path)
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # offline, unknown id, ...
        raise ValueError(f"{no_data_message(task)} (reading {path}"
                         f"{'/' + name if name else ''} from the hub failed: {type(exc).__name__}: {exc})") from exc


def read_glue_rows(task: str, split: str, data: Path | str) -> list[GlueExample]:
    """GLUE rows from the data directory, or from the hub (``nyu-mll/glue``) when ``data`` is :data:`HUB`."""
    if data != HUB:
        return read_glue(task, split, data)
    rows = _hub_load("nyu-mll/glue", task, {"train": "train", "dev": "validation"}[split], task)
    return [glue_example_from_row(task, r, f"nyu-mll/glue/{task} (hub, split {split}) row {i}")
            for i, r in enumerate(rows, start=1)]


# ------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Base: rows, batches and scoring for one task (see the module table).

    Rows come from the task's own data (:meth:`builtin_rows`: the data directory or the hub), or
    from ``data_source`` / ``eval_data_source`` (:meth:`read_source`) when the config names them.

    Args:
        config: The :class:`~hyperadalora.train.RunConfig`.
        data: The data directory or :data:`HUB` (:func:`resolve_data`).
    """

    def __init__(self, config: Any, data: Path | str) -> None:
        self.config = config
        self.data = data
        self.spec = task_spec(config.task)
        self.tokenizer: Any = None

    def bind(self, tokenizer: Any) -> None:
        """Sets the tokenizer that batches and evaluation use."""
        self.tokenizer = tokenizer

    def settle(self, config: Any) -> Any:
        """``config`` with what the data decided recorded in it (here nothing; ``classify``: its labels)."""
        return config

    def builtin_rows(self, split: str) -> list:
        """The rows of the task's own data set (``train`` or :attr:`TaskSpec.eval_split`)."""
        raise ValueError(f"task {self.spec.name!r} has no data of its own: set data_source=<a file, folder or hub id>")

    def read_source(self, source: str, split: str) -> list:
        """The rows of ``split`` of a user source (``data_source`` / ``eval_data_source``)."""
        raise NotImplementedError

    def train_rows(self) -> list:
        """The training rows (the first ``train_rows`` of them when set)."""
        rows = self.source_train_rows() if self.config.data_source is not None else self.builtin_rows("train")
        return self._limit(rows, self.config.train_rows)

    def eval_rows(self) -> list:
        """The held-out rows (the first ``eval_rows`` of them when set)."""
        if self.config.data_source is None and self.config.eval_data_source is None:
            return self._limit(self.builtin_rows(self.spec.eval_split), self.config.eval_rows)
        return self._limit(self.source_eval_rows(), self.config.eval_rows)

    def source_train_rows(self) -> list:
        """``data_source``'s training rows; a single set of rows (a file) loses its held-out tail
        (the last ``eval_rows`` rows, 10% if null) unless ``eval_data_source`` is set."""
        source = self.config.data_source
        rows = self.read_source(source, "train")
        if is_single_set(source) and self.config.eval_data_source is None:
            rows = rows[:-self._held_out_tail(len(rows))]  # the tail is held out for evaluation
            if not rows:
                raise ValueError(f"{source}: too few rows to hold some out for evaluation; "
                                 "set eval_data_source=<file> or a smaller eval_rows")
        return rows

    def source_eval_rows(self) -> list:
        """``eval_data_source``'s rows; else the held-out tail of a single set, else ``data_source``'s eval split."""
        config = self.config
        if config.eval_data_source is not None:
            return self.read_source(config.eval_data_source, self.spec.eval_split)
        if is_single_set(config.data_source):
            rows = self.read_source(config.data_source, "train")
            return rows[-self._held_out_tail(len(rows)):]
        return self.read_source(config.data_source, self.spec.eval_split)

    def collate(self, rows: Sequence) -> dict[str, torch.Tensor]:
        """One training micro-batch (with ``labels``) from rows."""
        raise NotImplementedError

    def evaluate(self, model, rows: Sequence) -> tuple[dict[str, float], list[dict]]:
        """``(metrics, per-row predictions)`` of ``model`` on ``rows``."""
        raise NotImplementedError

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many targets a batch's mean loss averages over (here its rows: one label each).

        Weighs each batch's loss when a loss is averaged over several batches
        (:func:`~hyperadalora.train.evaluate.held_out_loss`), so that the result is the mean over
        all targets, as one batch holding every row would give.
        """
        return int(batch["labels"].shape[0])

    def _held_out_tail(self, n_rows: int) -> int:
        return self.config.eval_rows or max(1, n_rows // 10)

    def _limit(self, rows: list, n: int | None) -> list:
        return rows if n is None else rows[:n]


class GlueTask(Task):
    """GLUE sequence(-pair) classification, scored on the dev rows with :func:`glue_metrics`.

    ``data_source`` rows have the hub's columns (``sentence1`` / ``sentence2`` or ``sentence``,
    and ``label``; :func:`~hyperadalora.data.glue.glue_example_from_row`).
    """

    def builtin_rows(self, split: str) -> list[GlueExample]:
        return read_glue_rows(self.spec.name, split, self.data)

    def read_source(self, source: str, split: str) -> list[GlueExample]:
        loaded = load_user_rows(source, split)
        a, b = COLUMNS[self.spec.name]
        loaded.require([c for c in (a, b, "label") if c is not None],
                       f"task {self.spec.name!r} reads the GLUE hub's columns (rename yours)")
        return [glue_example_from_row(self.spec.name, row, loaded.at(i)) for i, row in enumerate(loaded.rows)]

    def encode(self, rows: Sequence[GlueExample]) -> dict[str, torch.Tensor]:
        a = [r.text_a for r in rows]
        b = [r.text_b for r in rows] if rows and rows[0].text_b is not None else None
        return dict(self.tokenizer(a, b, truncation=True, max_length=self.config.max_length, padding=True,
                                   return_tensors="pt"))

    def collate(self, rows: Sequence[GlueExample]) -> dict[str, torch.Tensor]:
        batch = self.encode(rows)
        batch["labels"] = torch.tensor([r.label for r in rows], dtype=torch.long)
        return batch

    @torch.no_grad()
    def predict(self, model, rows: Sequence[GlueExample]) -> list[int]:
        """The head's argmax class of every row, in row order."""
        preds: list[int] = [0] * len(rows)
        size = self.config.eval_batch_size
        # Batches of similar length pad less; predictions go back to file order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].text_a) + len(rows[i].text_b or ""))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            logits = model(**on_model_device(model, self.encode([rows[i] for i in idx]))).logits
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = int(p)
        return preds

    def score(self, preds: list[int], labels: list[int]) -> dict[str, float]:
        """The task's metrics (GLUE's)."""
        from .eval.metrics import glue_metrics

        return {k: float(v) for k, v in glue_metrics(self.spec.name, preds, labels).items()}

    def label_name(self, label: int) -> Any:
        """How predictions name class ``label`` (here: the class id)."""
        return label

    def evaluate(self, model, rows: Sequence[GlueExample]) -> tuple[dict[str, float], list[dict]]:
        preds = self.predict(model, rows)
        labels = [r.label for r in rows]
        metrics = self.score(preds, labels)
        metrics["num_examples"] = len(rows)
        predictions = [{"row": i, "label": self.label_name(lab), "prediction": self.label_name(p)}
                       for i, (lab, p) in enumerate(zip(labels, preds))]
        return metrics, predictions


class ClassifyTask(GlueTask):
    """A user's sequence(-pair) classification: ``text`` / ``text_pair`` / ``label`` rows, any labels.

    The head's classes are ``config.labels`` when set (a recorded run), else the training
    split's labels in :func:`~hyperadalora.data.classify.label_order`; :meth:`settle` records
    them. Reading the held-out rows raises
    :class:`~hyperadalora.data.classify.UnseenLabelError` for a label the head lacks.
    """

    def __init__(self, config: Any, data: Path | str) -> None:
        super().__init__(config, data)
        self._labels: tuple[str, ...] | None = tuple(config.labels) if config.labels else None

    def read_source(self, source: str, split: str) -> list:
        from .data.classify import labelled_texts

        return labelled_texts(load_user_rows(source, split))

    def class_labels(self) -> tuple[str, ...]:
        """The head's classes, in order (read from the training rows when the config has none)."""
        if self._labels is None:
            from .data.classify import label_order

            self._labels = label_order(r.label for r in self.source_train_rows())
        return self._labels

    def settle(self, config: Any) -> Any:
        return config if config.labels else config.replace(labels=list(self.class_labels()))

    def _examples(self, rows: list, split: str) -> list[GlueExample]:
        from .data.classify import label_order, to_examples

        if self._labels is None and split == "training":
            self._labels = label_order(r.label for r in rows)
        fix = ("add rows with these labels to the training data, or drop them from the held-out rows"
               if split != "training" else "these labels were recorded with the run (labels in config.yaml): "
               "train a new run on this data")
        return to_examples(rows, self.class_labels(), split, fix)

    def train_rows(self) -> list[GlueExample]:
        return self._limit(self._examples(self.source_train_rows(), "training"), self.config.train_rows)

    def eval_rows(self) -> list[GlueExample]:
        return self._limit(self._examples(self.source_eval_rows(), "held-out"), self.config.eval_rows)

    def score(self, preds: list[int], labels: list[int]) -> dict[str, float]:
        from .eval.metrics import accuracy, macro_f1

        return {"accuracy": float(accuracy(preds, labels)), "macro_f1": float(macro_f1(preds, labels))}

    def label_name(self, label: int) -> Any:
        return self.class_labels()[label]


def model_device(model) -> torch.device:
    """Where ``model``'s parameters are (this rank's shards under FSDP)."""
    return next(model.parameters()).device


def on_model_device(model, batch: dict) -> dict:
    """``batch`` with its tensors on ``model``'s device (a no-op on the CPU; the tasks build batches there)."""
    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _StopOnStrings:
    """Stops each row once its decoded continuation contains a stop string.

    transformers' own ``stop_strings`` needs a tokenizer whose vocabulary it can map to text
    (byte-level BPE, SentencePiece) and fails on WordPiece; decoding the continuation works with
    any tokenizer, and costs little next to a forward pass at these lengths.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stops, self.prompt_length = tokenizer, tuple(stops), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        # input_ids: (batch, prompt_length + generated so far) -> (batch,) bool, True = this row is done
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


def generate_greedy(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                    batch_size: int, stop_strings: Sequence[str] | None = None) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded without the prompt.

    A row stops at EOS, after ``max_new_tokens``, or once its text contains one of ``stop_strings``
    (which stays in the returned text: cut it with :func:`truncate_at_stops`).
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    device = model_device(model)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))  # less padding per batch
    out: list[str] = [""] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), length), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = list(prompt_ids[i])
            ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq):] = 1
        stops = StoppingCriteriaList([_StopOnStrings(tokenizer, stop_strings, length)] if stop_strings else [])
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   generation_config=gen_config, stopping_criteria=stops)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(generated[row, length:], skip_special_tokens=True)
    return out


class InstructionTask(Task):
    """Instruction tuning (Alpaca-style data, or GSM8K): response-only loss, greedy generation.

    ``data_source`` rows are read by :func:`~hyperadalora.data.instruct.read_instruction_data`
    (``instruction`` / ``input`` / ``output`` and the other field names it accepts).
    """

    def _data_dir(self) -> Path | None:
        return None if self.data == HUB else Path(self.data)

    def _read(self, source: str, split: str) -> list:
        from .data.instruct import read_instruction_data

        if self.data == HUB and source in ("alpaca", "gsm8k"):
            hub = {"alpaca": ("tatsu-lab/alpaca", None), "gsm8k": ("openai/gsm8k", "main")}[source]
            if source == "alpaca" and split == "test":
                raise ValueError(f"{no_data_message(self.spec.name)} (the hub's Alpaca has no test split: the "
                                 "held-out rows are alpaca/test.jsonl in the data directory)")
            from .data.instruct import example_from_row

            rows = _hub_load(hub[0], hub[1], split, self.spec.name)
            return [example_from_row(r, f"{hub[0]} (hub, split {split}) row {i}") for i, r in enumerate(rows, start=1)]
        return read_instruction_data(source, split, self._data_dir())

    def builtin_rows(self, split: str) -> list:
        return self._read(self.spec.name, split)

    def read_source(self, source: str, split: str) -> list:
        return self._read(source, split)

    def collate(self, rows: Sequence) -> dict[str, torch.Tensor]:
        from .data.instruct import CausalLMCollator, build_causal_lm_features

        features = build_causal_lm_features(rows, self.tokenizer, self.config.max_length)
        return CausalLMCollator(self.tokenizer)(features)

    @torch.no_grad()
    def evaluate(self, model, rows: Sequence) -> tuple[dict[str, float], list[dict]]:
        from .data.instruct import encode_prompts, prompts_and_references

        prompts, refs = prompts_and_references(rows, self.tokenizer)
        hyps = generate_greedy(model, self.tokenizer, encode_prompts(prompts, self.tokenizer),
                               self.config.max_new_tokens, self.config.eval_batch_size)
        metrics = self.score(hyps, refs)
        metrics["num_examples"] = len(rows)
        predictions = [{"row": i, "prompt": p, "reference": r, "generation": h}
                       for i, (p, r, h) in enumerate(zip(prompts, refs, hyps))]
        return metrics, predictions

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The response tokens the causal-LM loss averages over (labels shifted by one, -100 ignored)."""
        from .data.instruct import IGNORE_INDEX

        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        from .eval import metrics as m

        if self.spec.name == "gsm8k":
            return {"exact_match": float(m.gsm8k_exact_match(hyps, refs))}
        return {"bleu4": float(m.bleu4(hyps, refs)), "rouge1": float(m.rouge1(hyps, refs))}


def truncate_at_stops(text: str, stops: Sequence[str] = HUMANEVAL_STOPS) -> str:
    """``text`` up to the first stop sequence (the HumanEval / Codex convention)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def humaneval_prompt(code: str, tokenizer: Any) -> str:
    """The text a model continues a HumanEval problem from.

    Without a chat template: the problem's ``prompt`` itself, whose function body the model
    writes (the Codex convention). With one (an instruction-tuned model answers a bare function
    stub with prose): one user turn asking to complete the function, then the assistant's turn
    opened with a code fence, in which the model writes the whole function (see
    :func:`humaneval_completion`).

    Args:
        code: The HumanEval ``prompt`` (imports, signature and docstring).
        tokenizer: A Hugging Face tokenizer.
    """
    if not has_chat_template(tokenizer):
        return code
    turn = tokenizer.apply_chat_template([{"role": "user", "content": HUMANEVAL_INSTRUCTION.format(prompt=code)}],
                                         tokenize=False, add_generation_prompt=True)
    return turn + "```python\n"


def humaneval_completion(generated: str, chat: bool) -> str:
    """What follows the problem's ``prompt`` in the program run (``prompt + completion``).

    Without chat: the generated body up to the first top-level stop (:data:`HUMANEVAL_STOPS`).
    With chat: the fenced code up to its end (:data:`HUMANEVAL_CHAT_STOPS`), on a new line: it
    redefines the function the prompt declared (a stub whose docstring is its whole body), so
    the tests call the model's definition.
    """
    if not chat:
        return truncate_at_stops(generated)
    return "\n" + truncate_at_stops(generated, HUMANEVAL_CHAT_STOPS)


class HumanEvalTask(Task):
    """HumanEval: greedy completions of each prompt, pass@1 of the tests run in a sandbox."""

    def train_rows(self) -> list:
        raise ValueError("task 'humaneval' is evaluation only (164 problems, no training split): train on "
                         "task=alpaca or task=instruct, then run `hyperadalora eval RUN_DIR task=humaneval`")

    def builtin_rows(self, split: str) -> list:
        from .eval.sandbox import read_humaneval

        if self.data == HUB:
            return [dict(r) for r in _hub_load("openai/openai_humaneval", None, "test", "humaneval")]
        path = Path(self.data) / "humaneval" / "HumanEval.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the data directory {self.data} has no humaneval/ "
                                    f"(set it with --data-dir DIR or {DATA_DIR_ENV}=DIR)")
        return list(read_humaneval(path))

    def read_source(self, source: str, split: str) -> list:
        loaded = load_user_rows(source, split)
        loaded.require(HUMANEVAL_COLUMNS, "HumanEval problems have task_id, prompt, test and entry_point")
        return loaded.rows

    def source_eval_rows(self) -> list:
        # Evaluation only: every problem of the source is held out, none trained on.
        return self.read_source(self.config.eval_data_source or self.config.data_source, "test")

    @torch.no_grad()
    def evaluate(self, model, rows: Sequence) -> tuple[dict[str, float], list[dict]]:
        from .data.instruct import encode_prompts
        from .eval.sandbox import humaneval_pass_at_1

        chat = has_chat_template(self.tokenizer)
        prompts = [humaneval_prompt(p["prompt"], self.tokenizer) for p in rows]
        raw = generate_greedy(model, self.tokenizer, encode_prompts(prompts, self.tokenizer),
                              self.config.max_new_tokens, self.config.eval_batch_size,
                              stop_strings=HUMANEVAL_CHAT_STOPS if chat else HUMANEVAL_STOPS)
        completions = [humaneval_completion(c, chat) for c in raw]
        score, results = humaneval_pass_at_1(list(rows), completions, timeout_s=self.config.sandbox_timeout_s,
                                             memory_mb=self.config.sandbox_memory_mb,
                                             workers=self.config.sandbox_workers)
        predictions = [{"row": i, "task_id": p["task_id"], "completion": c, "passed": r.passed, "status": r.status}
                       for i, (p, c, r) in enumerate(zip(rows, completions, results))]
        return {"pass@1": float(score), "num_examples": len(rows)}, predictions


TASK_TYPES: dict[str, type[Task]] = {**{t: GlueTask for t in GLUE_TASKS},
                                     **{t: InstructionTask for t in INSTRUCTION_TASKS},
                                     "humaneval": HumanEvalTask, "classify": ClassifyTask}


def make_task(config: Any, data: Path | str) -> Task:
    """The :class:`Task` for ``config.task`` (:data:`TASK_TYPES`)."""
    return TASK_TYPES[task_spec(config.task).name](config, data)


__all__ = ["ALL_TASKS", "ClassifyTask", "GLUE_TASKS", "HUB", "INSTRUCTION_TASKS", "GlueTask", "HumanEvalTask",
           "InstructionTask", "SPECS", "TASK_TYPES", "Task", "TaskSpec", "USER_TASKS", "generate_greedy", "head_size",
           "humaneval_completion", "humaneval_prompt", "make_task", "resolve_data", "task_spec", "truncate_at_stops"]
