"""Instruction-tuning data: reading it, and causal-LM features with the loss on the response only.

Sources (:func:`read_instruction_data`):

* ``alpaca``: ``<data dir>/alpaca/{train,test}.jsonl`` (Stanford Alpaca, as in ``../shared/data``);
* ``gsm8k``: ``<data dir>/gsm8k/{train,test}.jsonl`` (``question`` -> instruction, ``answer`` ->
  output, no input);
* a local file: ``.jsonl`` (one JSON object per line) or ``.json`` (a JSON array of objects, as
  the original ``alpaca_data.json``; a ``.json`` file whose first character is ``{`` is read as
  JSON Lines), read here so that errors name the file and line; a ``.csv`` or ``.parquet`` file
  (read through ``datasets``, :mod:`hyperadalora.data.user`; errors name the row);
* a local folder: ``<folder>/<split>.jsonl`` (or ``.json``), else a ``save_to_disk`` folder or
  ``<split>.csv`` / ``.parquet`` (through ``datasets``);
* anything else is taken as a Hugging Face hub dataset id and loaded with
  ``datasets.load_dataset(source, split=split)`` (needs network access: with
  ``HF_DATASETS_OFFLINE`` set it raises a ``ValueError`` naming the local alternatives).

The data directory is ``data_dir``, else ``$HYPERADALORA_DATA_DIR`` (see
:func:`hyperadalora.data.glue.resolve_data_dir`).

Accepted field names, the first one present wins (extra fields such as Open-Platypus's
``data_source`` or Magpie's ``conversations`` are ignored):

===============  ==============================  ==========================================
role             field names                     formats
===============  ==============================  ==========================================
instruction      ``instruction``, ``question``   Alpaca, Open-Platypus, Magpie; GSM8K
input            ``input``, ``context``          Alpaca, Open-Platypus; Dolly (optional;
                                                 missing or ``null`` means no input)
output           ``output``, ``answer``,         Alpaca, Open-Platypus; GSM8K; Magpie,
                 ``response``                    Dolly
===============  ==============================  ==========================================

Strings are kept exactly as in the source (no whitespace is stripped).

Prompt formats (:func:`format_prompt`): the tokenizer's chat template with one user turn holding
:attr:`InstructionExample.prompt_text` and the generation prompt, if the tokenizer has a chat
template; else the Stanford Alpaca template (``### Instruction:`` / ``### Input:`` /
``### Response:``). Features (:func:`build_causal_lm_features`) tokenize the prompt and the
response separately, so the label mask starts exactly where generation starts at evaluation time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperadalora.data.glue import DATA_DIR_ENV, resolve_data_dir
from hyperadalora.data.user import check_online, load_user_rows, names_a_file

IGNORE_INDEX = -100  # the label that torch's cross-entropy (and transformers' LM loss) skips
KNOWN_SOURCES: dict[str, tuple[str, ...]] = {"alpaca": ("train", "test"), "gsm8k": ("train", "test")}
INSTRUCTION_FIELDS = ("instruction", "question")
INPUT_FIELDS = ("input", "context")
OUTPUT_FIELDS = ("output", "answer", "response")

# Stanford Alpaca's two prompt templates (github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass(frozen=True)
class InstructionExample:
    """One instruction-following example.

    Attributes:
        instruction: The task.
        input: Optional context for the task (``""`` when there is none).
        output: The reference response.
    """

    instruction: str
    input: str
    output: str

    @property
    def has_input(self) -> bool:
        """Whether :attr:`input` holds more than whitespace."""
        return bool(self.input.strip())

    @property
    def prompt_text(self) -> str:
        """The user message: the instruction, then a blank line and the input if there is one.

        ``"Summarize this.\\n\\nThe text."``, or just ``"Summarize this."`` without input.
        """
        return f"{self.instruction}\n\n{self.input}" if self.has_input else self.instruction


# ----------------------------------------------------------------------------------------------
# Reading


def read_instruction_data(source: str, split: str = "train",
                          data_dir: str | os.PathLike | None = None) -> list[InstructionExample]:
    """Reads instruction data from a known data set, a local file or folder, or the hub.

    Args:
        source: ``alpaca`` or ``gsm8k`` (read from the data directory); a path to a ``.jsonl`` /
            ``.json`` file or to a folder holding ``<split>.jsonl``; otherwise a Hugging Face hub
            dataset id.
        split: ``train`` or ``test`` for the known data sets; the file name in a folder; the hub
            split. Ignored for a file path.
        data_dir: The data directory for the known data sets (see
            :func:`hyperadalora.data.glue.resolve_data_dir`); ignored otherwise.

    Returns:
        The examples in source order.

    Raises:
        ValueError: An unknown split of a known data set; no data directory given for one; a
            malformed row (invalid JSON, not an object, a missing required field or a non-string
            field: the message names the file and the 1-based line number); a file without
            examples; or a source that is neither known nor local and cannot be loaded from the
            hub (``datasets`` missing, offline, no such dataset).
        FileNotFoundError: The data directory, the split's file, or a ``.json`` / ``.jsonl``
            path does not exist; the message names the path.
    """
    if source in KNOWN_SOURCES:
        return _read_known(source, split, data_dir)
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path) if path.suffix in (".jsonl", ".json") else _read_table(source, split)
    if path.is_dir():
        for suffix in (".jsonl", ".json"):
            if (path / f"{split}{suffix}").is_file():
                return _read_file(path / f"{split}{suffix}")
        try:
            return _read_table(source, split)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path} holds neither {split}.jsonl nor {split}.json ({exc})") from exc
    if names_a_file(source):  # clearly meant as a file, so never a hub id
        raise FileNotFoundError(f"instruction data file {path} not found")
    return _read_hub(source, split)


def _read_table(source: str, split: str) -> list[InstructionExample]:
    """A CSV / Parquet file or a ``save_to_disk`` folder, read through ``datasets``."""
    loaded = load_user_rows(source, split)
    examples = [example_from_row(row, loaded.at(i)) for i, row in enumerate(loaded.rows)]
    if not examples:
        raise ValueError(f"{loaded.where}: no examples")
    return examples


def _read_known(source: str, split: str, data_dir: str | os.PathLike | None) -> list[InstructionExample]:
    splits = KNOWN_SOURCES[source]
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {source}; allowed values: {', '.join(splits)}")
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; pass --data-dir DIR or set {DATA_DIR_ENV}=DIR, a folder "
                                f"with {source}/{split}.jsonl as in ../shared/data") from exc
    path = root / source / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the data directory {root} has no {source} {split} split "
                                f"(set it with --data-dir DIR or {DATA_DIR_ENV}=DIR)")
    return _read_file(path)


def _read_file(path: Path) -> list[InstructionExample]:
    text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    rows = _json_array_rows(path, text) if path.suffix == ".json" and text.lstrip().startswith("[") \
        else _json_lines_rows(path, text)
    examples = [example_from_row(row, f"{path}:{line_no}") for line_no, row in rows]
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


def _json_lines_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    # Split on "\n" only: str.splitlines would also split inside JSON strings that hold a raw
    # U+2028 or U+0085, which json.dumps(..., ensure_ascii=False) writes unescaped.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():  # blank lines (e.g. a trailing one) are not rows
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column {exc.colno})") from exc


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Yields ``(line of the element's start, element)`` for a JSON array, one element at a time.

    Decoding element by element (instead of ``json.loads`` on the whole text) keeps the line
    number of every row, so a bad row can be reported where it is.
    """
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos = skip_ws(text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                row, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            yield line_of(pos), row
            pos = skip_ws(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip_ws(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise ValueError(f"{path}:{line_of(pos)}: invalid JSON (expected ',' or ']' after an array element)")
    if skip_ws(pos) != len(text):
        raise ValueError(f"{path}:{line_of(skip_ws(pos))}: invalid JSON (extra data after the array)")


def _field(row: Mapping[str, Any], names: Sequence[str], where: str, *, required: bool) -> str:
    for name in names:
        if name in row and not (row[name] is None and not required):
            value = row[name]
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise ValueError(f"{where}: missing field {' / '.join(repr(n) for n in names)} "
                         f"(the row has {', '.join(map(repr, row)) or 'no fields'})")
    return ""


def example_from_row(row: Any, where: str) -> InstructionExample:
    """Validates one record (a JSON object or a hub row) and turns it into an example.

    Args:
        row: A mapping with the field names in the module docstring's table.
        where: Where the row comes from, for error messages (e.g. ``"data.jsonl:12"``).

    Returns:
        The example.

    Raises:
        ValueError: ``row`` is not a mapping, lacks a required field, or has a non-string field;
            the message starts with ``where``.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return InstructionExample(instruction=_field(row, INSTRUCTION_FIELDS, where, required=True),
                              input=_field(row, INPUT_FIELDS, where, required=False),
                              output=_field(row, OUTPUT_FIELDS, where, required=True))


def _read_hub(source: str, split: str) -> list[InstructionExample]:
    advice = (f"{source!r} is not a known data set ({', '.join(KNOWN_SOURCES)}: read from --data-dir DIR "
              f"or {DATA_DIR_ENV}), not an existing local .jsonl/.json file or folder, and so was taken as a "
              "Hugging Face hub dataset id")
    try:
        import datasets  # optional, and slow to import: only for hub ids
    except ImportError as exc:
        raise ValueError(f"{advice}, but the `datasets` package is not installed (pip install datasets; "
                         "loading from the hub also needs network access)") from exc
    check_online(source)
    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:  # offline, no such dataset or split, ...: all are the same to the caller
        raise ValueError(f"{advice}, but loading it failed ({type(exc).__name__}: {exc})") from exc
    where = f"{source} (hub, split {split}) row"
    examples = [example_from_row(row, f"{where} {i}") for i, row in enumerate(loaded, start=1)]
    if not examples:
        raise ValueError(f"{source} (hub, split {split}): no examples")
    return examples


# ----------------------------------------------------------------------------------------------
# Prompts and features


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (an instruction-tuned model's), which prompts then use."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(example: InstructionExample, tokenizer: Any) -> str:
    """The text a model generates the response after.

    Args:
        example: The example.
        tokenizer: A Hugging Face tokenizer.

    Returns:
        With a chat template on the tokenizer: one user turn holding ``example.prompt_text``,
        followed by the assistant generation prompt. Without one: the Stanford Alpaca template
        (``### Instruction:``, ``### Input:`` when there is an input, ending in
        ``### Response:\\n``).
    """
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": example.prompt_text}],
                                             tokenize=False, add_generation_prompt=True)
    if example.has_input:
        return ALPACA_TEMPLATE_WITH_INPUT.format(instruction=example.instruction, input=example.input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=example.instruction)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts every encoded text with its BOS token (Llama-style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def encode_prompts(prompts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    """Token ids of formatted prompts, exactly as :func:`build_causal_lm_features` uses them.

    Special tokens are not added, except a BOS token where the tokenizer adds one by default and
    the prompt text does not already start with it (chat templates often write it). Evaluation
    should encode prompts with this function so that generation starts from the same tokens the
    model was trained on.

    Args:
        prompts: Formatted prompts (see :func:`format_prompt`).
        tokenizer: A Hugging Face tokenizer.

    Returns:
        One id list per prompt.
    """
    if not prompts:
        return []
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if not _adds_bos(tokenizer):
        return [list(ids) for ids in encoded]
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    return [list(ids) if text.startswith(bos_text) else [bos, *ids] for text, ids in zip(prompts, encoded)]


def _truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fits ``prompt + response`` into ``max_length`` tokens.

    The prompt loses tokens from the left first (its end, which leads into the response, is
    kept), but not below ``max_length // 2`` tokens; after that the response loses tokens from
    the right. So the response keeps at least ``max_length - max_length // 2 >= 1`` tokens.
    """
    overflow = len(prompt) + len(response) - max_length
    if overflow <= 0:
        return prompt, response
    keep_prompt = max(len(prompt) - overflow, min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep_prompt:]
    return prompt, response[:max_length - len(prompt)]


def build_causal_lm_features(examples: Iterable[InstructionExample], tokenizer: Any,
                             max_length: int) -> list[dict[str, list[int]]]:
    """Tokenizes examples for causal-LM fine-tuning with the loss on the response only.

    ``input_ids`` are the prompt tokens (:func:`encode_prompts` of :func:`format_prompt`), then
    the response tokens, then EOS; ``labels`` are ``-100`` on the prompt and equal the ids on the
    response and EOS. The prompt and the response are tokenized separately, so the boundary is
    exact. Sequences longer than ``max_length`` are truncated: the prompt from the left first, down
    to ``max_length // 2`` tokens, then the response from the right (a cut response loses its EOS).

    Args:
        examples: The examples.
        tokenizer: A Hugging Face tokenizer with an EOS token.
        max_length: The most tokens per feature (at least 1).

    Returns:
        One dict per example with ``input_ids``, ``attention_mask`` (all ones) and ``labels``.

    Raises:
        ValueError: ``max_length < 1``, or the tokenizer has no EOS token.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; responses need one so that the model learns to stop")
    examples = list(examples)
    prompts = encode_prompts([format_prompt(ex, tokenizer) for ex in examples], tokenizer)
    responses = tokenizer([ex.output for ex in examples], add_special_tokens=False)["input_ids"] if examples else []
    features = []
    for prompt, response in zip(prompts, responses):
        prompt, response = _truncate(prompt, [*response, eos], max_length)
        features.append({"input_ids": prompt + response,
                         "attention_mask": [1] * (len(prompt) + len(response)),
                         "labels": [IGNORE_INDEX] * len(prompt) + response})
    return features


class CausalLMCollator:
    """Batches features from :func:`build_causal_lm_features` by right-padding.

    Padding positions get the pad id (the EOS id if the tokenizer has no pad token) in
    ``input_ids``, ``0`` in ``attention_mask`` and ``-100`` in ``labels``.

    Args:
        tokenizer: The tokenizer the features were built with.
        pad_to_multiple_of: If set, the batch length is rounded up to a multiple of it.

    Raises:
        ValueError: The tokenizer has neither a pad nor an EOS token, or ``pad_to_multiple_of < 1``.
    """

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be at least 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        """Pads and stacks features.

        Args:
            features: Dicts with ``input_ids`` and ``labels`` of equal length, and optionally
                ``attention_mask`` (all ones if absent).

        Returns:
            ``input_ids``, ``attention_mask`` and ``labels``, each a ``(batch, length)`` long tensor.

        Raises:
            ValueError: No features, or a feature whose fields differ in length.
        """
        if not features:
            raise ValueError("cannot collate an empty list of features")
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            if len(f["labels"]) != n or ("attention_mask" in f and len(f["attention_mask"]) != n):
                raise ValueError(f"feature {i}: input_ids, labels and attention_mask differ in length")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {k: torch.full((len(features), length), fill, dtype=torch.long)
                 for k, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(list(f["input_ids"]), dtype=torch.long)
            batch["labels"][i, :n] = torch.as_tensor(list(f["labels"]), dtype=torch.long)
            batch["attention_mask"][i, :n] = torch.as_tensor(list(f.get("attention_mask", [1] * n)), dtype=torch.long)
        return batch


# ----------------------------------------------------------------------------------------------
# Evaluation


def prompts_and_references(examples: Iterable[InstructionExample], tokenizer: Any) -> tuple[list[str], list[str]]:
    """Formatted prompts to generate from, and the raw reference outputs.

    Args:
        examples: The evaluation examples.
        tokenizer: The tokenizer (its chat template decides the prompt format).

    Returns:
        ``(prompts, references)``: :func:`format_prompt` of each example, and its ``output``
        unchanged (for GSM8K, extract the final number with the metrics module). Encode the
        prompts with :func:`encode_prompts` to match training.
    """
    examples = list(examples)
    return [format_prompt(ex, tokenizer) for ex in examples], [ex.output for ex in examples]


@dataclass(frozen=True)
class GenerationPrompt:
    """One evaluation item: the formatted prompt and the reference output."""

    prompt: str
    reference: str

    @classmethod
    def from_example(cls, example: InstructionExample, tokenizer: Any) -> GenerationPrompt:
        """The prompt (:func:`format_prompt`) and the reference (``example.output``) of one example."""
        return cls(format_prompt(example, tokenizer), example.output)

    @staticmethod
    def prompts_and_references(examples: Iterable[InstructionExample],
                               tokenizer: Any) -> tuple[list[str], list[str]]:
        """The same as the module-level :func:`prompts_and_references`."""
        return prompts_and_references(examples, tokenizer)
