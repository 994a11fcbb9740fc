import json

import pytest

from mimo.cli import main
from mimo.errors import MimoError
from mimo.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_special_tokens_are_single_ids(tokenizer):
    for tok in SPECIAL_TOKENS:
        ids = tokenizer.encode(tok)
        assert len(ids) == 1 and ids[0] == tokenizer.token_to_id(tok)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.token_to_id("<|endoftext|>")
    assert set(tokenizer.stop_token_ids) == {tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>")}


def test_digits_are_split_and_text_roundtrips(tokenizer):
    ids = tokenizer.encode("12345")
    assert len(ids) == 5
    text = "Unicode café 数学 🙂 and 987 + 13 = 1000\n  indented"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_renders_chatml(tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>2+2=4</think>4"}]
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
    assert text == ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>2+2=4</think>4<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(msgs[:1])
    assert prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(MimoError):
        tokenizer.apply_chat_template([{"role": "user"}])


def test_saved_tokenizer_loads_in_transformers(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: 12 + 7?<|im_end|>"
    assert hf(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(msgs)
    assert hf.eos_token == "<|endoftext|>"


def test_cli_trains_on_text_and_jsonl(tmp_path, capsys):
    """Every input is read, JSONL as JSON: a word that only the text file, a JSONL "text" field, another JSONL
    field or a JSONL string contains is frequent enough there to become one token; the keys are not text."""
    (tmp_path / "a.txt").write_text("alpha beta gamma 123\n" * 50)
    rows = [{"text": f"delta {i} zebrafinch"} for i in range(50)] + [{"question": "a quokka", "id": 3}] * 50
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows + ["the narwhal"] * 50))
    code = main(["tokenizer", "train", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")])
    assert code == 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.vocab_size <= 400 and tok.decode(tok.encode("delta 7 zebrafinch")) == "delta 7 zebrafinch"
    for word in (" gamma", " zebrafinch", " quokka", " narwhal"):
        assert len(tok.encode(word)) == 1, word
    assert len(tok.encode(" wombat")) > 1  # in no input
    assert len(tok.encode("question")) > 1 and len(tok.encode("text")) > 1  # JSON keys are not text


def test_train_errors_are_clean(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    assert main(["tokenizer", "train", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "t")]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "missing.txt: not found" in capsys.readouterr().err


def test_foreign_tokenizer_json_loads(tmp_path):
    """A plain HF tokenizer.json (no mimo tokenizer_config) loads; end of text comes from the vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tk = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "<|endoftext|>": 2}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    assert tok.eos_token_id == 2 and tok.encode("a b") == [0, 1]
