"""Instruction data: reading (known sets, local files, hub), prompts, response-only labels, collation."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from hyperadalora.data.glue import DATA_DIR_ENV
from hyperadalora.data.instruct import (IGNORE_INDEX, CausalLMCollator, GenerationPrompt, InstructionExample,
                                        build_causal_lm_features, encode_prompts, example_from_row,
                                        format_prompt, prompts_and_references, read_instruction_data)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<bot>"]
WORDS = ["say", "hi", "hello", "there", "add", "two", "and", "three", "five", "x", "y", "z"]
CHAT_TEMPLATE = ("{% for m in messages %}<user> {{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %} <bot>{% endif %}")


def make_tokenizer(*, chat: bool = True, bos: bool = False, pad: bool = True):
    """A word-level tokenizer built offline: one id per word of SPECIALS + WORDS, in that order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    if bos:  # Llama-style: every encoded text starts with <s>
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  **({"pad_token": "<pad>"} if pad else {}))
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def ids(*words: str) -> list[int]:
    table = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    return [table[w] for w in words]


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------
# InstructionExample and prompts


def test_prompt_text_with_and_without_input():
    assert InstructionExample("Say hi.", "", "hi").prompt_text == "Say hi."
    assert InstructionExample("Say hi.", "  \n", "hi").prompt_text == "Say hi."  # whitespace is no input
    assert InstructionExample("Summarize.", "The text.", "ok").prompt_text == "Summarize.\n\nThe text."


def test_example_is_frozen():
    ex = InstructionExample("a", "", "b")
    with pytest.raises(AttributeError):
        ex.output = "c"


def test_format_prompt_uses_the_chat_template():
    tok = make_tokenizer(chat=True)
    assert format_prompt(InstructionExample("say hi", "", "hello"), tok) == "<user> say hi <bot>"
    assert format_prompt(InstructionExample("say", "hi", "hello"), tok) == "<user> say\n\nhi <bot>"


def test_format_prompt_without_chat_template_is_alpaca():
    tok = make_tokenizer(chat=False)
    no_input = format_prompt(InstructionExample("Say hi.", "", "hello"), tok)
    assert no_input == ("Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    with_input = format_prompt(InstructionExample("Add.", "2 and 3", "5"), tok)
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")


def test_prompts_and_references_returns_raw_outputs():
    tok = make_tokenizer()
    examples = [InstructionExample("say hi", "", "hello there"), InstructionExample("add", "two", "#### 5")]
    prompts, refs = prompts_and_references(examples, tok)
    assert prompts == ["<user> say hi <bot>", "<user> add\n\ntwo <bot>"]
    assert refs == ["hello there", "#### 5"]
    assert GenerationPrompt.prompts_and_references(examples, tok) == (prompts, refs)
    assert GenerationPrompt.from_example(examples[1], tok) == GenerationPrompt("<user> add\n\ntwo <bot>", "#### 5")


# ----------------------------------------------------------------------------------------------
# Features: masking, EOS, BOS, truncation


def test_labels_mask_exactly_the_prompt():
    tok = make_tokenizer()
    [feat] = build_causal_lm_features([InstructionExample("say hi", "", "hello there")], tok, max_length=32)
    # positions 0-3: <user> say hi <bot> (prompt); 4-5: hello there; 6: </s>
    assert feat["input_ids"] == ids("<user>", "say", "hi", "<bot>", "hello", "there", "</s>")
    assert feat["labels"] == [-100, -100, -100, -100, *ids("hello", "there", "</s>")]
    assert feat["attention_mask"] == [1] * 7


def test_labels_with_input_and_no_chat_template():
    tok = make_tokenizer(chat=False)
    ex = InstructionExample("add two and three", "x", "five")
    [feat] = build_causal_lm_features([ex], tok, max_length=512)
    prompt_len = len(tok(format_prompt(ex, tok), add_special_tokens=False)["input_ids"])
    assert feat["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert feat["labels"][prompt_len:] == ids("five", "</s>")
    assert feat["input_ids"][prompt_len:] == ids("five", "</s>")
    assert len(feat["input_ids"]) == prompt_len + 2


def test_empty_output_still_teaches_eos():
    [feat] = build_causal_lm_features([InstructionExample("say hi", "", "")], make_tokenizer(), max_length=32)
    assert feat["labels"] == [-100] * 4 + ids("</s>")


def test_bos_is_added_once_where_the_tokenizer_adds_it():
    tok = make_tokenizer(chat=False, bos=True)
    assert encode_prompts(["say hi"], tok) == [ids("<s>", "say", "hi")]
    assert encode_prompts(["<s> say hi"], tok) == [ids("<s>", "say", "hi")]  # the template wrote it already
    assert encode_prompts(["say hi"], make_tokenizer()) == [ids("say", "hi")]  # no BOS by default: none added
    tok.chat_template = "<s> " + CHAT_TEMPLATE
    [feat] = build_causal_lm_features([InstructionExample("say hi", "", "hello")], tok, max_length=32)
    assert feat["input_ids"] == ids("<s>", "<user>", "say", "hi", "<bot>", "hello", "</s>")
    assert feat["labels"] == [-100] * 5 + ids("hello", "</s>")


def test_no_truncation_at_exact_length():
    [feat] = build_causal_lm_features([InstructionExample("say hi", "", "hello there")], make_tokenizer(), max_length=7)
    assert len(feat["input_ids"]) == 7 and feat["labels"][-1] == ids("</s>")[0]


def test_truncation_cuts_the_prompt_from_the_left_first():
    tok = make_tokenizer()
    ex = InstructionExample("add two and three and five", "", "hello")  # prompt: 8 tokens, response 2
    [feat] = build_causal_lm_features([ex], tok, max_length=7)
    assert feat["input_ids"] == ids("and", "three", "and", "five", "<bot>", "hello", "</s>")
    assert feat["labels"] == [-100] * 5 + ids("hello", "</s>")


def test_truncation_keeps_half_the_prompt_then_cuts_the_response():
    tok = make_tokenizer()
    ex = InstructionExample("add two and three", "", "x y z x y z")  # prompt 6 tokens, response 6 + eos
    [feat] = build_causal_lm_features([ex], tok, max_length=8)
    # the prompt keeps 8 // 2 = 4 tokens (its end); the response keeps 4 and loses its EOS
    assert feat["input_ids"] == ids("two", "and", "three", "<bot>", "x", "y", "z", "x")
    assert feat["labels"] == [-100] * 4 + ids("x", "y", "z", "x")
    assert ids("</s>")[0] not in feat["input_ids"]


@pytest.mark.parametrize("max_length", [1, 2, 3])
def test_truncation_keeps_a_response_token_when_tiny(max_length):
    [feat] = build_causal_lm_features([InstructionExample("add two and three", "", "five")], make_tokenizer(),
                                      max_length=max_length)
    assert len(feat["input_ids"]) == max_length
    assert feat["labels"][max_length // 2] == ids("five")[0]
    assert sum(label != -100 for label in feat["labels"]) >= 1


def test_feature_errors():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="max_length"):
        build_causal_lm_features([InstructionExample("a", "", "b")], tok, max_length=0)
    tok.eos_token = None
    with pytest.raises(ValueError, match="EOS"):
        build_causal_lm_features([InstructionExample("a", "", "b")], tok, max_length=8)
    assert build_causal_lm_features([], make_tokenizer(), max_length=8) == []


# ----------------------------------------------------------------------------------------------
# Collator


def test_collator_right_pads():
    tok = make_tokenizer()
    feats = build_causal_lm_features([InstructionExample("say hi", "", "hello there"),
                                      InstructionExample("say", "", "hi")], tok, max_length=32)
    batch = CausalLMCollator(tok)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 7) for t in batch.values())
    pad = tok.pad_token_id
    assert batch["input_ids"][1].tolist() == ids("<user>", "say", "<bot>", "hi", "</s>") + [pad, pad]
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0, 0]
    assert batch["labels"][1].tolist() == [-100, -100, -100, *ids("hi", "</s>"), -100, -100]
    assert batch["input_ids"][0].tolist() == feats[0]["input_ids"]


def test_collator_pad_to_multiple_and_eos_fallback():
    tok = make_tokenizer(pad=False)
    feats = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}]  # attention_mask optional
    batch = CausalLMCollator(tok, pad_to_multiple_of=4)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 7, tok.eos_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100]]


def test_collator_errors():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="empty"):
        CausalLMCollator(tok)([])
    with pytest.raises(ValueError, match="feature 0"):
        CausalLMCollator(tok)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        CausalLMCollator(tok, pad_to_multiple_of=0)
    tok = make_tokenizer(pad=False)
    tok.eos_token = None
    with pytest.raises(ValueError, match="pad"):
        CausalLMCollator(tok)


# ----------------------------------------------------------------------------------------------
# Reading: known sets


def test_read_alpaca_and_gsm8k_from_data_dir(tmp_path):
    write_jsonl(tmp_path / "alpaca" / "train.jsonl", [
        {"instruction": "Say hi.", "input": "", "output": "hi"},
        {"instruction": "Add.", "input": "2 and 3", "output": " 5 "}])  # strings are kept as they are
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "2+3?", "answer": "2+3=5\n#### 5"}])
    assert read_instruction_data("alpaca", "train", tmp_path) == [
        InstructionExample("Say hi.", "", "hi"), InstructionExample("Add.", "2 and 3", " 5 ")]
    assert read_instruction_data("gsm8k", "test", str(tmp_path)) == [InstructionExample("2+3?", "", "2+3=5\n#### 5")]


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "alpaca" / "test.jsonl", [{"instruction": "a", "input": "", "output": "b"}])
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert read_instruction_data("alpaca", "test") == [InstructionExample("a", "", "b")]


def test_missing_data_dir_and_split(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match="--data-dir"):
        read_instruction_data("alpaca")
    with pytest.raises(FileNotFoundError, match=r"nowhere.*--data-dir.*HYPERADALORA_DATA_DIR"):
        read_instruction_data("alpaca", "train", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"gsm8k[/\\]train\.jsonl.*--data-dir"):
        read_instruction_data("gsm8k", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev'.*train, test"):
        read_instruction_data("alpaca", "dev", tmp_path)


# ----------------------------------------------------------------------------------------------
# Reading: local files


def test_local_openplatypus_like_jsonl_loads_like_alpaca(tmp_path):
    path = write_jsonl(tmp_path / "platypus.jsonl", [
        {"input": "", "output": "3", "instruction": "1+2?", "data_source": "MATH/PRM-800K"},
        {"instruction": "Spin.", "input": "ctx", "output": "ok", "data_source": "scibench"}])
    alpaca = write_jsonl(tmp_path / "alpaca" / "train.jsonl", [
        {"instruction": "1+2?", "input": "", "output": "3"}, {"instruction": "Spin.", "input": "ctx", "output": "ok"}])
    assert read_instruction_data(str(path)) == read_instruction_data("alpaca", data_dir=tmp_path)
    assert read_instruction_data(str(alpaca)) == read_instruction_data("alpaca", data_dir=tmp_path)


def test_field_aliases_magpie_dolly_gsm8k(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Magpie q", "response": "Magpie a", "conversations": [{"from": "human", "value": "x"}]},
        {"instruction": "Dolly q", "context": "Dolly ctx", "response": "Dolly a", "category": "qa"},
        {"question": "GSM q", "answer": "GSM a"},
        {"instruction": "null input", "input": None, "output": "o"},
        {"instruction": "both", "output": "wins", "response": "loses"}])
    assert read_instruction_data(str(path)) == [
        InstructionExample("Magpie q", "", "Magpie a"), InstructionExample("Dolly q", "Dolly ctx", "Dolly a"),
        InstructionExample("GSM q", "", "GSM a"), InstructionExample("null input", "", "o"),
        InstructionExample("both", "", "wins")]


def test_local_json_array_and_folder(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    (tmp_path / "data.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    expected = [InstructionExample("a", "", "b"), InstructionExample("c", "", "d")]
    assert read_instruction_data(str(tmp_path / "data.json")) == expected
    # a .json file that is really JSON Lines, with a byte-order mark
    (tmp_path / "lines.json").write_bytes(b"\xef\xbb\xbf" + "\n".join(map(json.dumps, rows)).encode())
    assert read_instruction_data(str(tmp_path / "lines.json")) == expected
    write_jsonl(tmp_path / "folder" / "valid.jsonl", rows)
    assert read_instruction_data(str(tmp_path / "folder"), split="valid") == expected
    with pytest.raises(FileNotFoundError, match="neither test.jsonl nor test.json"):
        read_instruction_data(str(tmp_path / "folder"), split="test")


def test_jsonl_blank_lines_crlf_and_unicode_line_separators(tmp_path):
    path = tmp_path / "x.jsonl"
    row = json.dumps({"instruction": "a\u2028b", "output": "c\x85d"}, ensure_ascii=False)
    path.write_text(f"{row}\r\n\r\n{row}\n", encoding="utf-8", newline="")
    assert read_instruction_data(str(path)) == [InstructionExample("a\u2028b", "", "c\x85d")] * 2


@pytest.mark.parametrize(("lines", "line_no", "message"), [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], 2, "invalid JSON"),
    (['{"instruction": "a", "output": "b"}', "", '["a", "b"]'], 3, "expected a JSON object, got list"),
    (['{"instruction": "a", "input": "", "output": "b"}', '{"instruction": "a", "input": ""}'], 2,
     "missing field 'output' / 'answer' / 'response'"),
    (['{"output": "b"}'], 1, "missing field 'instruction' / 'question'"),
    (['{"instruction": "a", "output": "b"}'] * 3 + ['{"instruction": 7, "output": "b"}'], 4,
     "field 'instruction' must be a string, got int"),
    (['{"instruction": "a", "input": ["x"], "output": "b"}'], 1, "field 'input' must be a string, got list"),
    (['{"instruction": "a", "output": null}'], 1, "field 'output' must be a string, got NoneType"),
])
def test_malformed_jsonl_rows_name_file_and_line(tmp_path, lines, line_no, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError) as info:
        read_instruction_data(str(path))
    assert f"{path}:{line_no}:" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(("text", "line_no", "message"), [
    ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"}\n]', 3, "missing field 'output'"),
    ('[\n  {"instruction": "a", "output": "b"},\n\n  {"instruction": "a", "output": 1}\n]', 4, "got int"),
    ('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a", "output": }\n]', 3, "invalid JSON"),
    ('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "a", "output": "b"}\n]', 3, "expected ','"),
    ('[\n  {"instruction": "a", "output": "b"}\n]\n[]', 4, "extra data"),
    ('[\n  {"instruction": "a", "output": "b"},\n  3\n]', 3, "expected a JSON object, got int"),
])
def test_malformed_json_array_rows_name_file_and_line(tmp_path, text, line_no, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_instruction_data(str(path))
    assert f"{path}:{line_no}:" in str(info.value)
    assert message in str(info.value)


def test_empty_files_and_missing_paths(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        read_instruction_data(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[ ]", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        read_instruction_data(str(tmp_path / "empty.json"))
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_instruction_data(str(missing))
    with pytest.raises(FileNotFoundError, match="owner"):
        read_instruction_data("owner/data.json")  # a .json path is never taken as a hub id


def test_example_from_row_directly():
    assert example_from_row({"question": "q", "answer": "a"}, "here") == InstructionExample("q", "", "a")
    with pytest.raises(ValueError, match="^here: expected a JSON object, got str"):
        example_from_row("q", "here")


# ----------------------------------------------------------------------------------------------
# Reading: the hub


def test_hub_without_datasets_names_the_alternatives(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ValueError) as info:
        read_instruction_data("garage-bAInd/Open-Platypus")
    text = str(info.value)
    assert "--data-dir" in text and "local" in text and "hub" in text and "pip install datasets" in text
    assert isinstance(info.value.__cause__, ImportError)


def test_hub_rows_go_through_the_same_validation(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "offline/set":
            raise ConnectionError("no network")
        return [{"instruction": "q", "input": "", "output": "a", "data_source": "x"}, {"instruction": "q2"}] \
            if name == "bad/set" else [{"instruction": "q", "input": "", "output": "a", "data_source": "x"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("hyperadalora.data.user.hub_unreachable", lambda: None)  # the stand-in hub answers
    assert read_instruction_data("garage-bAInd/Open-Platypus", "train") == [InstructionExample("q", "", "a")]
    assert calls == [("garage-bAInd/Open-Platypus", "train")]
    with pytest.raises(ValueError, match=r"bad/set \(hub, split test\) row 2: missing field 'output'"):
        read_instruction_data("bad/set", "test")
    with pytest.raises(ValueError, match="--data-dir.*loading it failed.*ConnectionError: no network"):
        read_instruction_data("offline/set")
