"""What tests share: tiny models and configs built in the test, sample text, fixed seeds, no network. The
pytest fixtures built on them (tokenizer, model_dir) are in conftest.py."""

import torch

SAMPLE_TEXT = [
    "Question: What is 12 + 7?\nSolution:\n12 + 7 = 19\nAnswer: 19",
    "Question: Sort 5, 3, 9 ascending.\nSolution:\nsmallest 3, then 5, then 9\nAnswer: 3, 5, 9",
    "The quick brown fox jumps over the lazy dog. Numbers like 1234 and 5678 split into digits.",
    "Reasoning step by step: first compute the gcd of 12 and 18, which is 6; then the lcm is 36.",
    "Unicode survives too: café, naïve, 数学, emoji 🙂.",
] * 20


def tiny_config(vocab_size=400, num_mtp=1, tie=False, **kw):
    from mimo.config import MiMoConfig

    base = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_nextn_predict_layers": num_mtp,
                "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": tie, "torch_dtype": "float32"}
    base.update(kw)
    return MiMoConfig(**base)


def tiny_model(seed=0, **kw):
    from mimo.model import MiMoForCausalLM

    torch.manual_seed(seed)
    return MiMoForCausalLM(tiny_config(**kw)).init_weights(seed).eval()


SANDBOX_SKIP = "SANDBOX ISOLATION NOT TESTED"  # tests/test_sandbox.py's skip reason starts with it
