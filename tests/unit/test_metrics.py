"""Metrics against hand-computed values and against sacrebleu / rouge-score called directly."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from hyperadalora.eval.metrics import (
    accuracy,
    bleu4,
    extract_final_number,
    f1_binary,
    glue_metrics,
    gsm8k_exact_match,
    matthews_corrcoef,
    rouge1,
)


# ------------------------------------------------------------------------------------ GLUE


def test_accuracy_by_hand():
    # matches at positions 0 and 2 of 4
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(["entailment", "x"], ["entailment", "x"]) == 1.0


def test_arrays_and_tensors_are_accepted():
    assert accuracy(np.array([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 0.5
    assert matthews_corrcoef(torch.tensor([1, 0, 1, 0]), np.array([1, 0, 1, 0])) == pytest.approx(1.0)


def test_mcc_binary_by_hand():
    preds = [1, 1, 1, 0, 0, 0, 1, 0]
    golds = [1, 1, 0, 0, 0, 1, 1, 0]
    # TP = 3 (0, 1, 6), FP = 1 (2), TN = 3 (3, 4, 7), FN = 1 (5)
    # MCC = (3*3 - 1*1) / sqrt((3+1)(3+1)(3+1)(3+1)) = 8 / 16
    assert matthews_corrcoef(preds, golds) == pytest.approx(0.5)
    assert matthews_corrcoef(golds, golds) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - g for g in golds], golds) == pytest.approx(-1.0)


def _binary_mcc(preds, golds):
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, golds))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, golds))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, golds))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, golds))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def test_mcc_binary_matches_the_textbook_formula_on_random_data():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 40)
        preds = [rng.randint(0, 1) for _ in range(n)]
        golds = [rng.randint(0, 1) for _ in range(n)]
        assert matthews_corrcoef(preds, golds) == pytest.approx(_binary_mcc(preds, golds), abs=1e-12)


def test_mcc_multiclass_by_hand_and_as_one_hot_correlation():
    # n = 4, correct = 2; predicted counts {0: 2, 1: 1, 2: 1}, true counts {0: 1, 1: 2, 2: 1}
    # (2*4 - (2*1 + 1*2 + 1*1)) / sqrt((16 - 6) * (16 - 6)) = 3 / 10
    assert matthews_corrcoef([0, 1, 2, 0], [0, 1, 1, 2]) == pytest.approx(0.3)
    # Independent form: the correlation of the one-hot indicator matrices (Gorodkin 2004).
    rng = np.random.default_rng(1)
    preds, golds = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    x, y = np.eye(3)[preds], np.eye(3)[golds]
    x, y = x - x.mean(0), y - y.mean(0)
    expected = (x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())
    assert matthews_corrcoef(preds, golds) == pytest.approx(expected, abs=1e-12)


def test_mcc_is_zero_when_undefined():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions
    assert matthews_corrcoef([0, 1, 0], [1, 1, 1]) == 0.0  # constant labels


def test_f1_by_hand():
    preds = [1, 1, 0, 1, 0]
    golds = [1, 0, 0, 1, 1]
    # positive 1: TP = 2 (0, 3), FP = 1 (1), FN = 1 (4) -> 2*2 / (2*2 + 1 + 1) = 2/3
    assert f1_binary(preds, golds) == pytest.approx(2 / 3)
    # positive 0: TP = 1 (2), FP = 1 (4), FN = 1 (1) -> 2 / (2 + 1 + 1) = 1/2
    assert f1_binary(preds, golds, positive=0) == pytest.approx(0.5)
    assert f1_binary([0, 0], [0, 0]) == 0.0  # no positives anywhere: sklearn's zero_division=0


def test_glue_metrics_per_task():
    preds, golds = [1, 1, 0, 1, 0], [1, 0, 0, 1, 1]
    for task in ("rte", "wnli", "sst2"):
        assert glue_metrics(task, preds, golds) == {"accuracy": pytest.approx(0.6)}
    assert glue_metrics("mrpc", preds, golds) == {"accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    cola = glue_metrics("cola", preds, golds)
    assert set(cola) == {"accuracy", "matthews_corrcoef"}
    assert cola["matthews_corrcoef"] == pytest.approx(_binary_mcc(preds, golds))


def test_glue_metrics_unknown_task_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: rte, wnli, sst2, mrpc, cola"):
        glue_metrics("qnli", [1], [1])


@pytest.mark.parametrize("fn", [accuracy, matthews_corrcoef, f1_binary, bleu4, rouge1, gsm8k_exact_match,
                                lambda p, r: glue_metrics("rte", p, r)])
def test_mismatched_and_empty_inputs_raise(fn):
    with pytest.raises(ValueError, match="length mismatch: 2 predictions but 1"):
        fn(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="empty input"):
        fn([], [])


def test_a_string_is_not_a_sequence_of_labels():
    with pytest.raises(ValueError, match="must be a sequence"):
        accuracy("101", "101")


# ------------------------------------------------------------------------------ generation


def test_bleu4_by_hand_and_against_sacrebleu():
    import sacrebleu

    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat" (6 tokens each, BP = 1):
    # 1-grams 5/6, 2-grams 3/5, 3-grams 2/4, 4-grams 1/3 -> (1/12) ** (1/4)
    assert bleu4(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(100 * (1 / 12) ** 0.25)
    assert bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    hyps = ["The quick brown fox jumps over the lazy dog.", "Hello there, general Kenobi!", "nothing alike"]
    refs = ["A quick brown fox jumped over the lazy dog.", "Hello there, General Kenobi.", "totally different words"]
    assert bleu4(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)


def test_rouge1_by_hand_and_against_rouge_score():
    from rouge_score import rouge_scorer

    # hyp "the cats sat" -> [the, cat, sat] after stemming; ref has 6 tokens [the cat sat on the mat]
    # overlap 3: P = 3/3, R = 3/6, F = 2/3. Second pair: no overlap, F = 0. Mean: 1/3 -> 33.33
    assert rouge1(["the cats sat", "a b"], ["the cat sat on the mat", "c d"]) == pytest.approx(100 / 3)
    hyps = ["Police killed the gunman.", "The running dogs barked loudly", ""]
    refs = ["The gunman was shot dead by police.", "dogs run and bark", "empty hypothesis"]
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    expected = 100 * np.mean([scorer.score(r, h)["rouge1"].fmeasure for h, r in zip(hyps, refs)])
    assert rouge1(hyps, refs) == pytest.approx(expected)


def test_generation_metrics_reject_non_strings():
    with pytest.raises(ValueError, match=r"hypotheses\[1\] must be a str"):
        bleu4(["a", 3], ["a", "b"])


# ----------------------------------------------------------------------------------- GSM8K


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("The answer is $5.", "5"),
    ("-3", "-3"),
    ("no number", None),
    ("She pays 3 + 4 = 7 dollars.\n#### 7\n\nQuestion: 12 apples\n#### 99", "7"),  # first ####
    ("so 6 * 7 = 42 in all.\n#### 42.", "42"),
    ("total: 10-3=7", "7"),        # "-" after a digit is a dash, not a sign
    ("it lost -$12 today", "-12"),
    ("x = 3.0", "3"),              # canonical: integral values lose ".0"
    ("about 2.50 each", "2.5"),
    ("list 1,2,3", "3"),           # not a thousands separator
    ("CO2 levels", None),          # digits glued to letters are not numbers
    ("####", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_gsm8k_exact_match():
    preds = ["so ... #### 1,234", "The answer is $5.", "I think 7", "no number", "#### 3.0"]
    refs = ["#### 1234", "#### 5", "#### 8", "#### 3", "#### 3"]
    assert gsm8k_exact_match(preds, refs) == pytest.approx(3 / 5)


def test_gsm8k_reference_without_number_is_a_data_error():
    with pytest.raises(ValueError, match=r"references\[1\] has no final number"):
        gsm8k_exact_match(["1", "2"], ["#### 1", "oops"])


def test_gsm8k_real_references_extract_to_their_answer(gsm8k_file):
    answers = [json.loads(line)["answer"] for line in gsm8k_file.read_text(encoding="utf-8").splitlines()]
    assert [extract_final_number(a) for a in answers] == ["18", "276000", "-10"]
    for answer in answers:
        expected = answer.split("####")[-1].strip().replace(",", "")
        assert extract_final_number(answer) == expected
    assert gsm8k_exact_match(answers, answers) == 1.0
