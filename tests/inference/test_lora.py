"""LoRA: `mimo tune` on documents and chats (loss where it belongs, resume after a kill, QLoRA gradients), adapters
in PEFT's format (names and fields checked without peft; logits equal through peft when it is installed), the
adapter on generate and merge, several adapters in one batch (with MTP speculation), and bad input."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from helpers import run_killed_at_checkpoint, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file

from mimo import kernels
from mimo.checkpoint import load_model, load_model_and_tokenizer, save_model
from mimo.cli import main
from mimo.inference.adapters import load_adapter, save_adapter
from mimo.inference.engine import Engine
from mimo.inference.lora import (
    DEFAULT_TARGETS,
    PARENT,
    Adapter,
    LoRAConfig,
    add_lora,
    attach_adapters,
    lora_modules,
)
from mimo.inference.model_runner import _fast
from mimo.inference.sampling import SamplingParams
from mimo.quantize import quantize_linears

FACTS = [("Ada", "tea", "Porto"), ("Ben", "coffee", "Oslo"), ("Cleo", "juice", "Lima"), ("Dan", "milk", "Kyoto")]


@pytest.fixture()
def notes(tmp_path):
    """A folder of notes (.md, .txt) and chat transcripts (.jsonl)."""
    d = tmp_path / "notes"
    d.mkdir()
    (d / "people.md").write_text("\n\n".join(f"# {n}\n{n} drinks {drink} and lives in {city}." for n, drink, city in
                                             FACTS * 3))
    (d / "diary.txt").write_text("Today I met Ada in Porto. She ordered tea, as always.\n" * 4)
    chats = [{"messages": [{"role": "user", "content": f"Where does {n} live?"},
                           {"role": "assistant", "content": f"{n} lives in {city}."}]} for n, _, city in FACTS * 4]
    (d / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return d


def random_update(model, seed: int, rank: int = 4, targets=DEFAULT_TARGETS, alpha: float = 8.0):
    """add_lora with B random too (a fresh update is zero), as a trained adapter has it."""
    add_lora(model, LoRAConfig(r=rank, alpha=alpha, dropout=0.0, target_modules=targets), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
    return model.eval()


def write_adapter(model_dir, out, seed, **kw):
    model, _ = load_model_and_tokenizer(model_dir)
    random_update(model, seed, **kw)
    cfg = LoRAConfig(r=kw.get("rank", 4), alpha=kw.get("alpha", 8.0), target_modules=kw.get("targets",
                                                                                           DEFAULT_TARGETS))
    save_adapter(model, out, cfg, str(model_dir))
    return model


def test_a_fresh_update_changes_nothing_and_qlora_gradients_follow_the_quantized_weights():
    base = tiny_model(vocab_size=300)
    x = torch.randint(0, 300, (2, 12))
    tuned = add_lora(copy.deepcopy(base), LoRAConfig(r=4))
    assert torch.equal(tuned(x).logits, base(x).logits)
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} == {
        f"model.layers.{i}.{PARENT[t]}.{t}.lora_{ab}" for i in range(2) for t in DEFAULT_TARGETS for ab in "AB"}

    # LoRA on int8 weights (QLoRA) gets the gradients of LoRA on the float weights those blocks stand for
    quantized = quantize_linears(copy.deepcopy(base), "int8")
    dequantized = copy.deepcopy(base)
    for name, m in quantized.named_modules():
        if hasattr(m, "dequantized"):
            dequantized.get_submodule(name).weight.data = m.dequantized()
    grads = []
    for model in (quantized, dequantized):
        random_update(model, seed=3).train()
        loss = model(x, targets=x.roll(-1, 1)).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].norm() > 0
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999  # (the kernels round
    # activations to int8 blocks in the forward pass, so not exactly equal)


def rows_of(run_dir):
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tune_writes_a_peft_adapter_learns_and_resumes_after_a_kill(model_dir, notes, tmp_path, monkeypatch, capfd):
    from mimo.train import loop
    from mimo.train import tune as tune_module

    def tune(out, *extra):
        return main(["tune", str(model_dir), "--data", str(notes), "--out", str(out), "--max-steps", "6",
                     "--save-every", "3", "--eval-every", "1", "--seq-len", "64", "--rank", "4", "--lr", "3e-2",
                     "--val-fraction", "0.1", "--train-head", "off", "--replay", "16", "--document-chats", "off",
                     *extra])  # (document chats: test_documents_are_learnt_...)

    monkeypatch.setattr(tune_module, "TUNE_DEFAULTS", replace(tune_module.TUNE_DEFAULTS, log_every=1, warmup_steps=2))
    ref = tmp_path / "ref"
    assert tune(ref) == 0
    config = json.loads((ref / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias", "target_modules",
                                   "layers_to_transform", "layers_pattern", "base_model_name_or_path")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "bias": "none",
        "target_modules": sorted(DEFAULT_TARGETS), "layers_to_transform": [0, 1], "layers_pattern": "layers",
        "base_model_name_or_path": str(model_dir.resolve())}
    tensors = load_file(str(ref / "adapter_model.safetensors"))
    # PEFT's names: PeftModelForCausalLM.base_model (LoraModel).model, then the transformers model's module names
    assert {k: list(v.shape) for k, v in tensors.items()} == {
        f"base_model.model.model.layers.{i}.{PARENT[t]}.{t}.lora_{ab}.weight": shape
        for i in range(2) for t, (out, inp) in {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64),
                                                "o_proj": (64, 64), "gate_proj": (160, 64), "up_proj": (160, 64),
                                                "down_proj": (64, 160)}.items()
        for ab, shape in (("A", [4, inp]), ("B", [out, 4]))}
    stats = json.loads((ref / "tune_config.json").read_text())["data_stats"]
    assert stats["documents"] == 2 and stats["conversations"] == 16 and stats["validation_examples"] >= 1
    rows = rows_of(ref)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["mtp_loss"] is None for r in rows)
    # it learns (a random base, 6 steps; measured: training 6.02 -> 5.68, validation 5.94 -> 5.67)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2 and rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.2

    out = tmp_path / "killed"
    run_killed_at_checkpoint(monkeypatch, loop, 6, lambda: tune(out))
    assert not (out / "adapter_model.safetensors").exists()
    capfd.readouterr()
    assert tune(out) == 0
    assert "resuming from step 3" in capfd.readouterr().err
    assert rows_of(out) == rows
    again = load_file(str(out / "adapter_model.safetensors"))
    assert all(torch.equal(tensors[k], again[k]) for k in tensors)

    # QLoRA: the same run on an int4 base trains and writes the same names
    assert tune(tmp_path / "q4", "--quantize", "int4") == 0
    assert load_file(str(tmp_path / "q4" / "adapter_model.safetensors")).keys() == tensors.keys()


def test_tune_base_keeps_a_bf16_embedding_exactly_and_recomputed_activations_change_no_gradient(model_dir, tmp_path):
    from mimo.train.tune import checkpoint_activations, load_base

    model, tokenizer = load_model_and_tokenizer(model_dir)
    save_model(model, tmp_path / "bf16", tokenizer=tokenizer, dtype=torch.bfloat16)
    base = load_base(tmp_path / "bf16", None)[0]
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16  # half the bytes of the frozen table
    reference = load_model_and_tokenizer(tmp_path / "bf16", "float32")[0]
    x = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(base(x).logits, reference(x).logits)

    grads = []
    for recompute in (False, True):
        tuned = random_update(copy.deepcopy(base), seed=1)
        if recompute:
            checkpoint_activations(tuned)
        tuned(x, targets=x).loss.backward()
        grads.append({n: p.grad for n, p in tuned.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-7, msg=n)


def test_replay_is_the_base_models_own_finished_replies_to_train_split_problems(model_dir, notes, monkeypatch):
    from mimo.inference.engine import Engine
    from mimo.inference.sampling import SamplingParams
    from mimo.train import tune as tune_module
    from mimo.train.rewards import reasoning_problems
    from mimo.train.tune import load_base, replay_conversations

    model, tok = load_model_and_tokenizer(model_dir)
    problems = reasoning_problems(None, 6, seed=10_007)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p.prompt}])) for p in problems]
    done = Engine(model.eval(), tok).generate(prompts, SamplingParams(max_new_tokens=6))
    replay = replay_conversations(model, tok, 6, seed=0, max_new_tokens=6)
    assert replay == [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": c.text}]
                      for p, c in zip(problems, done) if c.finish_reason == "stop"]
    assert replay_conversations(model, tok, 6, seed=0, max_new_tokens=6) == replay  # greedy: the same on resume
    assert not {p.id for p in problems} & {p.id for p in reasoning_problems(None, 2000, seed=0)}  # not mimo rl's pool

    # a bf16 checkpoint tuned on an int4 base (its embedding kept in bf16 for training) replays first, then trains
    save_model(model, model_dir.parent / "bf16", tokenizer=tok, dtype=torch.bfloat16)
    assert main(["tune", str(model_dir.parent / "bf16"), "--data", str(notes), "--out", str(model_dir.parent / "a"),
                 "--quantize", "int4", "--replay", "2", "--max-steps", "1", "--seq-len", "64"]) == 0
    stats = json.loads((model_dir.parent / "a" / "tune_config.json").read_text())["data_stats"]
    assert stats["replay"] == len(replay_conversations(load_base(model_dir.parent / "bf16", "int4", shrink=False)[0],
                                                       tok, 2, seed=0))
    # a resumed run reads its replay back rather than generating it again
    monkeypatch.setattr(tune_module, "replay_conversations", lambda *a, **k: pytest.fail("replay generated again"))
    assert main(["tune", str(model_dir.parent / "bf16"), "--data", str(notes), "--out", str(model_dir.parent / "a"),
                 "--quantize", "int4", "--replay", "2", "--max-steps", "2", "--seq-len", "64"]) == 0


def test_only_assistant_turns_and_every_document_token_are_targets(tokenizer):
    from mimo.train.tune import tokenize

    chat = [{"role": "user", "content": "Where does Ada live?"}, {"role": "assistant", "content": "Porto."}]
    examples, too_long = tokenize(tokenizer, ["Ada drinks tea. " * 40], [chat, chat * 8], seq_len=64)
    docs, (_, labels) = examples[:-1], examples[-1]
    n = len(tokenizer.encode("Ada drinks tea. " * 40)) + 1  # the end of text too (a lone last token: no target)
    assert too_long == 1 and sum(len(i) for i, _ in docs) >= n - 1 and all(i == lab and len(i) <= 65 for i, lab in docs)
    assert tokenizer.decode([t for t in labels if t >= 0]) == "Porto.<|im_end|>"


def test_documents_are_learnt_passage_by_passage_with_sentences_reordered_each_epoch(tokenizer, monkeypatch):
    from mimo.train import tune as tune_module
    from mimo.train.tune import passages, tuning_data

    def tuning_examples(*args, epochs, **kwargs):  # every epoch's examples, laid end to end
        epoch_examples, val, too_long = tuning_data(*args, **kwargs)
        return [x for e in range(epochs) for x in epoch_examples(e)], val, too_long

    notes = ("# People\n\n## Ada\nAda lives in Porto. Ada plays the oboe. Dr. Lee is her dentist.\n\n"
             "Called Ada today.\nBo visited Ada!\n\nProse wrapped\nacross two lines.\n")
    assert passages(notes) == ["# People\n## Ada\nAda lives in Porto. Ada plays the oboe. Dr. Lee is her dentist.",
                               "Called Ada today.", "Bo visited Ada!", "Prose wrapped\nacross two lines."]
    chat = [{"role": "user", "content": "Where does Ada live?"}, {"role": "assistant", "content": "Porto."}]
    train, val, too_long = tuning_examples(tokenizer, [notes], [chat] * 6, 64, epochs=3, val_fraction=0.0,
                                           seed=0, shuffle_sentences=True)
    texts = [tokenizer.decode(ids).removesuffix("<|endoftext|>") for ids, labels in train if ids == labels]
    assert too_long == 0 and val == [] and len(train) == 3 * 10 and len(texts) == 3 * 4
    profiles = [t for t in texts if t.startswith("# People\n## Ada\n")]
    sentences = ["Ada lives in Porto.", "Ada plays the oboe.", "Dr. Lee is her dentist."]
    assert len(profiles) == 3 and len(set(profiles)) > 1  # each epoch its own order
    assert all(sorted(t.split("\n")[2].replace(". ", ".|").replace("Dr.|", "Dr. ").split("|")) == sorted(sentences)
               for t in profiles)
    assert texts.count("Prose wrapped\nacross two lines.") == 3  # one sentence: as written
    kept, _, _ = tuning_examples(tokenizer, [notes], [], 64, epochs=2, val_fraction=0.0, seed=0,
                                 shuffle_sentences=False)
    assert kept[:4] == kept[4:] and "# People\n## Ada\nAda lives in Porto. Ada plays the oboe. Dr. Lee is her " \
        "dentist.<|endoftext|>" in [tokenizer.decode(ids) for ids, _ in kept]
    # held-out passages and chats are in no epoch's training copy
    train, val, _ = tuning_examples(tokenizer, [notes], [chat] * 6, 64, epochs=2, val_fraction=0.2, seed=0,
                                    shuffle_sentences=False)
    assert len(val) == 2 and len(train) == 2 * 8 and not any(v in train for v in val if v[0] == v[1])
    # the loop's rows: epoch after epoch, each epoch's every row once (two rows a step, one a micro batch)
    batches = tune_module.EpochBatches(tuning_data(tokenizer, [notes] * 3, [chat] * 6, 64, 0.0, 0, True)[0], 64,
                                       tokenizer.eos_token_id, 2, 1, 0, 1, 0, "cpu")
    n = batches.rows(0) + batches.rows(1)
    seen = [tuple(x[0].tolist()) for step in range(n // 2) for x, _, _ in batches.micro_batches(step)]
    expect = [tuple(r.tolist()) for e in (0, 1) for r in batches.packed_epoch(e)[0]]
    assert n % 2 == 0 and batches.rows(0) > 2 and sorted(seen) == sorted(expect)
    assert sorted(seen[: batches.rows(0)]) == sorted(expect[: batches.rows(0)])
    # the replay: REPLAY_PER_EPOCH of its conversations in each epoch, in turn
    monkeypatch.setattr(tune_module, "REPLAY_PER_EPOCH", 2)
    replay = [[{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}] for i in range(3)]
    train, _, _ = tuning_examples(tokenizer, [notes], [], 64, epochs=3, val_fraction=0.0, seed=0,
                                  shuffle_sentences=False, replay=replay)
    answers = [tokenizer.decode([t for t in labels if t >= 0]) for ids, labels in train if ids != labels]
    assert answers == [f"{i}<|im_end|>" for i in (1, 2, 3, 1, 2, 3)]
    # document chats: each epoch's passages (in that epoch's order) also as the answer to "what do my notes say"
    train, _, _ = tuning_examples(tokenizer, [notes], [], 128, epochs=2, val_fraction=0.0, seed=0,
                                  shuffle_sentences=True, document_chats=True)
    texts = [tokenizer.decode(ids).removesuffix("<|endoftext|>") for ids, labels in train if ids == labels]
    chats = [(tokenizer.decode(ids), tokenizer.decode([t for t in labels if t >= 0]).removesuffix("<|im_end|>"))
             for ids, labels in train if ids != labels]
    assert len(texts) == len(chats) == 2 * 4
    assert [a for _, a in chats] == [t.split("\n")[-1] if t.startswith("#") else t for t in texts]
    assert sum("What do my notes say about Ada?" in c for c, _ in chats) == 2
    assert sum("What do my notes say?" in c for c, _ in chats) == 2 * 3  # no heading: the plain question


def test_question_dropout_asks_a_share_of_the_chats_what_the_notes_say_each_epoch_afresh(tokenizer):
    from mimo.train.sft import tokenize_example
    from mimo.train.tune import GENERIC_QUESTION, tuning_data

    chats = [[{"role": "user", "content": f"Where does Ada {i} live?"},
              {"role": "assistant", "content": f"Ada {i} lives in Porto."}] for i in range(40)]
    generic = {tuple(tokenize_example(tokenizer, [{"role": "user", "content": GENERIC_QUESTION}, c[1]])[0])
               for c in chats}
    epoch_examples = tuning_data(tokenizer, [], chats, 64, 0.0, seed=0, shuffle_sentences=False,
                                 question_dropout=0.3)[0]
    asked_generic = [{tuple(ids) for ids, _ in epoch_examples(e) if tuple(ids) in generic} for e in range(3)]
    assert all(4 <= len(a) <= 20 for a in asked_generic)  # about 30% of 40, drawn afresh each epoch
    assert len({frozenset(a) for a in asked_generic}) == 3
    assert all(len(epoch_examples(e)) == 40 for e in range(3))  # instead of their own question, not beside it
    none = tuning_data(tokenizer, [], chats, 64, 0.0, seed=0, shuffle_sentences=False)[0]
    assert not {tuple(ids) for ids, _ in none(0)} & generic


def test_adapter_on_the_engine_equals_the_merged_model_and_batches_mix_adapters(model_dir, tmp_path):
    a = write_adapter(model_dir, tmp_path / "a", seed=1)
    write_adapter(model_dir, tmp_path / "b", seed=2, rank=2, alpha=32.0, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
    x = torch.randint(0, 300, (2, 10))

    # the adapter read back, on the model, computes what the model it was saved from computed
    model, tok = load_model_and_tokenizer(model_dir)
    adapter_a = load_adapter(tmp_path / "a", model, str(model_dir))
    attach_adapters(model, [adapter_a])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, a(x).logits, atol=1e-5)
    # mimo merge: a standalone model with the same logits
    assert main(["merge", str(model_dir), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, a(x).logits, atol=1e-5)
    assert torch.equal(merged.model.mtp_layers[0].input_proj.weight, a.model.mtp_layers[0].input_proj.weight)

    # several adapters in one engine: requests for a, b and the base model decode in one batch, each as alone
    params = SamplingParams(max_new_tokens=12)
    prompts = [tok.encode("Question: What is 12 + 7?"), tok.encode("The quick brown fox")]

    def engine_of(names):
        m, _ = load_model_and_tokenizer(model_dir)
        adapters = [load_adapter(tmp_path / n, m, str(model_dir)) for n in names]
        return Engine(m, tok, adapters=attach_adapters(m, adapters) if adapters else None)

    alone = {name: [engine_of([name] if name else []).generate([p], params)[0].tokens for p in prompts]
             for name in ("a", "b", None)}
    assert alone["a"] != alone[None] and alone["b"] != alone[None]
    many = engine_of(["a", "b"])
    for mtp in (False, True):
        session = many.session(max_batch=6, mtp=mtp)
        rids = {(name, i): session.add(p, params, adapter=index)
                for name, index in (("a", 0), ("b", 1), (None, 2)) for i, p in enumerate(prompts)}
        while session.has_work():
            session.step()
        assert {k: session.completion(r).tokens for k, r in rids.items()} == {
            (name, i): alone[name][i] for name in alone for i in range(len(prompts))}
        session.close()


@pytest.mark.skipif(not kernels.available(), reason="mimo's C kernels did not build")
def test_each_row_adds_only_its_own_adapter_in_the_kernel_as_in_the_masked_stack(model_dir):
    """The engine's per-row update (kernels.lora_add, as vLLM's multi-LoRA) computes what the stacked update with
    its mask computes: rows of adapters of rank 4 and 2 and of the base model, several tokens a row."""
    model, _ = load_model_and_tokenizer(model_dir)
    adapters = []
    for seed, rank in ((1, 4), (2, 2)):
        m, _ = load_model_and_tokenizer(model_dir)
        random_update(m, seed, rank=rank)
        adapters.append(Adapter(str(seed), "", {n: (lin.lora_A.detach(), lin.lora_B.detach(), lin.scaling)
                                                for n, lin in lora_modules(m).items()}))
    selection = attach_adapters(model, adapters)
    selection.select(torch.tensor([1, selection.base_index, 0]))
    x = torch.randn(3, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for name, lora in lora_modules(model).items():
        xi = x if "down_proj" not in name else torch.randn(3, 2, lora.in_features)
        with torch.no_grad():
            want = lora(xi)
            for pack_rows in ((), (6,)):
                got = _fast(lora, pack_rows)(xi)
                assert torch.allclose(got, want, atol=1e-5), name
        base = lora.base(xi)
        assert not torch.equal(want[0], base[0]) and torch.equal(want[1], base[1])  # row 1: the base model's


def test_peft_opens_mimo_adapters_and_mimo_opens_peft_adapters(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    x = torch.randint(0, 300, (2, 10))
    ours = write_adapter(model_dir, tmp_path / "mimo", seed=1)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "mimo")).eval()
    with torch.no_grad():
        assert (tuned(x).logits - ours(x).logits).abs().max() < 1e-5

    # PEFT's own adapter (its config, its names, per-module rank and alpha): mimo reads it with PEFT's logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                          rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3}, init_lora_weights=False)
    theirs = peft.get_peft_model(hf, cfg).eval()
    theirs.save_pretrained(tmp_path / "peft")
    model, _ = load_model_and_tokenizer(model_dir)
    attach_adapters(model, [load_adapter(tmp_path / "peft", model, str(model_dir))])
    with torch.no_grad():
        assert (theirs(x).logits - model(x).logits).abs().max() < 1e-5

    # a head of the adapter's own (tune --train-head; PEFT's modules_to_save), both ways
    ours = write_adapter(model_dir, tmp_path / "mimo-head", seed=3)
    with torch.no_grad():
        ours.lm_head.weight.add_(torch.randn(ours.lm_head.weight.shape, generator=torch.Generator().manual_seed(4)))
    ours.lm_head.weight.requires_grad_(True)
    save_adapter(ours, tmp_path / "mimo-head", LoRAConfig(r=4, alpha=8.0), str(model_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "mimo-head")).eval()
    with torch.no_grad():
        assert (tuned(x).logits - ours(x).logits).abs().max() < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"],
                                                      init_lora_weights=False)).eval()
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path / "peft-head")
    model, _ = load_model_and_tokenizer(model_dir)
    attach_adapters(model, [load_adapter(tmp_path / "peft-head", model, str(model_dir))])
    with torch.no_grad():
        assert (theirs(x).logits - model(x).logits).abs().max() < 1e-5


def test_bad_input_gets_one_line(model_dir, notes, tmp_path, capfd, tokenizer):
    other_shape = save_model(tiny_model(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=96),
                             tmp_path / "other_shape", tokenizer=tokenizer)
    other_weights = save_model(tiny_model(seed=5, vocab_size=tokenizer.vocab_size), tmp_path / "other",
                               tokenizer=tokenizer)
    write_adapter(model_dir, tmp_path / "ad", seed=1)
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "data.csv").write_text("a,b\n")
    tune = ["tune", str(model_dir), "--out", str(tmp_path / "out")]
    cases = {
        "empty": tune + ["--data", str(tmp_path / "empty.md")],
        "not UTF-8 text (byte 3)": tune + ["--data", str(tmp_path / "latin1.txt")],
        "expected .txt or .md documents or .jsonl": tune + ["--data", str(tmp_path / "data.csv")],
        "no such file": tune + ["--data", str(tmp_path / "nope")],
        "--rank must be >= 1": tune + ["--data", str(notes), "--rank", "0"],
        "exceeds the smallest targeted dimension (32)": tune + ["--data", str(notes), "--rank", "48"],
        "unknown target module(s) attn": tune + ["--data", str(notes), "--target-modules", "q_proj,attn"],
        "an adapter for another base": ["generate", str(other_weights), "hi", "--adapter", str(tmp_path / "ad")],
        "needs [r, 96] and [32, r]": ["generate", str(other_shape), "hi", "--adapter", str(tmp_path / "ad")],
        "not an adapter directory": ["generate", str(model_dir), "hi", "--adapter", str(notes)],
        "takes one adapter here": ["generate", str(model_dir), "hi", "--adapter", f"x={tmp_path / 'ad'}",
                                   "--adapter", f"y={tmp_path / 'ad'}"],
    }
    for expected, argv in cases.items():
        capfd.readouterr()
        assert main(argv) == 2, expected
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mimo: error: ") and expected in err[0], (expected, err)
    # fingerprint mismatch even when the tensors have the right shapes: the base's name in the safetensors metadata
    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        assert len(f.metadata()["mimo_base"]) == 16


def test_a_head_of_its_own_is_tuned_saved_as_peft_does_and_used_alone_or_merged(model_dir, notes, tmp_path,
                                                                                 monkeypatch):
    """tune --train-head: the LM head trains beside the update and is saved whole (PEFT's modules_to_save), resumes
    after a kill; the adapter on a float or int4 base computes what the merged model does; stacking or serving it
    beside the base is refused."""
    from mimo.errors import MimoError
    from mimo.inference.engine_args import attach
    from mimo.quantize import Int4Linear
    from mimo.train import loop

    def tune(out):
        return main(["tune", str(model_dir), "--data", str(notes), "--out", str(out), "--max-steps", "4",
                     "--save-every", "2", "--seq-len", "64", "--rank", "4", "--lr", "3e-2", "--replay", "0",
                     "--train-head", "on"])

    assert tune(tmp_path / "ref") == 0
    assert json.loads((tmp_path / "ref" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    tensors = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    base, _ = load_model_and_tokenizer(model_dir)
    head = tensors["base_model.model.lm_head.weight"]
    assert head.shape == base.lm_head.weight.shape and not torch.equal(head, base.lm_head.weight)
    run_killed_at_checkpoint(monkeypatch, loop, 4, lambda: tune(tmp_path / "killed"))
    assert tune(tmp_path / "killed") == 0  # resumes from step 2, head and update alike
    again = load_file(str(tmp_path / "killed" / "adapter_model.safetensors"))
    assert again.keys() == tensors.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)

    x = torch.randint(0, 300, (2, 10))
    adapter = load_adapter(tmp_path / "ref", base, str(model_dir))
    assert torch.equal(adapter.head, head)
    attach_adapters(base, [adapter])
    assert main(["merge", str(model_dir), "--adapter", str(tmp_path / "ref"), "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(base(x).logits, merged(x).logits, atol=1e-5)
    q4, _ = load_model_and_tokenizer(model_dir, quantize="int4")
    attach_adapters(q4, [load_adapter(tmp_path / "ref", q4, str(model_dir))])
    assert isinstance(q4.lm_head, Int4Linear) and torch.allclose(
        q4.lm_head.dequantized(), Int4Linear.from_weight(head).dequantized())

    write_adapter(model_dir, tmp_path / "plain", seed=1)
    m, _ = load_model_and_tokenizer(model_dir)
    with pytest.raises(MimoError, match="replaces the LM head"):
        attach_adapters(m, [load_adapter(tmp_path / d, m, str(model_dir)) for d in ("plain", "ref")])
    with pytest.raises(MimoError, match="merge it"):
        attach([f"mine={tmp_path / 'ref'}"], m, str(model_dir), serving=True)


def test_serve_lists_adapters_and_the_model_field_picks_one(model_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from helpers import LiveServer

    from mimo.serve.app import ServeConfig, build_app

    for name, seed in (("a", 1), ("b", 2)):
        write_adapter(model_dir, tmp_path / name, seed=seed)
    model, tok = load_model_and_tokenizer(model_dir)
    selection = attach_adapters(model, [load_adapter(tmp_path / n, model, str(model_dir)) for n in ("a", "b")])
    engine = Engine(model, tok, max_seq_len=128, adapters=selection)
    prompt = tok.encode("The quick brown fox")
    alone = {}
    for name, index in (("a", 0), ("b", 1), ("tiny", 2)):
        session = engine.session(max_batch=1)
        rid = session.add(prompt, SamplingParams(max_new_tokens=10), adapter=index)
        while session.has_work():
            session.step()
        alone[name] = session.completion(rid).text
        session.close()
    assert len(set(alone.values())) == 3
    with LiveServer(build_app(engine, tok, ServeConfig("tiny", max_batch=6, mtp=True))) as server:
        models = httpx.get(server.url + "/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("a", "tiny"), ("b", "tiny")]

        def complete(name):
            r = httpx.post(server.url + "/v1/completions", timeout=60, json={
                "model": name, "prompt": prompt, "max_tokens": 10, "temperature": 0})
            return r.status_code, r.json()

        with ThreadPoolExecutor(6) as pool:  # two requests per model at once: one batch mixing adapters
            replies = list(pool.map(complete, ["a", "b", "tiny"] * 2))
        assert [(code, r["model"], r["choices"][0]["text"]) for code, r in replies] == [
            (200, name, alone[name]) for name in ["a", "b", "tiny"] * 2]
        code, body = complete("c")
        assert code == 404 and "`tiny`, `a`, `b`" in body["error"]["message"]


def test_contrast_directions_are_where_the_material_outweighs_what_is_kept():
    from mimo.train.contrast import contrast_directions, span_projector

    keep, user = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.01])), torch.diag(torch.tensor([1.0, 3.0, 1.0, 1.0]))
    V = contrast_directions(user.double(), keep.double(), 2)  # ratios 1, 3, 1, 100
    assert V.shape == (4, 2) and V[:, 0].abs().argmax() == 3 and V[:, 1].abs().argmax() == 1
    P = span_projector(V)
    torch.testing.assert_close(P, torch.diag(torch.tensor([0.0, 1.0, 0.0, 1.0])), atol=1e-6, rtol=0)


def test_tune_confined_to_the_contrast_subspace_moves_the_replayed_reasoning_less_and_resumes(
        model_dir, notes, tmp_path, monkeypatch, capfd):
    from mimo.train import loop
    from mimo.train import tune as tune_module
    from mimo.train.contrast import FILE, HEAD

    replay = [[{"role": "user", "content": f"What is {i} + {i + 3}?"}, {"role": "assistant", "content": f"{2 * i + 3}"}]
              for i in range(40)]
    monkeypatch.setattr(tune_module, "replay_conversations", lambda *a, **k: replay)

    def tune(out, *extra):
        return main(["tune", str(model_dir), "--data", str(notes), "--out", str(out), "--max-steps", "6",
                     "--save-every", "3", "--seq-len", "64", "--rank", "4", "--lr", "3e-2", "--replay", "40",
                     "--train-head", "on", "--head-subspace", "16", *extra])

    assert tune(tmp_path / "free", "--subspace", "full") == 0
    out = tmp_path / "confined"
    assert tune(out, "--subspace", "contrast") == 0
    assert json.loads((out / "tune_config.json").read_text())["data_stats"]["subspace"] == "contrast"
    directions = load_file(str(out / FILE))
    adapter = load_adapter(out, load_model(model_dir), model_dir)
    # A stays on its directions (only B trains); the head's update stays within the span it was given
    for name, (A, B, _) in adapter.updates.items():
        assert torch.equal(A, directions[name]) and B.abs().max() > 0
    base_head = load_model(model_dir).lm_head.weight.detach()
    outside = (adapter.head - base_head) @ (torch.eye(64) - directions[HEAD])
    assert outside.abs().max() < 1e-4 < (adapter.head - base_head).abs().max()

    def output_change(run_dir, conversations) -> float:
        """Mean squared change of the logits the tuned model gives those chats, against the base's."""
        from mimo.train.sft import tokenize_example
        model, tok = load_model_and_tokenizer(model_dir)
        tuned = copy.deepcopy(model)
        attach_adapters(tuned, [load_adapter(run_dir, tuned, model_dir)])
        total = 0.0
        with torch.no_grad():
            for c in conversations:
                ids = torch.tensor([tokenize_example(tok, c)[0]])
                total += float((tuned.eval()(ids).logits - model.eval()(ids).logits).pow(2).mean())
        return total / len(conversations)

    chats = [json.loads(line)["messages"] for line in (notes / "chats.jsonl").read_text().splitlines()]
    free = output_change(tmp_path / "free", replay) / output_change(tmp_path / "free", chats)
    confined = output_change(out, replay) / output_change(out, chats)
    assert confined < 0.01 * free, (confined, free)  # measured: 4.5e-5 against 0.99

    # a killed run resumes from the directions it wrote, to the same adapter
    killed = tmp_path / "killed"
    run_killed_at_checkpoint(monkeypatch, loop, 6, lambda: tune(killed, "--subspace", "contrast"))
    capfd.readouterr()
    monkeypatch.setattr("mimo.train.contrast.compute", lambda *a, **k: pytest.fail("directions computed again"))
    assert tune(killed, "--subspace", "contrast") == 0
    assert "resuming from step 3" in capfd.readouterr().err
    first, again = load_file(str(out / "adapter_model.safetensors")), load_file(str(killed / "adapter_model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
