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
=============  ==================  ======================================  =========================

Rows come from the data directory (``--data-dir`` / ``data_dir`` / ``$HYPERADALORA_DATA_DIR``),
else from the Hugging Face hub through ``datasets`` when it is installed and online
(:func:`resolve_data`). Instruction tasks train a causal LM with the loss on the response only
(:mod:`hyperadalora.data.instruct`) and are evaluated by greedy generation.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.glue import DATA_DIR_ENV, GlueExample, read_glue, resolve_data_dir
from .data.instruct import has_chat_template

GLUE_TASKS = ("rte", "wnli", "sst2", "mrpc", "cola")
INSTRUCTION_TASKS = ("alpaca", "gsm8k", "instruct")
EVAL_ONLY_TASKS = ("humaneval",)
ALL_TASKS = GLUE_TASKS + INSTRUCTION_TASKS + EVAL_ONLY_TASKS
HUB = "hub"  # what resolve_data returns when rows come from the Hugging Face hub
# Codex / HumanEval stop sequences: a completion ends where the next top-level block begins.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n```")
# A chat model answers in a fenced block that holds the whole function (see humaneval_prompt); it
# ends at the fence or at top-level code that would run on import (tests, prints).
HUMANEVAL_CHAT_STOPS = ("\n```", "\nif __name__", "\nprint(", "\nassert")
HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
_HUB_GLUE_COLUMNS = {"rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
                     "mrpc": ("sentence1", "sentence2"), "sst2": ("sentence", None), "cola": ("sentence", None)}


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs from the model and how it is scored.

    Attributes:
        name: The task name.
        model_task: ``sequence-classification`` or ``causal-lm`` (:func:`hyperadalora.models.load_model`).
        num_labels: Classes of the classification head (0 for causal LMs).
        primary_metric: The key of the headline metric in the evaluation results.
        eval_split: The name of the held-out split.
        trainable: Whether the task has training rows.
    """

    name: str
    model_task: str
    num_labels: int
    primary_metric: str
    eval_split: str
    trainable: bool = True


SPECS: dict[str, TaskSpec] = {
    **{t: TaskSpec(t, "sequence-classification", 2,
                   {"cola": "matthews_corrcoef", "mrpc": "f1"}.get(t, "accuracy"), "dev")
       for t in GLUE_TASKS},
    "alpaca": TaskSpec("alpaca", "causal-lm", 0, "rouge1", "test"),
    "gsm8k": TaskSpec("gsm8k", "causal-lm", 0, "exact_match", "test"),
    "instruct": TaskSpec("instruct", "causal-lm", 0, "rouge1", "test"),
    "humaneval": TaskSpec("humaneval", "causal-lm", 0, "pass@1", "test", trainable=False),
}


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; raises ``ValueError`` naming the allowed tasks."""
    if name not in SPECS:
        raise ValueError(f"unknown task {name!r}; allowed values: {', '.join(ALL_TASKS)}")
    return SPECS[name]


def hub_available() -> bool:
    """Whether rows can come from the hub: ``datasets`` installed and no offline switch set."""
    offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return not offline and importlib.util.find_spec("datasets") is not None


def no_data_message(task: str) -> str:
    return (f"no data for task {task!r}: pass --data-dir DIR (or data_dir=DIR) or set {DATA_DIR_ENV}=DIR, "
            f"a folder with {task}/ as in ../shared/data; or, when online, install `datasets` "
            "(pip install datasets) to read the Hugging Face hub")


def resolve_data(data_dir: str | os.PathLike | None, task: str) -> Path | str:
    """The data directory (``data_dir``, else ``$HYPERADALORA_DATA_DIR``), else :data:`HUB`.

    Raises:
        FileNotFoundError: The given directory does not exist.
        ValueError: No directory and no way to reach the hub (the message names both options).
    """
    if data_dir is not None or os.environ.get(DATA_DIR_ENV):
        return resolve_data_dir(data_dir).resolve()
    if hub_available():
        return HUB
    raise ValueError(no_data_message(task))


def _hub_load(path: str, name: str | None, split: str, task: str):
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(no_data_message(task)) from exc
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
    a, b = _HUB_GLUE_COLUMNS[task]
    return [GlueExample(r[a], r[b] if b else None, int(r["label"])) for r in rows]


# ------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Base: rows, batches and scoring for one task (see the module table).

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

    def train_rows(self) -> list:
        """The training rows (the first ``train_rows`` of them when set)."""
        raise NotImplementedError

    def eval_rows(self) -> list:
        """The held-out rows (the first ``eval_rows`` of them when set)."""
        raise NotImplementedError

    def collate(self, rows: Sequence) -> dict[str, torch.Tensor]:
        """One training micro-batch (with ``labels``) from rows."""
        raise NotImplementedError

    def evaluate(self, model, rows: Sequence) -> tuple[dict[str, float], list[dict]]:
        """``(metrics, per-row predictions)`` of ``model`` on ``rows``."""
        raise NotImplementedError

    def _limit(self, rows: list, n: int | None) -> list:
        return rows if n is None else rows[:n]


class GlueTask(Task):
    """GLUE sequence(-pair) classification, scored on the dev rows with :func:`glue_metrics`."""

    def train_rows(self) -> list[GlueExample]:
        return self._limit(read_glue_rows(self.spec.name, "train", self.data), self.config.train_rows)

    def eval_rows(self) -> list[GlueExample]:
        return self._limit(read_glue_rows(self.spec.name, "dev", self.data), self.config.eval_rows)

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
    def evaluate(self, model, rows: Sequence[GlueExample]) -> tuple[dict[str, float], list[dict]]:
        from .eval.metrics import glue_metrics

        preds: list[int] = [0] * len(rows)
        size = self.config.eval_batch_size
        # Batches of similar length pad less; predictions go back to file order.
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].text_a) + len(rows[i].text_b or ""))
        for start in range(0, len(order), size):
            idx = order[start:start + size]
            logits = model(**self.encode([rows[i] for i in idx])).logits
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = int(p)
        labels = [r.label for r in rows]
        metrics = {k: float(v) for k, v in glue_metrics(self.spec.name, preds, labels).items()}
        metrics["num_examples"] = len(rows)
        predictions = [{"row": i, "label": lab, "prediction": p} for i, (lab, p) in enumerate(zip(labels, preds))]
        return metrics, predictions


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
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config,
                                   stopping_criteria=stops)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(generated[row, length:], skip_special_tokens=True)
    return out


class InstructionTask(Task):
    """Instruction tuning (Alpaca-style data, or GSM8K): response-only loss, greedy generation."""

    def _source(self) -> str:
        return self.config.data_source if self.spec.name == "instruct" else self.spec.name

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

    def _local_file(self) -> bool:
        return self.spec.name == "instruct" and Path(self.config.data_source).expanduser().is_file()

    def _held_out_tail(self, n_rows: int) -> int:
        return self.config.eval_rows or max(1, n_rows // 10)

    def train_rows(self) -> list:
        rows = self._read(self._source(), "train")
        if self._local_file() and self.config.eval_data_source is None:
            rows = rows[:-self._held_out_tail(len(rows))]  # the tail is held out for evaluation
            if not rows:
                raise ValueError(f"{self.config.data_source}: too few rows to hold some out for evaluation; "
                                 "set eval_data_source=<file> or a smaller eval_rows")
        return self._limit(rows, self.config.train_rows)

    def eval_rows(self) -> list:
        if self.spec.name == "instruct" and self.config.eval_data_source is not None:
            rows = self._read(self.config.eval_data_source, "test")
        elif self._local_file():
            rows = self._read(self._source(), "train")
            rows = rows[-self._held_out_tail(len(rows)):]
        else:
            rows = self._read(self._source(), "test")
        return self._limit(rows, self.config.eval_rows)

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

    def eval_rows(self) -> list:
        from .eval.sandbox import read_humaneval

        if self.data == HUB:
            rows = _hub_load("openai/openai_humaneval", None, "test", "humaneval")
            return self._limit([dict(r) for r in rows], self.config.eval_rows)
        path = Path(self.data) / "humaneval" / "HumanEval.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the data directory {self.data} has no humaneval/ "
                                    f"(set it with --data-dir DIR or {DATA_DIR_ENV}=DIR)")
        return self._limit(list(read_humaneval(path)), self.config.eval_rows)

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


def make_task(config: Any, data: Path | str) -> Task:
    """The :class:`Task` for ``config.task``."""
    spec = task_spec(config.task)
    if spec.name in GLUE_TASKS:
        return GlueTask(config, data)
    if spec.name in INSTRUCTION_TASKS:
        return InstructionTask(config, data)
    return HumanEvalTask(config, data)


__all__ = ["ALL_TASKS", "GLUE_TASKS", "HUB", "INSTRUCTION_TASKS", "GlueTask", "HumanEvalTask", "InstructionTask",
           "SPECS", "Task", "TaskSpec", "generate_greedy", "humaneval_completion", "humaneval_prompt", "make_task",
           "resolve_data", "task_spec", "truncate_at_stops"]
