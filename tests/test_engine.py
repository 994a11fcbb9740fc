import torch

from conftest import tiny_model
from mimo.engine import Engine, IncrementalDetokenizer, SamplingParams, filtered_probs


def greedy_reference(model, ids, n, stop_ids):
    seq = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(seq).logits[0, -1].argmax())
            if nxt in stop_ids:
                break
            out.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    return out


def test_ragged_batch_equals_one_by_one(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode(t) for t in ("Question: What is", "Sort", "The quick brown fox jumps over")]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=10))
    for p, o in zip(prompts, outs):
        assert o.tokens == greedy_reference(model, p, 10, tokenizer.stop_token_ids)
        assert o.finish_reason in ("stop", "length")
        assert o.text == tokenizer.decode(o.tokens)


def test_logprobs_are_the_models(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    out = Engine(model, tokenizer).generate([tokenizer.encode("hello")], SamplingParams(max_new_tokens=5,
                                                                                         temperature=1.0, seed=3))[0]
    seq = torch.tensor([out.prompt_tokens + out.tokens])
    with torch.no_grad():
        lp = torch.log_softmax(model(seq).logits[0].float(), -1)
    n = len(out.prompt_tokens)
    ref = [lp[n - 1 + j, t].item() for j, t in enumerate(out.tokens)]
    assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(ref), atol=1e-4)


def test_stop_strings_truncate(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.encode("Numbers like")]
    full = engine.generate(prompt, SamplingParams(max_new_tokens=20))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = engine.generate(prompt, SamplingParams(max_new_tokens=20, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_streaming_never_splits_utf8(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    text = "naïve 数学 🙂 done"
    ids = tokenizer.encode(text)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streamed_text_equals_final_text(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    got = {0: "", 1: ""}
    outs = Engine(model, tokenizer).generate(
        [tokenizer.encode("café"), tokenizer.encode("数")], SamplingParams(max_new_tokens=15, temperature=1.0, seed=0),
        on_text=lambda row, t: got.__setitem__(row, got[row] + t))
    assert got[0] == outs[0].text and got[1] == outs[1].text


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.81))
    assert (p[0, :3] > 0).all() and p[0, 3] == 0
