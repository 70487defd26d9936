"""Integration: "fine-tune an LLM on my data" with the packaged SmolLM2, offline, as the README shows it.

One ``hyperadalora train instruct_smollm2_adalora data_source=my.jsonl`` run on a small JSONL
written here, then ``hyperadalora export``: the held-out rows are scored, and the exported
adapter loads in peft (base model from its ``base_model_name_or_path``) with our outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hyperadalora.cli import main
from hyperadalora.train import load_run, load_trained

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_network")]  # conftest: offline, no sockets
peft = pytest.importorskip("peft")

ROWS = [{"instruction": "Give the capital of the country.", "input": country, "output": capital}
        for country, capital in (("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                                 ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"))]
ROWS += [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ("cat", "dog", "sun", "map")]


def needs_smollm2() -> None:
    from hyperadalora.models import resolve_model_path

    try:
        resolve_model_path("smollm2")  # the converted cache folder (converted once from the GGUF)
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the packaged SmolLM2 is not available: {exc}")


def test_finetune_smollm2_on_my_jsonl_then_export_loads_in_peft(tmp_path, capsys):
    needs_smollm2()
    data = tmp_path / "my.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    code = main(["train", "instruct_smollm2_adalora", f"data_source={data}", "steps=3", "batch_size=2",
                 "max_length=64", "eval_rows=2", "max_new_tokens=8", "lr=1e-2", "run_name=mine", "export=peft",
                 "--output-dir", str(tmp_path / "runs"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run = Path(json.loads(out.strip().splitlines()[-1])["run_dir"])
    result = json.loads((run / "eval.json").read_text())
    assert result["status"] == "completed" and result["train_rows"] == len(ROWS) - 2
    final = result["final"]
    assert final["num_examples"] == 2 and 0.0 <= final["rouge1"] <= 1.0 and final["bleu4"] >= 0.0
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [r["output"] for r in ROWS[-2:]]  # the held-out tail

    config = load_run(run)  # the one command also exported the peft adapter (export=peft)
    ours, tokenizer = load_trained(config, run / "adapter")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(run / "peft_adapter"))
    batch = tokenizer(["Give the capital of the country. Norway", "Reverse the word. sun"], padding=True,
                      return_tensors="pt")
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        expected, got = ours(**batch).logits, theirs(**batch).logits
        base = theirs.get_base_model()
        with theirs.disable_adapter():
            bare = base(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (bare - expected).abs().max() > 1e-3  # the adapter really changed the outputs
