"""mimo's GGUF export against llama.cpp itself: the same logits and the same greedy continuation.

    bench/.venv/bin/python bench/gguf_llama_cpp_check.py [--model MODEL_DIR] [--types f32 f16 bf16 q8_0 q4_0]

Runs in the bench env (bash bench/setup_bench_env.sh: llama-cpp-python built from source; `pip install gguf` there
if mimo was installed into it before gguf was a dependency). Without --model it builds a small random MiMo (2
layers, hidden 128, one MTP layer, rope_theta 640000, embedding padded past the tokenizer) with weights large
enough that greedy choices are not near-ties. For each type it exports MODEL.gguf with `mimo export gguf`, loads it
in llama.cpp (llama_cpp.Llama, 2 threads, all logits, an f32 KV cache) and in mimo (load_gguf, computing in
float32 as llama.cpp's CPU backend does), feeds the same token ids to both
(no tokenizer in between), and prints per type: the largest logit difference on the prompt (llama.cpp against
mimo's model from the same file, and against mimo's float model), whether the greedy continuations are equal,
and whether llama.cpp's tokenizer gives mimo's ids for a few texts. Exit status 1 if the f32 continuation differs.
Where a continuation parts it prints mimo's logits for both tokens there (a random model has near ties).

Measured (llama-cpp-python 0.3.36, 2 threads) on a nano model pretrained 300 steps
(`mimo pretrain --preset nano --max-steps 300 --precision fp32`; --model RUN/final), 31 prompt ids, 24 greedy tokens:

    type   |llama.cpp - mimo(gguf)|  |llama.cpp - mimo(float)|  logit scale  greedy equal (gguf / float)  tokenizer
    f32    8.11e-06                  8.11e-06                   16.77        yes / yes                     same ids
    f16    5.73e-03                  4.21e-03                   16.77        yes / yes                     same ids
    bf16   3.27e-02                  3.93e-02                   16.77        yes / yes                     same ids
    q8_0   1.20e-01                  1.64e-01                   16.77        yes / yes                     same ids
    q4_0   1.30e-01                  1.44e+00                   16.77        yes / yes                     same ids

q8_0 and q4_0 files are byte for byte what llama-quantize makes of the f32 file (27/27 tensors; for this model's
hidden size llama-quantize's Q6_K output falls back to Q8_0, mimo's choice for q4_0's output in every size).
(llama.cpp rounds activations to bf16 for bf16 weights and to Q8_0 blocks for Q8_0/Q4_0 weights; mimo's kernels
do the latter for up to 8 rows and multiply prompts in fp32, hence the prompt-logit differences.) The default
random model: f32 1.7e-05 and equal; bf16 and q8_0 part at near ties (logits 0.014 and 0.10 apart).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

F32 = 0  # GGML_TYPE_F32
_QUIET = None
TEXTS = ["Question: What is 12 + 7?\nSolution:\n12 + 7 = 19\nAnswer: 19",
         "The quick brown fox jumps over the lazy dog. Numbers like 1234 split into digits.",
         "<|im_start|>user\nSort 5, 3, 9.<|im_end|>\n<|im_start|>assistant\n<think>",
         "Unicode survives too: café, naïve, 数学 🙂   spaces\n\n\ttabs"]


def build_model(out: Path) -> Path:
    from mimo.checkpoint import save_model
    from mimo.config import MiMoConfig
    from mimo.model import MiMoForCausalLM
    from mimo.tokenizer import Tokenizer

    tok = Tokenizer.train([], vocab_size=600, min_frequency=1, show_progress=False, texts=TEXTS * 50)
    cfg = MiMoConfig(vocab_size=tok.vocab_size + 40, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, num_nextn_predict_layers=1,
                     max_position_embeddings=512, rope_theta=640000.0, torch_dtype="float32")
    torch.manual_seed(0)
    model = MiMoForCausalLM(cfg)
    model.config.initializer_range = 0.15  # peaky logits: greedy choices with clear margins
    model.init_weights(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)  # norms and biases away from 1 and 0
    return save_model(model.eval(), out, tokenizer=tok)


def mimo_greedy(model, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0].float().numpy()
        seq = list(ids)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):], prompt_logits


def llama_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[: len(ids)])
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out, prompt_logits


def llama_quantize_agrees(f32_file: Path, mine: Path, kind: str) -> str:
    """llama-quantize (llama.cpp's own, through its C API) of the f32 export against mimo's export of kind."""
    import ctypes

    import llama_cpp

    from mimo.gguf import GGUFFile

    global _QUIET  # llama-quantize logs every tensor: llama.cpp's log off from here on (kept referenced)
    _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = 2
    theirs = mine.with_name(f"llama-quantize-{kind}.gguf")
    if llama_cpp.llama_model_quantize(str(f32_file).encode(), str(theirs).encode(), ctypes.byref(params)):
        return "llama-quantize failed"
    a, b = GGUFFile(theirs).tensors, GGUFFile(mine).tensors
    types = {n: f"{a[n].type.name} (mimo {b[n].type.name})" for n in a if a[n].type != b[n].type}
    same = sum(a[n].type == b[n].type and np.array_equal(a[n].data, b[n].data) for n in a)
    return f"llama-quantize: {same}/{len(a)} tensors byte-identical" + (f"; other types: {types}" if types else "")


def main() -> int:
    import llama_cpp

    from mimo.checkpoint import load_model_and_tokenizer
    from mimo.gguf import export_gguf, load_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model directory (default: a small random MiMo)")
    p.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q4_0"])
    p.add_argument("--new-tokens", type=int, default=24)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gguf-check-"))
    model_dir = Path(args.model) if args.model else build_model(work / "model")
    ref, tokenizer = load_model_and_tokenizer(model_dir, "float32")
    ids = tokenizer.encode(TEXTS[0])[:32]
    want, ref_logits = mimo_greedy(ref, ids, args.new_tokens)
    print(f"llama-cpp-python {llama_cpp.__version__}; model {model_dir} ({ref.config.num_hidden_layers} layers, "
          f"hidden {ref.config.hidden_size}, vocab {ref.config.vocab_size}); prompt {len(ids)} ids, "
          f"{args.new_tokens} greedy tokens")
    print(f"mimo float greedy: {want}")
    print(f"{'type':5} {'size':>9}  {'|llama.cpp - mimo(gguf)|':>24} {'|llama.cpp - mimo(float)|':>25} "
          f"{'logit scale':>11}  greedy vs mimo(gguf) / mimo(float)  tokenizer")
    status = 0
    for kind in args.types:
        path = export_gguf(model_dir, work / f"model-{kind}.gguf", kind)[0]
        mine, _ = load_gguf(path, dtype="float32")  # float32 products, as llama.cpp's CPU backend
        mine_tokens, mine_logits = mimo_greedy(mine, ids, args.new_tokens)
        llm = llama_cpp.Llama(model_path=str(path), n_threads=2, n_ctx=256, logits_all=True, verbose=False,
                              type_k=F32, type_v=F32)  # an f32 KV cache (llama.cpp's default is f16)
        got, got_logits = llama_greedy(llm, ids, args.new_tokens)
        tok_ok = all(llm.tokenize(t.encode(), add_bos=False, special=True) == tokenizer.encode(t) for t in TEXTS)
        detok_ok = all(llm.detokenize(tokenizer.encode(t), special=True).decode() == t for t in TEXTS)
        d_gguf = float(np.abs(got_logits - mine_logits).max())
        d_float = float(np.abs(got_logits - ref_logits).max())
        same_gguf, same_float = got == mine_tokens, got == want
        print(f"{kind:5} {path.stat().st_size / 2**20:7.2f}Mi  {d_gguf:24.2e} {d_float:25.2e} "
              f"{float(np.abs(ref_logits).max()):11.2f}  {same_gguf!s:>20} / {same_float!s:<11}  "
              f"encode {tok_ok}, decode {detok_ok}")
        if not same_gguf:  # where they part, and by how much mimo preferred its token there
            k = next(i for i, (a, b) in enumerate(zip(got, mine_tokens)) if a != b)
            with torch.no_grad():
                last = mine(torch.tensor([ids + mine_tokens[:k]])).logits[0, -1]
            print(f"      parted at token {k}: mimo {mine_tokens[k]} (logit {float(last[mine_tokens[k]]):.4f}), "
                  f"llama.cpp {got[k]} (mimo's logit {float(last[got[k]]):.4f}): a near tie")
        if kind == "f32" and not (same_float and same_gguf):
            status = 1
        if kind in ("q8_0", "q4_0") and (work / "model-f32.gguf").exists():
            print(f"      {llama_quantize_agrees(work / 'model-f32.gguf', path, kind)}")
        template = llm.metadata.get("tokenizer.chat_template")
        del llm
    print(f"chat template read by llama.cpp equals mimo's: {template == tokenizer.chat_template}")
    return status


if __name__ == "__main__":
    sys.exit(main())
