import math

import pytest
import torch
from conftest import tiny_model

from mimo.engine import Engine, SamplingParams
from mimo.errors import MimoError
from mimo.quantize import Int4Linear, Int8Linear, perplexity, quantize_int8, quantize_model


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


@pytest.mark.parametrize("shape", [(64, 160), (96, 32), (24, 8), (45, 37)])  # the int4 kernel, and the fallback
def test_int4_linear_close_to_fp32(shape):
    torch.manual_seed(0)
    lin = torch.nn.Linear(*shape)
    torch.nn.init.normal_(lin.weight, std=0.05)
    q = Int4Linear.from_linear(lin)
    assert q.cpu_kernel == (shape[1] % 16 == 0 and shape[0] % 32 == 0)
    assert q.weight_int4.dtype == torch.uint8 and q.weight_int4.numel() == shape[1] * ((shape[0] + 1) // 2)
    x = torch.randn(3, 5, shape[0])
    assert rel_err(q(x), lin(x)) < 0.12  # 16 levels per group of 32 weights


def test_int4_weights_within_half_a_step_and_the_kernel_matches_the_portable_layout():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=False)
    portable = Int4Linear.from_linear(lin, cpu_kernel=False)
    w, deq = lin.weight.detach(), portable.dequantized(torch.float32)
    scale = portable.scales_zeros[..., 0].float().t().repeat_interleave(32, 1)  # [out, in]
    assert ((w - deq).abs() <= scale / 2 + 1e-6).all()
    kernel = Int4Linear.from_linear(lin)
    assert kernel.cpu_kernel and not portable.cpu_kernel
    x = torch.randn(4, 96)
    assert rel_err(kernel(x), x @ deq.t()) < 0.01  # the kernel's bf16 activations
    assert rel_err(portable(x), x @ deq.t()) < 1e-5


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_model_logits_and_greedy_close_to_fp32(method):
    model, q = tiny_model(vocab_size=400), quantize_model(tiny_model(vocab_size=400), method)
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(q(ids).logits, model(ids).logits) < (0.02 if method == "int8" else 0.15)
    prompts = [torch.randint(0, 400, (5,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(6)]
    want = Engine(model, None).generate(prompts, SamplingParams(max_new_tokens=12))
    got = Engine(q, None).generate(prompts, SamplingParams(max_new_tokens=12), mtp=True, num_draft=2)
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w.tokens, g.tokens))
    if method == "int8":
        assert same >= 0.6 * 12 * len(prompts)
        assert sum(w.tokens == g.tokens for w, g in zip(want, got)) >= len(prompts) // 2
    else:  # random weights make near-ties everywhere; 4 bits flip some of them
        assert same >= 0.3 * 12 * len(prompts)


def test_perplexity():
    model = tiny_model(vocab_size=400, initializer_range=0.2)
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loss = model(ids[:, :-1], targets=ids[:, 1:]).ntp_loss
    assert perplexity(model, ids) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert perplexity(model, ids[0].tolist(), chunk=8) > 1.0
    q = quantize_int8(tiny_model(vocab_size=400, initializer_range=0.2))
    assert perplexity(q, ids) == pytest.approx(perplexity(model, ids), rel=0.02)
    q4 = quantize_model(tiny_model(vocab_size=400, initializer_range=0.2), "int4")
    assert perplexity(q4, ids) == pytest.approx(perplexity(model, ids), rel=0.15)
    with pytest.raises(MimoError):
        perplexity(model, [5])


def test_quantize_model_names():
    model = tiny_model(vocab_size=64)
    assert quantize_model(model, None) is model
    assert isinstance(quantize_model(tiny_model(vocab_size=64), "int4").lm_head, Int4Linear)
    with pytest.raises(MimoError, match="int8, int4"):
        quantize_model(model, "int3")


@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_compiled_step_freezes_each_models_own_weights(method):
    """compile=True freezes the weights into the compiled graph (model_runner.InferenceCompiled). A second model of
    the same shapes must get its own graph, never the first one's frozen weights (with inductor's FX graph
    cache on, int8 got the first model's prepacked weights back). Compiled quantized products round differently
    from aten's kernels (which round their output to bf16), so logits are compared, not greedy tokens."""
    from mimo.model_runner import ModelRunner

    ids, positions = torch.tensor([[5], [9]]), torch.tensor([[0], [0]])
    for seed in (0, 1):
        model = quantize_model(tiny_model(seed, hidden_size=64, intermediate_size=128), method)
        with torch.inference_mode():
            eager = ModelRunner(model, 2, 256).decode(ids, positions, 1)
            compiled = ModelRunner(model, 2, 256, compile=True).decode(ids, positions, 1)
        assert rel_err(compiled, eager) < (1e-5 if method is None else 0.01)
