import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config, tiny_model

from mimo.checkpoint import load_model, save_model
from mimo.config import preset_config
from mimo.model import KVCache, MiMoForCausalLM


@pytest.fixture(scope="module")
def transformers():
    """Only the tests that compare with transformers need it; the rest run without it."""
    return pytest.importorskip("transformers")


def hf_qwen2(transformers, seed=0, tie=False):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=50000.0, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_qwen2_loads_with_same_logits_and_greedy(tmp_path, tie, transformers):
    hf = hf_qwen2(transformers, tie=tie)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.num_nextn_predict_layers == 0 and ours.config.rope_theta == 50000.0
    x = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x).logits).abs().max().item()
    assert diff <= 1e-4
    prompt = x[:1, :5]
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, 5:].tolist()
        seq = prompt
        for _ in range(12):
            nxt = ours(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert seq[0, 5:].tolist() == ref


def test_mimo_checkpoint_loads_in_transformers_qwen2(tmp_path, transformers):
    ours = tiny_model(vocab_size=300, num_mtp=1)
    save_model(ours, tmp_path / "m")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "m").eval()  # MTP tensors ignored
    x = torch.randint(0, 300, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max().item() <= 1e-4


def rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_mtp_layer_matches_formula():
    """MTP layer 0 recomputed here from the raw weights, independently of mimo.model."""
    model = tiny_model(num_mtp=1)
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    targets = x.roll(-1, 1)
    targets[:, -1] = -100  # no next token for the last position
    with torch.no_grad():
        out = model(x, targets=targets, return_mtp_logits=True)
    h_main = out.hidden.double()[0]  # [T, H], before model.norm
    T, eps, p = x.shape[1] - 1, cfg.rms_norm_eps, "model.mtp_layers.0."
    e = rms(sd["model.embed_tokens.weight"][x[0, 1:]], sd[p + "token_layernorm.weight"], eps)
    e[0] = 0  # vLLM zeroes the token embedding at position 0 (and RMSNorm keeps it zero)
    h = rms(h_main[:T], sd[p + "hidden_layernorm.weight"], eps)
    z = torch.cat([h, e], -1) @ sd[p + "input_proj.weight"].T  # order [hidden, embed]
    # one Qwen2 decoder block, causal attention with RoPE at positions 0..T-1
    a = rms(z, sd[p + "input_layernorm.weight"], eps)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (a @ sd[p + "self_attn.q_proj.weight"].T + sd[p + "self_attn.q_proj.bias"]).view(T, nh, hd)
    k = (a @ sd[p + "self_attn.k_proj.weight"].T + sd[p + "self_attn.k_proj.bias"]).view(T, nkv, hd)
    v = (a @ sd[p + "self_attn.v_proj.weight"].T + sd[p + "self_attn.v_proj.bias"]).view(T, nkv, hd)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).double() / hd))
    ang = torch.arange(T).double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]

    def rot(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1) * sin

    q, k = rot(q), rot(k)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
    att = torch.einsum("thd,shd->hts", q, k) / hd**0.5
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    y = torch.einsum("hts,shd->thd", att, v).reshape(T, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
    z = z + y
    m = rms(z, sd[p + "post_attention_layernorm.weight"], eps)
    z = z + (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) \
        @ sd[p + "mlp.down_proj.weight"].T
    logits = rms(z, sd[p + "final_layernorm.weight"], eps) @ sd["lm_head.weight"].T
    assert (logits - out.mtp_logits[0][0].double()).abs().max().item() < 1e-4
    # the MTP loss scores token t+2 at position t
    ce = F.cross_entropy(logits[: T - 1], x[0, 2:])
    assert abs(ce.item() - out.mtp_losses[0].item()) < 1e-4


def test_mtp_ignores_the_token_at_position_0_as_vllm():
    """vLLM's and SGLang's MiMo MTP zero the token embedding at position 0 (`inputs_embeds[positions == 0] = 0`):
    every MTP layer's output at position 0 depends on the hidden state only; later positions read their token."""
    model = tiny_model(num_mtp=2)
    x = torch.randint(0, 399, (1, 12), generator=torch.Generator().manual_seed(6))

    def changed(i):
        y = x.clone()
        y[0, i] += 1
        return y

    with torch.no_grad():
        h = model.hidden_states(x)
        for k in range(2):  # layer k at position t reads x[t+k+1]
            n = 12 - k - 1

            def logits(ids, positions=None, k=k, n=n):
                return model.mtp_step(k, h[:, :n], ids[:, k + 1:], positions)[1]

            assert torch.equal(logits(x), logits(changed(k + 1)))  # position 0's token: no effect anywhere
            assert not torch.allclose(logits(x)[:, 1], logits(changed(k + 2))[:, 1])  # position 1's: read
            later = torch.arange(5, 5 + n)[None]  # the same tokens further into a sequence are read
            assert not torch.allclose(logits(x, later)[:, 0], logits(changed(k + 1), later)[:, 0])


def test_packed_documents_do_not_see_each_other():
    """A row packing two documents (positions restarting at 0 at the second) gives each document's logits, MTP
    logits and loss exactly as run alone: attention stays inside a document."""
    model = tiny_model(num_mtp=2)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 400, (1, 9), generator=g), torch.randint(0, 400, (1, 7), generator=g)
    row = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(9), torch.arange(7)])[None]
    targets = torch.cat([a.roll(-1, 1), b.roll(-1, 1)], 1)
    targets[0, [8, 15]] = -100  # no target across the boundary or past the end
    with torch.no_grad():
        packed = model(row, targets, positions=positions, return_mtp_logits=True)
        alone = [model(d, t, return_mtp_logits=True) for d, t in ((a, targets[:, :9]), (b, targets[:, 9:]))]
        plain = model(row, targets, return_mtp_logits=True)  # no positions: one causal sequence
    assert torch.allclose(packed.logits, torch.cat([o.logits for o in alone], 1), atol=1e-5)
    assert not torch.allclose(plain.logits[:, 9:], alone[1].logits, atol=1e-3)
    for k in range(2):  # MTP layer k's rows t < len - k - 1 of each document read only that document
        assert torch.allclose(packed.mtp_logits[k][:, : 9 - k - 1], alone[0].mtp_logits[k], atol=1e-5)
        assert torch.allclose(packed.mtp_logits[k][:, 9: 16 - k - 1], alone[1].mtp_logits[k], atol=1e-5)
    ntp = sum(torch.nn.functional.cross_entropy(o.logits[0, :-1], t[0, :-1], reduction="sum")
              for o, t in zip(alone, (targets[:, :9], targets[:, 9:]))) / 14
    assert torch.allclose(packed.ntp_loss, ntp, atol=1e-5)


def test_losses_combine_with_mtp_weight():
    model = tiny_model(num_mtp=2)
    x = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(4))
    out = model(x[:, :-1], targets=x[:, 1:], mtp_weight=0.1)
    assert len(out.mtp_losses) == 2
    expected = out.ntp_loss + 0.1 * (out.mtp_losses[0] + out.mtp_losses[1]) / 2
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    assert model.model.mtp_layers[1].input_proj.weight.grad.abs().sum() > 0
    no_mtp = tiny_model(num_mtp=0)
    out0 = no_mtp(x[:, :-1], targets=x[:, 1:])
    assert out0.mtp_losses == [] and torch.equal(out0.loss, out0.ntp_loss)


def test_ignored_targets_are_masked():
    model = tiny_model()
    x = torch.randint(0, 400, (1, 10), generator=torch.Generator().manual_seed(5))
    t = x.roll(-1, 1)
    t[:, :6] = -100
    out = model(x, targets=t)
    ref = F.cross_entropy(out.logits[0, 6:], t[0, 6:])
    assert torch.allclose(out.ntp_loss, ref, atol=1e-6)


def test_kv_cache_matches_full_forward_for_ragged_batch():
    model = tiny_model()
    x = torch.randint(0, 400, (2, 14), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.config, 2, 32)
        pos = torch.arange(14)[None].expand(2, -1)
        a = model.logits(model.hidden_states(x[:, :9], pos[:, :9], cache))
        b = model.logits(model.hidden_states(x[:, 9:], pos[:, 9:], cache))
        assert (torch.cat([a, b], 1) - full).abs().max() < 1e-5
        # row 1 alone, through its slot, one token at a time
        cache2 = KVCache(model.config, 2, 32)
        for t in range(14):
            h = model.hidden_states(x[1:, t:t + 1], torch.tensor([[t]]), cache2, slots=torch.tensor([1]))
        assert (model.logits(h)[0, -1] - full[1, -1]).abs().max() < 1e-5


def test_tied_embeddings_share_storage(tmp_path):
    model = tiny_model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_model(model, tmp_path / "tied")
    loaded = load_model(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, 400, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_mimo_7b_on_meta_device_has_published_counts():
    with torch.device("meta"):
        model = MiMoForCausalLM(preset_config("mimo-7b"))
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == {"main": 7_622_619_136, "mtp_per_layer": 210_790_400, "total": 7_833_409_536}
    names = set(model.state_dict())
    for n in ("model.mtp_layers.0.input_proj.weight", "model.mtp_layers.0.token_layernorm.weight",
              "model.mtp_layers.0.hidden_layernorm.weight", "model.mtp_layers.0.final_layernorm.weight",
              "model.mtp_layers.0.self_attn.q_proj.bias", "model.layers.35.mlp.down_proj.weight", "lm_head.weight"):
        assert n in names
    assert model.model.mtp_layers[0].input_proj.weight.shape == (4096, 8192)


def test_presets_sizes():
    with torch.device("meta"):
        counts = {p: MiMoForCausalLM(preset_config(p)).num_params()["total"] for p in ("nano", "tiny", "small")}
    assert counts["nano"] <= 1_100_000
    assert 5_000_000 <= counts["tiny"] <= 30_000_000
    assert 100_000_000 <= counts["small"] <= 150_000_000


def test_config_dial_is_consistent():
    cfg = tiny_config()
    assert cfg.head_dim == 16
    with tempfile.TemporaryDirectory() as d:
        cfg.save(f"{d}/config.json")
        from mimo.config import MiMoConfig

        assert MiMoConfig.load(f"{d}/config.json") == cfg
