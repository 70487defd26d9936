"""Integration: the real data files in ../shared/data and the real packaged MiniLM checkpoint."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from hyperadalora.data.glue import read_glue

pytestmark = pytest.mark.integration
DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Rows and label counts (label: count) as ../shared/data/README.md states them.
EXPECTED = {
    ("rte", "train"): (2490, {0: 1249, 1: 1241}),
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("wnli", "train"): (635, {0: 323, 1: 312}),
    ("wnli", "dev"): (71, {0: 40, 1: 31}),
    ("sst2", "train"): (67349, {0: 29780, 1: 37569}),
    ("sst2", "dev"): (872, {0: 428, 1: 444}),
    ("mrpc", "train"): (3668, {0: 1194, 1: 2474}),
    ("mrpc", "dev"): (408, {0: 129, 1: 279}),
    ("cola", "train"): (8551, {0: 2528, 1: 6023}),
    ("cola", "dev"): (1043, {0: 322, 1: 721}),
}


def needs_data(*relative: str) -> None:
    for rel in relative:
        if not (DATA_DIR / rel).is_file():
            pytest.skip(f"real data file {DATA_DIR / rel} not found (../shared/data beside the checkout)")


@pytest.mark.parametrize(("task", "split"), list(EXPECTED), ids=[f"{t}-{s}" for t, s in EXPECTED])
def test_real_glue_row_and_label_counts(task, split):
    needs_data(f"{task}/{split}.tsv")
    rows = read_glue(task, split, DATA_DIR)
    rows_expected, labels_expected = EXPECTED[(task, split)]
    assert len(rows) == rows_expected
    assert dict(Counter(r.label for r in rows)) == labels_expected
    assert all(r.text_a for r in rows)
    assert all((r.text_b is not None) == (task in ("rte", "wnli", "mrpc")) for r in rows)


def test_real_rows_that_default_csv_quoting_misparses():
    needs_data("rte/train.tsv", "mrpc/train.tsv", "cola/dev.tsv")
    rte = read_glue("rte", "train", DATA_DIR)
    assert rte[0].text_a == "No Weapons of Mass Destruction Found in Iraq Yet." and rte[0].label == 1
    assert rte[2164].text_a.startswith('"That film wasn\'t too successful')  # starts with a lone quote
    assert rte[2164].text_b == 'The film "WarGames" was shot in 1983.'
    mrpc = read_glue("mrpc", "train", DATA_DIR)  # BOM before the header
    assert mrpc[0].text_a.startswith("Amrozi accused his brother") and mrpc[0].label == 1
    cola = read_glue("cola", "dev", DATA_DIR)  # no header, no final newline
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks."
    assert cola[-1].text_a and "Who always drinks milk?" in {r.text_a for r in cola}


def test_real_minilm_forward_on_two_rte_rows():
    needs_data("rte/dev.tsv")
    from hyperadalora.models import load_model

    try:
        model, tokenizer = load_model("minilm", task="sequence-classification", num_labels=2)
    except FileNotFoundError as exc:  # the model package is not installed
        pytest.skip(str(exc))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    rows = read_glue("rte", "dev", DATA_DIR)[:2]
    batch = tokenizer([r.text_a for r in rows], [r.text_b for r in rows], truncation=True, max_length=128,
                      padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    labels = torch.tensor([r.label for r in rows])
    model.eval()
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == (2, 2)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # The encoder is pretrained (not random): the two different pairs get different [CLS] states.
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state[:, 0]
    assert not torch.allclose(hidden[0], hidden[1])
