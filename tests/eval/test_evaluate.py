import json
import threading
import typing
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from helpers import tiny_model

from mimo.benchmarks import load_benchmark
from mimo.cli import main
from mimo.errors import MimoError
from mimo.eval.backends import EndpointBackend, Request


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_score_math500_references(tmp_path, capsys):
    rows = load_benchmark("math500")[:25]
    write_jsonl(tmp_path / "c.jsonl", [{"id": r["id"], "completion": r["solution"]} for r in rows]
                + [{"id": rows[0]["id"], "completion": "so the answer is \\boxed{-12345}"}])
    assert main(["eval", "score", "--task", "math500", "--completions", str(tmp_path / "c.jsonl"),
                 "--out", str(tmp_path / "out")]) == 0
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 26 and sum(s["correct"] for s in samples) == 25
    assert samples[-1]["sample"] == 1 and samples[-1]["extracted_answer"] == "-12345"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == 25 and "subject" in summary["breakdown"]
    assert (tmp_path / "out" / "report.md").exists()


def test_score_humaneval_canonical_and_broken(tmp_path):
    rows = load_benchmark("humaneval")[:5]
    write_jsonl(tmp_path / "c.jsonl", [{"id": r["id"], "completion": r["canonical_solution"]} for r in rows]
                + [{"id": rows[1]["id"], "completion": "```python\ndef " + rows[1]["entry_point"]
                    + "(*a):\n    return None\n```"}])
    assert main(["eval", "score", "--task", "humaneval", "--completions", str(tmp_path / "c.jsonl"),
                 "--out", str(tmp_path / "out")]) == 0
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [s["correct"] for s in samples] == [True] * 5 + [False]


def test_score_generic_math_and_bad_lines(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "problem": "1/2?", "answer": "0.5", "completion": "\\boxed{\\frac12}"}])
    assert main(["eval", "score", "--task", "math", "--completions", str(tmp_path / "c.jsonl"),
                 "--out", str(tmp_path / "o")]) == 0
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    assert main(["eval", "score", "--task", "math500", "--completions", str(tmp_path / "bad.jsonl"),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_engine_eval_writes_samples_and_resumes(tmp_path, model_dir):
    out = tmp_path / "ev"
    args = ["eval", str(model_dir), "--task", "reasoning", "--limit", "3", "--samples", "2", "--out", str(out),
            "--max-new-tokens", "8", "--prompt-format", "raw"]
    assert main(args) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 6
    first = json.loads(lines[0])
    for key in ("id", "prompt", "completion", "extracted_answer", "correct", "tokens", "latency_s"):
        assert key in first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["model_sha256"] and summary["settings"]["temperature"] == 0.6
    assert "task" in summary["breakdown"] and "maj@2" in summary["metrics"]
    # interrupted: keep 2 finished samples and a half-written line; the rerun redoes only the rest
    (out / "samples.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])
    assert main(args) == 0
    redone = (out / "samples.jsonl").read_text().splitlines()
    assert len(redone) == 6 and redone[:2] == lines[:2]
    # other settings in the same directory are refused
    assert main(args[:-1] + ["chat", "--temperature", "0.1"]) == 2


class FlakyOpenAI(BaseHTTPRequestHandler):
    calls: typing.ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FlakyOpenAI.calls.append((self.path, body, self.headers.get("Authorization")))
        if len(FlakyOpenAI.calls) == 1:
            self.send_response(503)
            self.end_headers()
            return
        if body["messages"][0]["content"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "nope"}}')
            return
        reply = {"choices": [{"message": {"content": "\\boxed{4}", "reasoning_content": "2+2"},
                              "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_server():
    FlakyOpenAI.calls = []
    server = HTTPServer(("127.0.0.1", 0), FlakyOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_endpoint_retries_and_auth(fake_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    backend = EndpointBackend(fake_server, "m", retries=2, concurrency=1)
    backend.retry_base_s = 0.01
    res = backend.complete([Request("2+2?", 8, 0.6, 0.95, 0, [])])[0]
    assert res.text == "\\boxed{4}" and res.reasoning == "2+2" and res.completion_tokens == 3
    path, body, auth = FlakyOpenAI.calls[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["top_p"] == 0.95
    assert len(FlakyOpenAI.calls) == 2  # one 503, retried
    with pytest.raises(MimoError, match="HTTP 400"):
        backend.complete([Request("bad", 8, 0.6, 0.95, 0, [])])


@pytest.mark.slow
def test_endpoint_eval_end_to_end(fake_server, tmp_path):
    assert main(["eval", "--endpoint", fake_server, "--model", "m", "--task", "aime2024", "--limit", "2",
                 "--samples", "3", "--out", str(tmp_path / "o"), "--retries", "1"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["samples"] == 6 and summary["settings"]["backend"] == "endpoint"
    assert "pass@2" in summary["metrics"]


class SmallContextOpenAI(BaseHTTPRequestHandler):
    """Lists max_model_len 1000 and refuses prompt + max_tokens past it, as vLLM does (a prompt token per
    character here); without max_tokens it fills the context: finish reason "length"."""
    bodies: typing.ClassVar[list] = []

    def reply(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply(200, {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 1000}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        SmallContextOpenAI.bodies.append(body)
        prompt = len(body["messages"][0]["content"])
        if prompt + body.get("max_tokens", 0) > 1000:
            self.reply(400, {"error": {"message": f"This model's maximum context length is 1000 tokens and your "
                                       f"request has {prompt} input tokens", "code": 400}})
            return
        tokens = body.get("max_tokens", 1000 - prompt)
        self.reply(200, {"choices": [{"message": {"content": "so far"}, "finish_reason": "length"}],
                         "usage": {"completion_tokens": tokens}})

    def log_message(self, *args):
        pass


def test_endpoint_length_limit_is_the_protocol_capped_by_the_served_context(tmp_path, capsys):
    SmallContextOpenAI.bodies = []
    server = HTTPServer(("127.0.0.1", 0), SmallContextOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        # the default, MiMo's 32,768, does not fit a 1,000-token context: requests ask for the rest of it
        assert main(["eval", "--endpoint", url, "--model", "m", "--task", "aime2024", "--limit", "2", "--samples",
                     "1", "--out", str(tmp_path / "a")]) == 0
        assert "max new tokens 32,768 (MiMo's protocol for math and code), capped by the model's context of 1,000" \
            in capsys.readouterr().out
        assert SmallContextOpenAI.bodies and all("max_tokens" not in b for b in SmallContextOpenAI.bodies)
        summary = json.loads((tmp_path / "a" / "summary.json").read_text())
        assert summary["settings"]["max_new_tokens"] == 32768 and summary["settings"]["context"] == 1000
        assert summary["settings"]["effective_max_new_tokens"] == 1000
        assert summary["truncated"] == 2 and summary["finish_reasons"] == {"length": 2}
        assert "2 of 2 samples (100.0%) stopped at the limit of 1,000 new tokens" in \
            (tmp_path / "a" / "report.md").read_text()
        # a limit under the context is asked for; refused as too long with the prompt, it becomes the rest
        SmallContextOpenAI.bodies = []
        assert main(["eval", "--endpoint", url, "--model", "m", "--task", "aime2024", "--limit", "1", "--samples",
                     "1", "--max-new-tokens", "990", "--out", str(tmp_path / "b")]) == 0
        assert [b.get("max_tokens") for b in SmallContextOpenAI.bodies] == [990, None]
    finally:
        server.shutdown()


def test_engine_eval_default_length_is_the_models_context(tmp_path, tokenizer, capsys):
    from mimo.checkpoint import save_model

    model_dir = save_model(tiny_model(vocab_size=tokenizer.vocab_size, max_position_embeddings=160),
                           tmp_path / "m", tokenizer=tokenizer)
    out = tmp_path / "e"
    assert main(["eval", str(model_dir), "--task", "reasoning", "--limit", "2", "--out", str(out),
                 "--prompt-format", "raw"]) == 0
    assert "capped by the model's context of 160 tokens" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["context"] == 160 and summary["settings"]["effective_max_new_tokens"] == 160
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    cut = [s for s in samples if s["finish_reason"] == "length"]
    assert summary["truncated"] == len(cut) and sum(summary["finish_reasons"].values()) == len(samples) == 2
    assert all(len(tokenizer.encode(s["prompt"])) + s["tokens"] <= 160 for s in samples)


def test_contamination_report_finds_a_planted_problem(tmp_path, capsys):
    from mimo.data.corpus import build_corpus

    leaked = load_benchmark("gsm8k")[5]["problem"]
    (tmp_path / "web.jsonl").write_text(json.dumps({"text": "Notes.\n" + leaked + "\nThat is all."}) + "\n")
    config = {"seed": 0, "tokens": 20_000, "tokenizer": {"vocab_size": 400},
              "sources": {"reasoning": {"type": "reasoning", "problems": 300},
                          "web": {"type": "text", "paths": [str(tmp_path / "web.jsonl")]}},
              "quality": {"benchmarks": [], "density_threshold": 0.0},  # let the leak through, to find it later
              "stages": [{"name": "broad", "fraction": 1.0, "mix": {"reasoning": 1.0, "web": 1.0}}]}
    build_corpus(config, tmp_path / "data", show_progress=False)
    assert main(["eval", "contamination", "--data", str(tmp_path / "data"), "--task", "gsm8k",
                 "--out", str(tmp_path / "c.json")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["contaminated"] == 1 and summary["contaminated_ids"] == ["gsm8k/5"]
    assert main(["eval", "contamination", "--data", str(tmp_path / "data"), "--task", "reasoning"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["contaminated"] == 0


def test_question_prompt_format_has_no_format_cue(tmp_path, model_dir):
    out = tmp_path / "q"
    assert main(["eval", str(model_dir), "--task", "reasoning", "--limit", "2", "--samples", "1", "--out", str(out),
                 "--max-new-tokens", "4", "--prompt-format", "question"]) == 0
    prompts = [json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert all(p.startswith("Question: ") and p.endswith("\n") and "Solution:" not in p for p in prompts)
    assert json.loads((out / "summary.json").read_text())["settings"]["prompt_format"] == "question"
    # tasks without such a prompt say so
    assert main(["eval", str(model_dir), "--task", "gsm8k", "--limit", "1", "--out", str(tmp_path / "g"),
                 "--prompt-format", "question"]) == 2
