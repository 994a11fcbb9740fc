import math

import numpy as np
import pytest
import torch
from helpers import tiny_model

from mimo import kernels
from mimo import quantize as Q
from mimo.errors import MimoError
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.quantize import Int4Linear, Int8Linear, perplexity, quantize_int8, quantize_model

gguf = pytest.importorskip("gguf")
GGML_TYPE = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FORMATS = {"int8": ("q8_0", Int8Linear), "int4": ("q4_0", Int4Linear)}


def rel_err(got, want):
    return float((got.float() - want.float()).detach().norm() / want.float().detach().norm())


@pytest.fixture(params=["kernels", "torch"])
def path(request, monkeypatch):
    """Run a test with the C kernels and again with the torch fallback (MIMO_NO_KERNELS=1)."""
    if request.param == "kernels":
        if not kernels.available():
            pytest.skip("no C kernels here")
    else:
        monkeypatch.setenv("MIMO_NO_KERNELS", "1")
    return request.param


def awkward_weight(out=300, n_in=512, seed=0):
    """Random rows of varied scale, plus the edge cases of the reference quantizers: an all-zero block, ties in
    magnitude of opposite sign, a tiny value, halfway points."""
    torch.manual_seed(seed)
    w = torch.randn(out, n_in) * torch.rand(out, 1) * 3
    w[0, :32] = 0
    w[1, :32] = torch.tensor([1.0, -1.0] * 16)
    w[1, 32:64] = torch.tensor([-1.0, 1.0] * 16)
    w[2, 5] = 1e-8
    w[3, :32] = torch.arange(32) / 2 - 8  # x * id lands on .5 steps
    return w


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_blocks_are_byte_identical_to_ggml(fmt, path):
    w = awkward_weight()
    want = gguf.quants.quantize(w.numpy(), GGML_TYPE[fmt])  # [out, in / 32 * bytes]
    got = Q.quantize_blocks(w, fmt)
    assert got.dtype == torch.uint8 and got.shape == (300, 16, Q.BLOCK_BYTES[fmt])
    assert np.array_equal(got.reshape(300, -1).numpy(), want)
    assert torch.equal(Q._quantize_torch(w, fmt), got)  # the torch quantizer agrees with the C one
    deq = gguf.quants.dequantize(want, GGML_TYPE[fmt])
    assert np.array_equal(Q.dequantize_blocks(got, fmt).numpy(), deq)
    for dtype in (torch.bfloat16, torch.float16):  # stored dtypes quantize as their fp32 values
        wd = w.to(dtype)
        assert np.array_equal(Q.quantize_blocks(wd, fmt).reshape(300, -1).numpy(),
                              gguf.quants.quantize(wd.float().numpy(), GGML_TYPE[fmt]))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_from_weight_from_linear_from_blocks(method, monkeypatch):
    fmt, cls = FORMATS[method]
    w = awkward_weight(out=77, n_in=256)
    lin = torch.nn.Linear(256, 77)
    with torch.no_grad():
        lin.weight.copy_(w)
    whole = cls.from_linear(lin)
    assert whole.blocks.shape == (77, 8, Q.BLOCK_BYTES[fmt]) and torch.equal(whole.bias, lin.bias)
    monkeypatch.setattr(Q, "CHUNK_ELEMS", 256 * 5)  # 5 rows a chunk
    chunked = cls.from_weight(w.bfloat16().float(), lin.bias)
    assert torch.equal(chunked.blocks, cls.from_weight(w.bfloat16(), lin.bias).blocks)  # bf16 as stored
    assert torch.equal(cls.from_weight(w).blocks, whole.blocks)
    raw = gguf.quants.quantize(w.numpy(), GGML_TYPE[fmt])  # a GGUF tensor's bytes
    imported = cls.from_blocks(torch.from_numpy(raw.reshape(-1)), 256, lin.bias)
    assert torch.equal(imported.blocks, whole.blocks) and imported.out_features == 77
    x = torch.randn(2, 256)
    assert torch.equal(imported(x), whole(x))
    state = whole.state_dict()
    assert set(state) == {"blocks", "bias"}
    with pytest.raises(MimoError, match="divisible by 32"):
        cls.from_weight(torch.randn(8, 40))
    with pytest.raises(MimoError):
        cls.from_blocks(torch.zeros(10, dtype=torch.uint8), 64)


@pytest.mark.skipif(not kernels.tiles_q4_0(), reason="Q4_0 runs tiled by 8 rows only with the AVX-512 tiles")
def test_q4_0_tiled_by_8_rows_computes_and_saves_as_the_rows(monkeypatch):
    """An Int4Linear of 48 rows keeps its blocks tiled by 8 rows: every product (GEMV tiles for 1-5 rows, the GEMM
    tile, chunked dequantization for many bf16 rows, the gradient through it) equals the row layout's bit for bit,
    and the blocks leave the module in GGML's rows (state_dict, dequantized, a move off the CPU)."""
    torch.manual_seed(0)
    w, b = torch.randn(48, 288), torch.randn(48)
    tiled = Int4Linear.from_weight(w, b)
    monkeypatch.setenv("MIMO_Q4_0_TILES", "0")
    rows = Int4Linear.from_weight(w, b)
    monkeypatch.delenv("MIMO_Q4_0_TILES")
    assert (tiled.fmt, rows.fmt) == ("q4_0x8", "q4_0") and not torch.equal(tiled.blocks, rows.blocks)
    assert Int4Linear.from_weight(torch.randn(20, 64)).fmt == "q4_0"  # not a multiple of 8 rows: as they are
    for m in (1, 2, 3, 4, 5, 9, 300):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, 288).to(dtype)
            assert torch.equal(tiled(x), rows(x)), (m, dtype)
    x = torch.randn(3, 288, requires_grad=True)
    tiled(x).sum().backward()
    grad, x.grad = x.grad, None
    rows(x).sum().backward()
    assert torch.equal(grad, x.grad)
    assert torch.equal(tiled.dequantized(), rows.dequantized())
    assert torch.equal(tiled.state_dict()["blocks"], rows.blocks) and torch.equal(tiled.row_blocks(), rows.blocks)
    for assign in (False, True):
        loaded = Int4Linear.from_weight(torch.zeros(48, 288), torch.zeros(48))
        loaded.load_state_dict(rows.state_dict(), assign=assign)
        assert loaded.fmt == "q4_0x8" and torch.equal(loaded.blocks, tiled.blocks)
    moved = Int4Linear.from_weight(w, b).to("meta")
    assert moved.fmt == "q4_0"


@pytest.mark.parametrize("tiles", ["1", "0"])
def test_first_rows_compute_the_first_outputs_from_a_view(tiles, monkeypatch):
    """first_rows (the drafter's head over the first ids): outputs [0, n) of the module, read from its own
    blocks or weight (no copy) in every layout: float rows, Q8_0, Q4_0 in rows and tiled by 8 rows."""
    monkeypatch.setenv("MIMO_Q4_0_TILES", tiles)
    torch.manual_seed(0)
    w, b = torch.randn(48, 288), torch.randn(48)
    linear = torch.nn.Linear(288, 48)
    with torch.no_grad():
        linear.weight.copy_(w), linear.bias.copy_(b)
    for module in (linear, Int8Linear.from_weight(w, b), Int4Linear.from_weight(w, b)):
        part = Q.first_rows(module, 16)
        weight = part.weight if isinstance(part, torch.nn.Linear) else part.blocks
        whole = module.weight if isinstance(module, torch.nn.Linear) else module.blocks
        assert part.out_features == 16 and weight.data_ptr() == whole.data_ptr()
        for m in (1, 2, 5, 40):
            x = torch.randn(m, 288)
            assert torch.equal(part(x), module(x)[:, :16]), (type(module).__name__, m)
        assert module.out_features == 48 and module(x).shape == (40, 48)  # the original is left whole
    with pytest.raises(MimoError, match="multiple of 8"):
        Q.first_rows(linear, 12)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 64, 100])
def test_kernel_matches_the_torch_path(method, m, monkeypatch):
    """Both paths compute the same products (the kernel's rounding of activations included) on odd shapes, with
    a bias, for fp32 and bf16 inputs."""
    if not kernels.available():
        pytest.skip("no C kernels here")
    fmt, cls = FORMATS[method]
    torch.manual_seed(m)
    lin = torch.nn.Linear(320, 45)
    q = cls.from_linear(lin)
    x = torch.randn(m, 320)
    with torch.no_grad():
        fast, fast_b, fast_h = q(x), q(x.bfloat16()), q(x.half())
        monkeypatch.setenv("MIMO_NO_KERNELS", "1")
        slow, slow_b, slow_h = q(x), q(x.bfloat16()), q(x.half())
        plain = F_linear(x, q.dequantized(), lin.bias)
    assert fast.dtype == torch.float32 and fast_b.dtype == torch.bfloat16 and fast.shape == (m, 45)
    assert fast_h.dtype == torch.float16
    assert rel_err(fast, slow) < 2e-6
    assert rel_err(fast_b, slow_b) < 4e-3  # each rounds its fp32 result to bf16 once
    assert rel_err(fast_h, slow_h) < 5e-4
    assert rel_err(fast, plain) < (1e-6 if m > Q.GEMV_MAX_ROWS[fmt] else 0.01)  # int8 activations: <1%


def F_linear(x, w, b):
    return torch.nn.functional.linear(x, w, b)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_big_layers_and_chunked_products(method, monkeypatch):
    """Many rows (chunks of the kernel's thread split, the tiles' leftover rows) and the chunked prefill path."""
    fmt, cls = FORMATS[method]
    torch.manual_seed(0)
    q = cls.from_weight(torch.randn(1031, 1024) * 0.02)
    x = torch.randn(3, 5, 1024)
    want = F_linear(Q._round_activations(x.view(15, 1024)), q.dequantized(), None).view(3, 5, 1031)
    assert rel_err(q(x[:, :1]), want[:, :1]) < 2e-6
    assert rel_err(q(x), want) < 2e-6  # 15 rows: groups of 4 activation rows through each tile
    monkeypatch.setattr(Q, "CHUNK_ELEMS", 1024 * 100)
    monkeypatch.setitem(Q.GEMV_MAX_ROWS, fmt, 8)
    assert rel_err(q(x), x @ q.dequantized().t()) < 2e-6  # 15 rows > GEMV_MAX_ROWS: dequantized in chunks


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 64, 100])
def test_bf16_linear(m):
    """bf16 weights against fp32 and bf16 activations (bf16 ones by vdpbf16ps on CPUs with AVX-512 BF16), every
    tile shape: 1-4 activation rows, 45 weight rows (tiles of 4 or 2 and single rows), k = 272 (a tail of 16)."""
    torch.manual_seed(0)
    w, b = torch.randn(45, 272).bfloat16(), torch.randn(45).bfloat16()
    x = torch.randn(m, 272)
    want = F_linear(x, w.float(), b.float())
    assert rel_err(Q.bf16_linear(x, w, b), want) < 2e-6
    assert rel_err(Q.bf16_linear(x.bfloat16(), w, b), F_linear(x.bfloat16().float(), w.float(), b.float())) < 4e-3
    assert Q.bf16_linear(x.bfloat16(), w).dtype == torch.bfloat16
    assert rel_err(Q.bf16_linear(x, w.float()), F_linear(x, w.float(), None)) < 1e-6  # not bf16: F.linear


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_linear_close_to_fp32(method, path):
    _, cls = FORMATS[method]
    torch.manual_seed(0)
    lin = torch.nn.Linear(160, 64)
    torch.nn.init.normal_(lin.weight, std=0.05)
    q = cls.from_linear(lin)
    x = torch.randn(3, 5, 160)
    assert rel_err(q(x), lin(x)) < (0.01 if method == "int8" else 0.12)
    assert rel_err(q(x[:1, :1]), lin(x[:1, :1])) < (0.02 if method == "int8" else 0.12)


def test_int4_weights_within_half_a_step():
    """Q4_0 maps a block's largest magnitude to q = 0 (-8 d): the other side only reaches +7 d, so values beyond
    7.5 d clip (error up to d); everything else rounds to within half a step."""
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    q = Int4Linear.from_weight(w)
    d = q.row_blocks()[..., :2].contiguous().view(torch.float16).float().repeat_interleave(32, 1).view(48, 96)
    err, clipped = (w - q.dequantized()).abs(), w / d > 7.5
    assert clipped.any() and (err[~clipped] <= d.abs()[~clipped] * 0.505).all() and (err <= d.abs() * 1.01).all()


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


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_bf16_model_stays_bf16(method):
    model = tiny_model(vocab_size=400).to(torch.bfloat16)
    ref = tiny_model(vocab_size=400)
    q = quantize_model(model, method)
    assert q.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 400, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = q(ids).logits
    assert logits.dtype == torch.bfloat16
    assert rel_err(logits, ref(ids).logits) < (0.05 if method == "int8" else 0.2)
    outs = Engine(q, None).generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    assert len(outs[0].tokens) == 4


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


def test_odd_in_features_stay_float():
    lin = torch.nn.Linear(40, 8)
    with pytest.warns(UserWarning, match="stays unquantized"):
        assert Q.quantized_copy(lin, "int4") is not lin
    seq = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Linear(64, 8))
    with pytest.warns(UserWarning):
        q = Q.quantized_copy(seq, "int8")
    assert type(q[0]) is torch.nn.Linear and isinstance(q[1], Int8Linear)


def test_custom_ops_trace_without_graph_breaks():
    torch.manual_seed(0)
    mods = [Int8Linear.from_linear(torch.nn.Linear(64, 96)), Int4Linear.from_linear(torch.nn.Linear(96, 64))]
    w_bf16 = torch.randn(64, 64).bfloat16()

    def f(x):
        return Q.bf16_linear(mods[1](mods[0](x)), w_bf16)

    x = torch.randn(2, 64)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    compiled = torch.compile(f, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), f(x)) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("method", [None, "int8", "int4"])
def test_compiled_step_freezes_each_models_own_weights(method):
    """compile=True freezes the weights into the compiled graph (model_runner.InferenceCompiled). A second model of
    the same shapes must get its own graph, never the first one's frozen weights (with inductor's FX graph
    cache on, int8 got the first model's prepacked weights back)."""
    from mimo.inference.model_runner import ModelRunner

    ids, positions = torch.tensor([[5], [9]]), torch.tensor([[0], [0]])
    for seed in (0, 1):
        model = quantize_model(tiny_model(seed, hidden_size=64, intermediate_size=128), method)
        with torch.inference_mode():
            eager = ModelRunner(model, 2, 256).decode(ids, positions, 1)
            compiled = ModelRunner(model, 2, 256, compile=True).decode(ids, positions, 1)
        assert rel_err(compiled, eager) < 1e-5


@pytest.mark.parametrize("flags,simd", [("-O2", 0), ("-O3 -march=native -mno-avx512f", 1)],
                         ids=["portable", "avx2-only"])
def test_kernel_builds_without_the_wider_instructions(tmp_path, flags, simd):
    """The kernels built without AVX2 (the code non-x86 CPUs run) and, on a CPU with AVX-512, built with AVX2 only
    (the tiles every other x86 CPU runs) compute what the torch path computes."""
    if not kernels.available():
        pytest.skip("no C kernels here")
    if simd and kernels.library().mimo_simd() != 2:
        pytest.skip("the default build here has no AVX-512 tiles: it is the AVX2 build")
    import os
    import subprocess
    import sys

    code = """
import torch
from mimo import kernels, quantize as Q
lib = kernels.library()
assert lib is not None and lib.mimo_simd() == SIMD, kernels._reason
torch.manual_seed(0)
w = torch.randn(45, 320)
for fmt in ("q8_0", "q4_0"):
    blocks = Q.quantize_blocks(w, fmt)
    assert torch.equal(blocks, Q._quantize_torch(w, fmt))
    assert torch.equal(Q.dequantize_blocks(blocks, fmt), Q._dequantize_torch(blocks, fmt))
    for m in (1, 3, 8):
        x = torch.randn(m, 320)
        got = Q._linear(fmt, x, blocks, 320, None)
        want = torch.nn.functional.linear(Q._round_activations(x), Q._dequantize_torch(blocks, fmt))
        assert float((got - want).norm() / want.norm()) < 2e-6, (fmt, m)
wb = w.bfloat16()
x = torch.randn(3, 320)
got = Q.bf16_linear(x, wb)
want = torch.nn.functional.linear(x, wb.float())
assert float((got - want).norm() / want.norm()) < 2e-6
print("ok")
"""
    code = code.replace("SIMD", str(simd))
    env = {**os.environ, "MIMO_KERNEL_FLAGS": flags, "MIMO_KERNEL_CACHE": str(tmp_path)}
    env.pop("MIMO_NO_KERNELS", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_concurrent_calls_from_python_threads():
    """Two Python threads calling the kernels at once (the pool serves one; the other runs on its own thread)."""
    if not kernels.available():
        pytest.skip("no C kernels here")
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    q = Int4Linear.from_weight(torch.randn(2048, 512))
    xs = [torch.randn(1, 512) for _ in range(64)]
    want = [q(x) for x in xs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(q, xs))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("m", [1, 2, 64])
def test_extreme_values_do_not_overflow_the_integer_sums(m):
    """The kernels sum int8 x int4 products in int16 before widening: all-15 / all-0 nibbles against +-127 (the
    largest magnitudes) must come out exact, in the GEMV (1 row) and GEMM (64 rows) tiles alike."""
    blocks = torch.zeros(8, 4, 18, dtype=torch.uint8)
    blocks[..., 1] = 0x3C  # d = 1.0 (fp16 0x3c00, little-endian)
    for nibbles, w in ((0xFF, 7), (0x00, -8)):
        blocks[..., 2:] = nibbles
        q = Int4Linear.from_blocks(blocks, 128)
        for sign in (1, -1):
            y = q(torch.full((m, 128), 127.0 * sign))
            assert torch.equal(y, torch.full((m, 8), float(w * 127 * 128 * sign)))
    q8 = torch.zeros(8, 4, 34, dtype=torch.uint8)
    q8[..., 1] = 0x3C
    for v in (127, -127):
        q8[..., 2:] = torch.tensor(v, dtype=torch.int8).view(torch.uint8)
        y = Int8Linear.from_blocks(q8, 128)(torch.full((m, 128), -127.0))
        assert torch.equal(y, torch.full((m, 8), float(-127 * v * 128)))


def test_decode_steps_run_torch_ops_on_one_thread_and_kernels_on_all(monkeypatch):
    """With every product in mimo's kernels (int4 weights), short decode steps run torch's own ops on one thread
    and the kernels on torch's count (kernels.torch_ops_single_threaded); the tokens are the same either way and
    the thread setting is restored after each step."""
    if not kernels.available():
        pytest.skip("no C kernels here")
    from mimo.inference.model_runner import ModelRunner, products_in_kernels

    model = quantize_model(tiny_model(vocab_size=400), "int4")
    assert products_in_kernels(model) and not products_in_kernels(tiny_model(vocab_size=400))
    torch.set_num_threads(2)
    seen = []
    gemv = kernels.library().mimo_gemv
    monkeypatch.setattr(kernels.library(), "mimo_gemv",
                        lambda *a: seen.append((torch.get_num_threads(), a[-1])) or gemv(*a))
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    params = SamplingParams(max_new_tokens=8)
    single = Engine(model, None).generate(prompts, params, mtp=True)
    assert torch.get_num_threads() == 2 and kernels.threads() == 2
    assert seen and all(t == (1, 2) for t in seen)  # torch on 1 thread, each kernel call on 2
    monkeypatch.setattr(ModelRunner, "SINGLE_THREAD_MAX_KV", -1)
    seen.clear()
    both = Engine(model, None).generate(prompts, params, mtp=True)
    assert [o.tokens for o in single] == [o.tokens for o in both]
    assert seen and all(t == (2, 2) for t in seen)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_many_bf16_rows_close_to_the_dequantized_product(fmt):
    """Prefill of a bf16 model: many bf16 rows (through the kernels' GEMM tile, or oneDNN's bf16 GEMM on a CPU with
    bf16 products) against the dequantized weight in fp32, within bf16's rounding."""
    torch.manual_seed(0)
    w, b = torch.randn(72, 320), torch.randn(72).bfloat16()
    blocks = Q.quantize_blocks(w, fmt)
    x = torch.randn(2, 150, 320).bfloat16()  # 300 rows: above BF16_GEMM_MIN_ROWS
    got = Q._linear(fmt, x, blocks, 320, b)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 150, 72)
    want = F_linear(x.float(), Q._dequantize_torch(blocks, fmt), b.float())
    assert rel_err(got.float(), want) < 1e-2
