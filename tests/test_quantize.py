import math

import pytest
import torch
from conftest import tiny_model

from mimo.engine import Engine, SamplingParams
from mimo.errors import MimoError
from mimo.quantize import Int8Linear, perplexity, quantize_int8, quantize_model


def rel_err(got, want):
    return float((got - want).detach().norm() / want.detach().norm())


@pytest.mark.parametrize("shape", [(64, 160), (24, 8)])  # the int8 kernel, and the dequantizing fallback
def test_int8_linear_close_to_fp32(shape):
    torch.manual_seed(0)
    lin = torch.nn.Linear(*shape)
    q = Int8Linear.from_linear(lin)
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127
    x = torch.randn(3, 5, shape[0])
    assert rel_err(q(x), lin(x)) < 0.01


def test_quantized_model_logits_and_greedy_close_to_fp32():
    model, q = tiny_model(vocab_size=400), quantize_int8(tiny_model(vocab_size=400))
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(q(ids).logits, model(ids).logits) < 0.02
    prompts = [torch.randint(0, 400, (5,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(6)]
    want = Engine(model, None).generate(prompts, SamplingParams(max_new_tokens=12))
    got = Engine(q, None).generate(prompts, SamplingParams(max_new_tokens=12), mtp=True, num_draft=2)
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w.tokens, g.tokens))
    assert same >= 0.6 * 12 * len(prompts)
    assert sum(w.tokens == g.tokens for w, g in zip(want, got)) >= len(prompts) // 2


def test_perplexity():
    model = tiny_model(vocab_size=400, initializer_range=0.2)
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids[:, :-1], targets=ids[:, 1:]).ntp_loss
    assert perplexity(model, ids) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert perplexity(model, ids[0].tolist(), chunk=8) > 1.0
    q = quantize_int8(tiny_model(vocab_size=400, initializer_range=0.2))
    assert perplexity(q, ids) == pytest.approx(perplexity(model, ids), rel=0.02)
    with pytest.raises(MimoError):
        perplexity(model, [5])


def test_quantize_model_names():
    model = tiny_model(vocab_size=64)
    assert quantize_model(model, None) is model
    with pytest.raises(MimoError, match="int4"):
        quantize_model(model, "int4")
