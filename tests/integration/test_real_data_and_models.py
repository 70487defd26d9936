"""Integration: the real data files parse to the row counts their README states."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperadalora.data.glue import read_glue

pytestmark = pytest.mark.integration
DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Row counts from ../shared/data/README.md.
COUNTS = {"rte": (2490, 277), "wnli": (635, 71), "sst2": (67349, 872), "mrpc": (3668, 408), "cola": (8551, 1043)}


@pytest.mark.parametrize("task", list(COUNTS))
def test_real_glue_row_counts(task):
    if not DATA_DIR.is_dir():
        pytest.skip(f"real data not found at {DATA_DIR}")
    train, dev = (read_glue(task, split, DATA_DIR) for split in ("train", "dev"))
    assert (len(train), len(dev)) == COUNTS[task]
    assert {r.label for r in dev} == {0, 1}
