"""F.linear against MKL's packed GEMM (what Engine(pack_weights=True) runs for a full batch) on the tiny model's
shapes and a 7B model's, at the row counts of a 16-row batch, its MTP verify pass and more; with a model
directory, also the engine's 16-row session step with plain and with packed weights.

    .venv/bin/python bench/packed_linear.py [MODEL_DIR]

Products: the best of five means over 100 calls, both kernels side by side in one process. Steps: a session of
16 rows (60-token random prompts) per engine, timed alternately, 20 steps at a time, eight times; medians.
"""

import functools
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(384, 384), (384, 128), (384, 1024), (1024, 384), (384, 2048),  # tiny: attention, MLP, LM head
          (4096, 4096), (4096, 11008), (11008, 4096)]  # a 7B model's attention and MLP


def best_us(fn, calls: int = 100) -> float:
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


def session_steps(model_dir: str, mtp: bool):
    from mimo.checkpoint import load_model
    from mimo.inference.engine import Engine
    from mimo.inference.sampling import SamplingParams

    model = load_model(model_dir)
    prompts = [torch.randint(1, model.config.vocab_size, (60,)).tolist() for _ in range(16)]
    times = {}
    sessions = {}
    for packed in (False, True):
        session = Engine(model, None, pack_weights=packed).session(16, 400, mtp=mtp)
        for p in prompts:
            session.add(p, SamplingParams(max_new_tokens=300, ignore_eos=True))
        for _ in range(10):
            session.step()
        sessions[packed], times[packed] = session, []
    for _ in range(8):
        for packed, session in sessions.items():
            t = time.perf_counter()
            for _ in range(20):
                session.step()
            times[packed].append((time.perf_counter() - t) / 20 * 1e3)
    plain, fast = (statistics.median(times[k]) for k in (False, True))
    print(f"16-row step, MTP {'on' if mtp else 'off'}: plain {plain:.2f} ms, packed {fast:.2f} ms "
          f"({plain / fast:.2f}x)", flush=True)


def main():
    if not torch.backends.mkl.is_available():
        raise SystemExit("this torch build has no MKL (packed GEMM is x86-only)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| rows | in -> out | F.linear us | packed us | speed-up |\n|---|---|---|---|---|")
    torch.manual_seed(0)
    for rows in (16, 32, 48):
        for n_in, n_out in SHAPES:
            x, w, b = torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            assert torch.allclose(torch.ops.mkl._mkl_linear(x, packed, w, b, rows), F.linear(x, w, b), atol=1e-3)
            plain = best_us(functools.partial(F.linear, x, w, b))
            fast = best_us(functools.partial(torch.ops.mkl._mkl_linear, x, packed, w, b, rows))
            print(f"| {rows} | {n_in} -> {n_out} | {plain:.0f} | {fast:.0f} | {plain / fast:.2f}x |", flush=True)
    if len(sys.argv) > 1:
        for mtp in (False, True):
            session_steps(sys.argv[1], mtp)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
