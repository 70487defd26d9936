"""Evaluation metrics: GLUE classification, BLEU-4 / ROUGE-1 generation, GSM8K exact match.

Scales differ on purpose, following what each benchmark reports:

* GLUE metrics (:func:`accuracy`, :func:`f1_binary`, :func:`matthews_corrcoef`) are fractions
  in ``[0, 1]`` (MCC in ``[-1, 1]``), as ``sklearn`` / the GLUE scripts return them.
* :func:`bleu4` and :func:`rouge1` are on the ``0-100`` scale, as sacrebleu reports BLEU.
* :func:`gsm8k_exact_match` is a fraction in ``[0, 1]``.

Every function checks that predictions and references have the same, non-zero length and
raises :class:`ValueError` otherwise: a silently truncated ``zip`` would report a wrong score.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "cola": ("accuracy", "matthews_corrcoef"),
}


def _as_list(values: Any, name: str) -> list:
    # numpy arrays / torch tensors: tolist() gives plain Python scalars, which hash by value
    # (0-d tensors hash by identity, which would break the class counts below).
    if hasattr(values, "tolist"):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence (list, tuple, array), got {type(values).__name__}")
    return list(values)


def _paired(predictions: Any, references: Any, ref_name: str = "labels") -> tuple[list, list]:
    preds = _as_list(predictions, "predictions")
    refs = _as_list(references, ref_name)
    if len(preds) != len(refs):
        raise ValueError(f"length mismatch: {len(preds)} predictions but {len(refs)} {ref_name}")
    if not preds:
        raise ValueError(f"empty input: no predictions and no {ref_name} to score")
    return preds, refs


def _strings(values: list, name: str) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{i}] must be a str, got {type(value).__name__}")


# --------------------------------------------------------------------------------------- GLUE


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    """Fraction of predictions equal to their label.

    Args:
        predictions: Predicted labels (ints, strings, or an array / tensor of them).
        labels: Gold labels, same length.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: On mismatched lengths or empty input.
    """
    preds, golds = _paired(predictions, labels)
    return sum(p == g for p, g in zip(preds, golds)) / len(preds)


def matthews_corrcoef(predictions: Sequence, labels: Sequence) -> float:
    """Matthews correlation coefficient, the GLUE CoLA metric (``sklearn`` semantics).

    Uses the multiclass generalisation (Gorodkin's R_K), which equals the usual
    ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))`` for two classes. With ``n`` samples,
    ``c`` correct, ``t_k`` true and ``p_k`` predicted counts of class ``k``::

        MCC = (c*n - sum_k p_k*t_k) / sqrt((n^2 - sum_k p_k^2) * (n^2 - sum_k t_k^2))

    Args:
        predictions: Predicted labels.
        labels: Gold labels, same length.

    Returns:
        MCC in ``[-1, 1]``; ``0.0`` when undefined (a zero denominator, e.g. every prediction
        or every label is the same class), as ``sklearn`` returns.

    Raises:
        ValueError: On mismatched lengths or empty input.
    """
    preds, golds = _paired(predictions, labels)
    n = len(preds)
    correct = sum(p == g for p, g in zip(preds, golds))
    pred_counts, true_counts = Counter(preds), Counter(golds)
    classes = set(pred_counts) | set(true_counts)
    # Integers throughout: exact until the final division, no overflow in Python.
    cov_pt = correct * n - sum(pred_counts[k] * true_counts[k] for k in classes)
    cov_pp = n * n - sum(v * v for v in pred_counts.values())
    cov_tt = n * n - sum(v * v for v in true_counts.values())
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return cov_pt / math.sqrt(cov_pp * cov_tt)


def f1_binary(predictions: Sequence, labels: Sequence, positive: Any = 1) -> float:
    """F1 of the positive class, the GLUE MRPC metric: ``2TP / (2TP + FP + FN)``.

    Args:
        predictions: Predicted labels.
        labels: Gold labels, same length.
        positive: The label counted as positive (MRPC: ``1`` = paraphrase).

    Returns:
        F1 in ``[0, 1]``; ``0.0`` when there is no positive prediction and no positive label
        (``sklearn``'s ``zero_division=0``).

    Raises:
        ValueError: On mismatched lengths or empty input.
    """
    preds, golds = _paired(predictions, labels)
    tp = sum(p == positive and g == positive for p, g in zip(preds, golds))
    fp = sum(p == positive and g != positive for p, g in zip(preds, golds))
    fn = sum(p != positive and g == positive for p, g in zip(preds, golds))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def macro_f1(predictions: Sequence, labels: Sequence) -> float:
    """Unweighted mean of every class's F1 (:func:`f1_binary` of that class), over the classes that
    occur in ``labels`` or ``predictions`` (``sklearn``'s ``f1_score(average="macro")``).

    Raises:
        ValueError: On mismatched lengths or empty input.
    """
    preds, golds = _paired(predictions, labels)
    classes = set(preds) | set(golds)
    return sum(f1_binary(preds, golds, positive=c) for c in classes) / len(classes)


def glue_metrics(task: str, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The metrics GLUE reports for ``task``.

    Args:
        task: One of ``rte``, ``wnli``, ``sst2`` (accuracy), ``mrpc`` (accuracy, f1 of label 1),
            ``cola`` (accuracy, matthews_corrcoef).
        predictions: Predicted labels.
        labels: Gold labels, same length.

    Returns:
        ``{metric name: value}``, fractions in ``[0, 1]`` (MCC in ``[-1, 1]``).

    Raises:
        ValueError: For an unknown task, mismatched lengths or empty input.
    """
    if task not in GLUE_TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; allowed: {', '.join(GLUE_TASK_METRICS)}")
    preds, golds = _paired(predictions, labels)
    functions = {"accuracy": accuracy, "f1": f1_binary, "matthews_corrcoef": matthews_corrcoef}
    return {name: functions[name](preds, golds) for name in GLUE_TASK_METRICS[task]}


# --------------------------------------------------------------------------------- generation


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 with one reference per hypothesis, computed by sacrebleu.

    sacrebleu defaults: ``13a`` tokenisation, exponential smoothing, case-sensitive.

    Args:
        hypotheses: Generated texts.
        references: One reference text per hypothesis.

    Returns:
        BLEU on the **0-100** scale, as sacrebleu reports it.

    Raises:
        ValueError: On mismatched lengths, empty input or non-string items.
    """
    hyps, refs = _paired(hypotheses, references, "references")
    _strings(hyps, "hypotheses")
    _strings(refs, "references")
    import sacrebleu  # lazy: keeps `import hyperadalora.eval` light

    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


@lru_cache(maxsize=1)
def _rouge1_scorer():
    from rouge_score import rouge_scorer  # lazy: pulls in nltk

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1(hypotheses: list[str], references: list[str]) -> float:
    """Mean sentence-level ROUGE-1 F-measure, computed by ``rouge-score`` with Porter stemming.

    ``rouge-score``'s default tokenizer lowercases and keeps only ``[a-z0-9]`` tokens, so text
    without Latin letters or digits scores 0.

    Args:
        hypotheses: Generated texts.
        references: One reference text per hypothesis.

    Returns:
        The mean F-measure on the **0-100** scale (the F-measure times 100).

    Raises:
        ValueError: On mismatched lengths, empty input or non-string items.
    """
    hyps, refs = _paired(hypotheses, references, "references")
    _strings(hyps, "hypotheses")
    _strings(refs, "references")
    scorer = _rouge1_scorer()
    # RougeScorer.score takes (target, prediction): reference first.
    total = sum(scorer.score(ref, hyp)["rouge1"].fmeasure for hyp, ref in zip(hyps, refs))
    return 100.0 * total / len(hyps)


# -------------------------------------------------------------------------------------- GSM8K

# A number: an optional sign (only where it cannot be a subtraction / range dash, i.e. not right
# after a word character) and "$" in either order, then digits with proper thousands groups
# ("1,234"; a list "1,2,3" is three numbers), optional decimals. A trailing "." is never part
# of it. No number starts right after a letter or digit ("CO2", "x2" are not numbers).
_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[-+\u2212]?)\$?(?P<sign2>[-\u2212]?)"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_FINAL_MARKER = "####"


def _canonical(match: re.Match) -> str | None:
    try:
        value = Decimal(match.group("num").replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex only matches valid decimals
        return None
    signs = match.group("sign") + match.group("sign2")
    if "-" in signs or "\u2212" in signs:  # "-5", "-$5", "$-5", unicode minus
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # "3.0" -> "3", "-0" -> "0", no exponent for big values
    return format(value.normalize(), "f")  # "3.50" -> "3.5"


def extract_final_number(text: str) -> str | None:
    """The final numeric answer in a GSM8K-style solution, as a canonical string.

    Convention (GSM8K references end with ``#### <answer>``):

    * If ``####`` occurs, the answer is the first number after its first occurrence (a model
      that keeps generating after its answer often writes more "questions" and "####"s).
      If no number follows ``####``, the answer is ``None``: the marker promised an answer.
    * Otherwise the answer is the last number in the text.

    Thousands separators (``1,234``), a ``$`` sign and a trailing ``.`` are dropped. The result
    is canonical so that string equality is numeric equality: ``"3.0"`` -> ``"3"``,
    ``"3.50"`` -> ``"3.5"``, ``"-0"`` -> ``"0"``. A ``-`` directly after a word character or
    digit (``"10-3"``) is read as a dash, not a sign.

    Args:
        text: A model output or a GSM8K reference answer.

    Returns:
        The canonical number string, or ``None`` when there is no number.

    Examples:
        >>> extract_final_number("so she has 72 left.\\n#### 1,234")
        '1234'
        >>> extract_final_number("The answer is $5.")
        '5'
        >>> extract_final_number("no number") is None
        True
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    marker = text.find(_FINAL_MARKER)
    if marker >= 0:
        match = _NUMBER.search(text, marker + len(_FINAL_MARKER))
        return _canonical(match) if match else None
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def gsm8k_exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose final number equals the reference's final number.

    Both sides go through :func:`extract_final_number` and are compared numerically
    (``Decimal``), so ``"#### 3.0"`` matches ``"#### 3"``. A prediction without a number is wrong.

    Args:
        predictions: Model outputs.
        references: GSM8K reference solutions (``... #### 72``) or bare answers (``"72"``).

    Returns:
        Exact-match accuracy in ``[0, 1]``.

    Raises:
        ValueError: On mismatched lengths, empty input, non-string items, or a reference
            without a number (a data error, not a wrong answer).
    """
    preds, refs = _paired(predictions, references, "references")
    _strings(preds, "predictions")
    _strings(refs, "references")
    correct = 0
    for i, (pred, ref) in enumerate(zip(preds, refs)):
        gold = extract_final_number(ref)
        if gold is None:
            raise ValueError(f"references[{i}] has no final number: {ref[-80:]!r}")
        guess = extract_final_number(pred)
        correct += guess is not None and Decimal(guess) == Decimal(gold)
    return correct / len(preds)
