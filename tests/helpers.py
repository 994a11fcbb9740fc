"""What tests share: tiny models and configs built in the test, sample text, a greedy reference decoder, a live
server on a free port and a chat model overfitted on one reply; fixed seeds, no network. The pytest fixtures built
on them (tokenizer, model_dir) are in conftest.py."""

import socket
import threading
import time

import pytest
import torch

SAMPLE_TEXT = [
    "Question: What is 12 + 7?\nSolution:\n12 + 7 = 19\nAnswer: 19",
    "Question: Sort 5, 3, 9 ascending.\nSolution:\nsmallest 3, then 5, then 9\nAnswer: 3, 5, 9",
    "The quick brown fox jumps over the lazy dog. Numbers like 1234 and 5678 split into digits.",
    "Reasoning step by step: first compute the gcd of 12 and 18, which is 6; then the lcm is 36.",
    "Unicode survives too: café, naïve, 数学, emoji 🙂.",
] * 20


class Killed(BaseException):
    """Stands in for a kill: raised out of a training loop or a stage, caught by nothing in mimo."""


def run_killed_at_checkpoint(monkeypatch, module, step: int, run):
    """run() with module.save_checkpoint raising Killed when asked to save `step` (the kill lands after that step's
    metrics row, before its checkpoint); save_checkpoint is put back afterwards."""
    save = module.save_checkpoint

    def save_or_die(run_dir, at, *a, **kw):
        if at == step:
            raise Killed
        save(run_dir, at, *a, **kw)

    monkeypatch.setattr(module, "save_checkpoint", save_or_die)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(module, "save_checkpoint", save)


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


SANDBOX_SKIP = "SANDBOX ISOLATION NOT TESTED"  # tests/eval/test_sandbox.py's skip reason starts with it


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


# ---- a live server and a chat model for it (tests/serve, tests/inference/test_lora.py) ----

QUESTION = "What is 2 + 3?"
THOUGHT, ANSWER = "add 2 and 3", "The answer is 5."


class LiveServer:
    """A FastAPI app served by uvicorn on a free localhost port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve(model, tokenizer, **kw):
    """A LiveServer of mimo's app on model (name "tiny", context 256 unless kw says otherwise)."""
    from mimo.inference.engine import Engine
    from mimo.serve.app import ServeConfig, build_app

    context = kw.pop("context", 256)
    cfg = ServeConfig(model_name=kw.pop("name", "tiny"), **kw)
    return LiveServer(build_app(Engine(model, tokenizer, max_seq_len=context), tokenizer, cfg))


def overfit_chat_model(tokenizer, steps=150):
    """A tiny model that answers QUESTION with '<think>\\nTHOUGHT\\n</think>\\n\\nANSWER' (greedy)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    ids = torch.tensor([tokenizer.encode(prompt + f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}<|im_end|>")])
    model = tiny_model(vocab_size=tokenizer.vocab_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        out = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()
