"""MTP speculative decoding: greedy output identical to plain decoding, MTP caches built from true inputs only,
sampled output distributed exactly as the model's (chi-square against the exact distribution)."""

import math

import pytest
import torch
from helpers import greedy_reference, tiny_model

from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams, filtered_probs
from mimo.inference.speculative import SpecStats
from mimo.model import KVCache

PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [3, 3]]


def structured_model(vocab=16, num_mtp=1, sharp=0.1, noise=0.05, mtp_noise=0.5, seed=0):
    """A tiny model whose next token is mostly (x + 1) % vocab, with MTP layers that copy the rule through their
    embedding input: drafts are often right, so acceptance is neither 0 nor 1. sharp scales the logits."""
    model = tiny_model(seed=seed, vocab_size=vocab, num_mtp=num_mtp, initializer_range=noise)
    g = torch.Generator().manual_seed(seed + 1)
    H = model.config.hidden_size
    with torch.no_grad():
        E = torch.randn(vocab, H, generator=g)
        model.model.embed_tokens.weight.copy_(E)
        model.lm_head.weight.copy_(sharp * E.roll(1, 0))  # logits[y] ~ <E[y-1], h>: y = x + 1 wins
        for layer in model.model.mtp_layers:
            layer.input_proj.weight[:, H:] += torch.eye(H) + mtp_noise * torch.randn(H, H, generator=g)
    return model


@pytest.mark.parametrize("num_mtp", [1, 2])
def test_greedy_identical_with_and_without_mtp(num_mtp):
    for model in (tiny_model(vocab_size=64, num_mtp=num_mtp), structured_model(num_mtp=num_mtp, noise=0.1)):
        engine = Engine(model, None)
        plain = engine.generate(PROMPTS, SamplingParams(max_new_tokens=14))
        for p, o in zip(PROMPTS, plain):
            assert o.tokens == greedy_reference(model, p, 14, [])
        for k in (1, 2, 3):
            outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=14), mtp=True, num_draft=k)
            assert [o.tokens for o in outs] == [o.tokens for o in plain]
            stats = SpecStats.merge(o.spec for o in outs)
            assert stats.drafted == k * stats.verify_steps > 0
            assert all(len(o.logprobs) == len(o.tokens) for o in outs)
            for o, ref in zip(outs, plain):
                assert torch.allclose(torch.tensor(o.logprobs), torch.tensor(ref.logprobs), atol=1e-4)


def test_mtp_at_the_context_limit_and_with_short_prompts():
    """Drafts past the context end, chained drafts, and 3 MTP layers on 1-token prompts (whose catch-up starts
    before position 0) all leave greedy output unchanged."""
    model = structured_model(num_mtp=3, noise=0.1)
    engine = Engine(model, None, max_seq_len=16)
    prompts = [list(range(14)), [1], [2, 3], list(range(15))]
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=30))
    for k in (2, 4):
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=30), mtp=True, num_draft=k)
        assert [o.tokens for o in outs] == [o.tokens for o in plain]
        assert all(len(o.prompt_tokens) + len(o.tokens) == 16 and o.finish_reason == "length" for o in outs)


def test_acceptance_stats():
    model = structured_model(num_mtp=2, mtp_noise=0.0)  # the MTP layers predict the main model exactly
    # ... from their token input, which is zeroed at position 0: a 1-token prompt's first drafts would miss
    prompts = [p for p in PROMPTS if len(p) > 1]
    outs = Engine(model, None).generate(prompts, SamplingParams(max_new_tokens=16), mtp=True, num_draft=3)
    stats = SpecStats.merge(o.spec for o in outs)
    assert stats.acceptance_rate == 1.0 and stats.first_acceptance_rate == 1.0
    assert stats.mean_accepted_length == 4.0
    noisy = structured_model(num_mtp=2, mtp_noise=0.5)
    outs = Engine(noisy, None).generate(PROMPTS, SamplingParams(max_new_tokens=16), mtp=True, num_draft=3)
    stats = SpecStats.merge(o.spec for o in outs)
    assert 0.1 < stats.acceptance_rate < 0.9
    assert stats.as_dict()["accepted"] == stats.accepted


def reference_cache(model, seq: list[int]) -> KVCache:
    """KV caches of the main model and every MTP layer, computed without speculation over the whole sequence."""
    cfg = model.config
    cache = KVCache(cfg, 1, len(seq) + 1)
    ids = torch.tensor([seq])
    pos = torch.arange(len(seq))[None]
    prev = model.hidden_states(ids, pos, cache)
    for j in range(cfg.num_nextn_predict_layers):
        n = len(seq) - j - 1
        if n <= 0:
            break
        prev, _ = model.mtp_step(j, prev[:, :n], ids[:, j + 1:], pos[:, :n], cache)
    return cache


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mtp_caches_hold_entries_from_true_inputs(temperature):
    """After every step, each running row's main cache (positions <= L-2) and MTP layer j cache (positions
    <= L-j-2) equal a plain forward over its committed tokens: rejected drafts left no trace."""
    model = structured_model(num_mtp=2, noise=0.1, mtp_noise=0.5, sharp=0.05)
    L_main = model.config.num_hidden_layers
    session = Engine(model, None).session(max_batch=3, mtp=True, num_draft=3)
    for i, p in enumerate(PROMPTS):
        session.add(p, SamplingParams(max_new_tokens=10 + 3 * i, temperature=temperature, seed=i))
    checked = 0
    with torch.no_grad():
        while session.has_work():
            session.step()
            for slot in session.running():
                L = int(session.length[slot])
                ref = reference_cache(model, session.hist[slot, :L].tolist())
                for layer in range(L_main + 2):
                    n = L - 1 - max(0, layer - L_main + 1)  # true positions 0..n-1
                    for got, want in ((session.runner.cache.k, ref.k), (session.runner.cache.v, ref.v)):
                        assert torch.allclose(got[layer][slot, :, :n], want[layer][0, :, :n], atol=1e-4), layer
                checked += 1
    assert checked > 10
    accepted = [session.completion(r).spec.accepted for r in range(len(PROMPTS))]
    drafted = [session.completion(r).spec.drafted for r in range(len(PROMPTS))]
    assert 0 < sum(accepted) < sum(drafted)


# ---- sampling is lossless: chi-square tests --------------------------------------------------------

def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square with df degrees of freedom at alpha = 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_statistic(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Goodness of fit; cells expecting fewer than 5 are pooled into one."""
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def exact_pair_distributions(model, prompt, params):
    """Exact P(x0, x1) and P(x1, x2) of the first three sampled tokens under the filtered distribution."""
    V = model.config.vocab_size
    grid = torch.cartesian_prod(torch.arange(V), torch.arange(V))  # [V*V, 2]: x0, x1
    seqs = torch.cat([torch.tensor(prompt).expand(V * V, -1), grid], 1)
    with torch.no_grad():
        logits = model(seqs).logits[:, len(prompt) - 1:]  # predicts x0, x1, x2
    probs = filtered_probs(logits.reshape(-1, V), params).view(V * V, 3, V)
    p0 = probs[0, 0]  # [V]
    p1 = probs[:, 1].view(V, V, V)[:, 0]  # p(x1 | x0): [x0, x1]
    p2 = probs[:, 2].view(V, V, V)  # p(x2 | x0, x1): [x0, x1, x2]
    joint01 = p0[:, None] * p1
    joint12 = (joint01[:, :, None] * p2).sum(0)
    return joint01, joint12


def sample_pairs(model, prompt, params, n, draft_quantize=None, draft_vocab=None, **kw):
    outs = Engine(model, None, draft_quantize=draft_quantize, draft_vocab=draft_vocab).generate([prompt] * n, params,
                                                                                                **kw)
    toks = torch.tensor([o.tokens[:3] for o in outs])
    V = model.config.vocab_size
    c01 = torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V).double()
    c12 = torch.bincount(toks[:, 1] * V + toks[:, 2], minlength=V * V).double()
    return c01, c12, SpecStats.merge(o.spec for o in outs)


@pytest.mark.parametrize("num_mtp,params", [
    (1, SamplingParams(max_new_tokens=3, temperature=1.0, seed=11)),
    (2, SamplingParams(max_new_tokens=3, temperature=0.8, top_k=6, top_p=0.9, seed=12)),
])
def test_speculative_sampling_matches_the_models_distribution(num_mtp, params):
    model = structured_model(vocab=8, num_mtp=num_mtp, sharp=0.04, noise=0.3, mtp_noise=0.5)
    prompt = [1, 4, 2]
    n = 6000
    joint01, joint12 = exact_pair_distributions(model, prompt, params)
    plain01, plain12, _ = sample_pairs(model, prompt, params, n)
    spec01, spec12, stats = sample_pairs(model, prompt, params, n, mtp=True, num_draft=2)
    assert 0.2 < stats.acceptance_rate < 0.95  # both acceptance and rejection paths are exercised
    for counts, exact in ((plain01, joint01), (plain12, joint12), (spec01, joint01), (spec12, joint12)):
        stat, df = chi2_statistic(counts, n * exact.flatten().double())
        assert stat < chi2_critical(df), (stat, df)
    # and the two samplers against each other (homogeneity: pooled expectation)
    for a, b in ((plain01, spec01), (plain12, spec12)):
        pooled = (a + b) / 2
        keep = pooled >= 5
        stat = float((((a - pooled) ** 2 + (b - pooled) ** 2) / pooled)[keep].sum())
        assert stat < chi2_critical(int(keep.sum()) - 1)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_drafts_stay_lossless(method):
    """Drafts from quantized copies of the MTP layers and LM head: greedy output unchanged, sampled output still
    distributed as the full-precision model's; the model itself is left as it was."""
    from mimo.quantize import QUANTIZED_LINEAR

    model = structured_model(num_mtp=2, noise=0.1)
    engine = Engine(model, None, draft_quantize=method)
    layers, head = engine.drafter
    assert isinstance(head, QUANTIZED_LINEAR[method]) and isinstance(model.lm_head, torch.nn.Linear)
    assert layers[0].final_layernorm.weight is model.model.mtp_layers[0].final_layernorm.weight
    plain = Engine(model, None).generate(PROMPTS, SamplingParams(max_new_tokens=14))
    for k in (1, 3):
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=14), mtp=True, num_draft=k)
        assert [o.tokens for o in outs] == [o.tokens for o in plain]
        assert SpecStats.merge(o.spec for o in outs).acceptance_rate > 0.3
    model = structured_model(vocab=8 if method == "int8" else 16, num_mtp=1, sharp=0.04, noise=0.3, mtp_noise=0.5)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=13)
    n = 6000
    joint01, joint12 = exact_pair_distributions(model, [1, 4, 2], params)
    spec01, spec12, stats = sample_pairs(model, [1, 4, 2], params, n, draft_quantize=method, mtp=True, num_draft=2)
    assert 0.1 < stats.acceptance_rate < 0.95
    for counts, exact in ((spec01, joint01), (spec12, joint12)):
        stat, df = chi2_statistic(counts, n * exact.flatten().double())
        assert stat < chi2_critical(df), (stat, df)


@pytest.mark.parametrize("method", [None, "int4"])
def test_drafts_over_the_first_ids_stay_lossless(method):
    """draft_vocab: drafts pick among the first ids only, through a view of the head's first rows; greedy output
    unchanged, sampled output still distributed as the model's, and a token past the first ids is never drafted
    (never accepted as a draft)."""
    model = structured_model(vocab=16, num_mtp=2, noise=0.1)
    engine = Engine(model, None, draft_quantize=method, draft_vocab=8)
    head = engine.drafter[1]
    assert head.out_features == 8
    if method is None:
        assert head.weight.data_ptr() == model.lm_head.weight.data_ptr()  # a view, not a copy
    assert Engine(model, None, draft_vocab=16).drafter[1] is model.lm_head  # the whole vocabulary: the head itself
    plain = Engine(model, None).generate(PROMPTS, SamplingParams(max_new_tokens=14))
    full = Engine(model, None, draft_quantize=method).generate(PROMPTS, SamplingParams(max_new_tokens=14), mtp=True)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=14), mtp=True, num_draft=2)
    assert [o.tokens for o in outs] == [o.tokens for o in plain]
    assert 0 < SpecStats.merge(o.spec for o in outs).acceptance_rate < SpecStats.merge(o.spec for o in full).acceptance_rate
    model = structured_model(vocab=16, num_mtp=1, sharp=0.04, noise=0.3, mtp_noise=0.5)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, seed=14)
    n = 6000
    joint01, joint12 = exact_pair_distributions(model, [1, 4, 2], params)
    spec01, spec12, stats = sample_pairs(model, [1, 4, 2], params, n, draft_quantize=method, draft_vocab=8,
                                         mtp=True, num_draft=2)
    assert 0.05 < stats.acceptance_rate < 0.95
    for counts, exact in ((spec01, joint01), (spec12, joint12)):
        stat, df = chi2_statistic(counts, n * exact.flatten().double())
        assert stat < chi2_critical(df), (stat, df)


def test_draft_quantize_without_mtp_layers_is_a_no_op():
    model = tiny_model(vocab_size=64, num_mtp=0)
    engine = Engine(model, None, draft_quantize="int4")
    assert engine.drafter[1] is model.lm_head
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), mtp=True)
    assert [o.tokens for o in outs] == [o.tokens for o in Engine(model, None).generate(PROMPTS, SamplingParams(
        max_new_tokens=6))]


def test_seeded_sampling_with_mtp_is_reproducible():
    model = structured_model(num_mtp=1, sharp=0.03)
    engine = Engine(model, None)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=5)
    a = engine.generate(PROMPTS, params, mtp=True, num_draft=2)
    b = engine.generate(PROMPTS, params, mtp=True, num_draft=2)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert len({tuple(o.tokens) for o in engine.generate([[5]] * 4, params, mtp=True)}) > 1  # rows differ


@pytest.mark.slow
def test_compiled_engine_decodes_and_speculates_exactly_as_eager(monkeypatch):
    """compile=True: the plain decode step and MTP's greedy draft-verify step run through torch.compile (static
    shapes: every slot, the whole cache) for batches of up to COMPILED_MAX_ROWS rows; outputs stay token-for-token
    those of the eager engine, and the compiled steps are the ones that ran."""
    from mimo.inference import model_runner, speculative

    assert model_runner.ModelRunner.COMPILED_MAX_ROWS == 2
    ran = []  # the compiled callables called, in order
    call = model_runner.InferenceCompiled.__call__
    monkeypatch.setattr(model_runner.InferenceCompiled, "__call__", lambda self, *a: (ran.append(self), call(self, *a))[1])
    model = structured_model(num_mtp=2, noise=0.1)
    # ragged (1 and 11 tokens); the first row ends first, so every step runs both slots: one graph each
    pair = [PROMPTS[1], PROMPTS[2]]
    greedy = SamplingParams(max_new_tokens=14)
    reference = Engine(model, None).generate(pair, greedy)
    eager = [o.tokens for o in reference]

    def same_logprobs(outs):  # the tokens' log-probs too: the same model computed them
        return all(torch.allclose(torch.tensor(o.logprobs), torch.tensor(r.logprobs), atol=1e-5)
                   for o, r in zip(outs, reference))

    engine = Engine(model, None, compile=True)
    outs = engine.generate(pair, greedy, mtp=True, num_draft=3)
    assert [o.tokens for o in outs] == eager and same_logprobs(outs)
    assert SpecStats.merge(o.spec for o in outs).acceptance_rate > 0.3
    advance = speculative._compiled_advance_fn
    assert ran and set(ran) == {advance}  # every draft-verify step compiled
    ran.clear()
    outs = engine.generate(pair, greedy)
    assert [o.tokens for o in outs] == eager and same_logprobs(outs)
    decode = engine._idle_runner.compiled_decode
    assert len(ran) >= 13 and set(ran) == {decode}  # every token after the prefill's from the compiled decode
    ran.clear()
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)  # sampling takes the eager step
    assert ([o.tokens for o in engine.generate(pair, sampled, mtp=True, num_draft=3)]
            == [o.tokens for o in Engine(model, None).generate(pair, sampled, mtp=True, num_draft=3)])
    assert ran == []
