"""How `mimo generate`, `mimo chat` and `mimo serve` load and run a model: the engine's flags, declared once
(as vLLM's EngineArgs: add_engine_arguments here, load_engine reads them back), and the sampling flags of
generate and chat (add_decoding_arguments; sampling_params reads them back).

Loading says what it did on stderr: the time, the weights' memory and the process's peak, and the KV-cache
context chosen from the memory left (mimo/memory.py), so a 7B model on a laptop never reserves its full
32,768-position context per slot unless that fits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mimo.config import QUANTIZATIONS
from mimo.errors import MimoError
from mimo.inference.sampling import SamplingParams

# --draft-vocab's default: a fifth of MiMo-7B's 151,680-token head (FR-Spec cut Llama-3's 128K-token head to a
# quarter); models with smaller vocabularies draft over all of theirs
DRAFT_VOCAB = 32768


def add_engine_arguments(s):
    """How the model runs: what load_engine reads, plus MTP speculation (generate, chat, serve)."""
    s.add_argument("--mtp", action=argparse.BooleanOptionalAction, default=True,
                   help="speculative decoding with the MTP layers (lossless: greedy output is identical either way)")
    s.add_argument("--num-draft", type=int, default=1, help="tokens the MTP layers draft per step")
    s.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="weight-only int8 or int4, applied to each tensor as it is read (less memory, faster "
                        "decoding; int4 loses more accuracy)")
    s.add_argument("--draft-quantize", choices=QUANTIZATIONS, default=None,
                   help="MTP drafts from quantized copies of the MTP layers and LM head (faster, still lossless)")
    s.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB, metavar="N",
                   help="MTP drafts pick among the vocabulary's first N ids (a byte-pair vocabulary's frequent "
                        "pieces; 0: all of them): a draft reads that much of the LM head (still lossless)")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations (auto: as stored; float16 becomes float32 on a CPU)")
    s.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="a LoRA adapter in PEFT's format (mimo tune writes them) on top of the model; serve takes "
                        "several (NAME=DIR, repeated), each request's `model` picking one")
    s.add_argument("--max-model-len", type=int, default=None,
                   help="context per sequence (default: the model's, or the largest power of two whose KV cache "
                        "fits in half the memory left after the weights)")


def add_decoding_arguments(s, temperature: float, top_p: float, max_new_tokens: int):
    """Sampling flags with the command's own defaults, then the engine's (generate, chat)."""
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    s.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=top_p)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    add_engine_arguments(s)


def sampling_params(args) -> SamplingParams:
    """The SamplingParams of add_decoding_arguments' flags."""
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def load_engine(args, n_slots: int = 1, quiet: bool = False, many_adapters: bool = False):
    """(engine, tokenizer) from add_engine_arguments' flags, with a KV cache for n_slots sequences.
    quiet: no progress bar or loading lines on stderr. many_adapters: --adapter may be given several times and
    requests name theirs (serve); else one adapter at most, which every request uses."""
    from mimo.checkpoint import load_model_and_tokenizer
    from mimo.inference.engine import Engine
    from mimo.memory import available_bytes, choose_context, human, module_bytes, peak_resident_bytes

    if args.max_model_len is not None and args.max_model_len < 2:
        raise MimoError("--max-model-len must be at least 2")
    if len(args.adapter) > 1 and not many_adapters:
        raise MimoError("--adapter takes one adapter here (mimo serve takes several)")
    if args.adapter and args.compile:
        raise MimoError("--compile does not work with --adapter yet; leave one out")
    free_before = available_bytes()
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype, quantize=args.quantize,
                                                progress=not quiet and sys.stderr.isatty())
    adapters = attach(args.adapter, model, args.model, serving=many_adapters)
    weights = module_bytes(model)
    dtype = model.model.embed_tokens.weight.dtype
    free_after = None if free_before is None else max(0, free_before - weights)
    context, why = choose_context(model.config, dtype, n_slots, free_after, args.max_model_len)
    if not quiet:
        from mimo.quantize import QUANTIZED_LINEAR

        quantized = {name for name, cls in QUANTIZED_LINEAR.items() if any(isinstance(m, cls) for m in model.modules())}
        kind = "+".join(sorted(quantized)) + f" ({str(dtype).removeprefix('torch.')} activations)" if quantized \
            else str(dtype).removeprefix("torch.")
        print(f"mimo: loaded {Path(args.model).name} ({kind}) in {time.perf_counter() - t0:.1f} s: weights "
              f"{human(weights)}, peak memory {human(peak_resident_bytes())}; {why}"
              + (f"; adapter(s) {', '.join(adapters.names)}" if adapters else ""), file=sys.stderr, flush=True)
    engine = Engine(model, tokenizer, max_seq_len=context, compile=args.compile,
                    draft_quantize=args.draft_quantize, pack_weights=True,  # the weights never change here
                    adapters=adapters, draft_vocab=args.draft_vocab)
    return engine, tokenizer


def parse_adapter(spec: str) -> tuple[str | None, Path]:
    """'NAME=DIR' or 'DIR' -> (NAME or None, DIR)."""
    name, sep, path = spec.partition("=")
    if not sep or Path(spec).exists():
        return None, Path(spec)
    if not name or not path:
        raise MimoError(f"--adapter {spec!r}: expected NAME=DIR or DIR")
    return name, Path(path)


def attach(specs: list[str], model, model_dir: str, serving: bool = False):
    """Load the --adapter directories and stack them on the model: their AdapterSelection (None without).
    serving: the base model answers requests too (lora.attach_adapters' base_answers)."""
    from mimo.inference.adapters import load_adapter
    from mimo.inference.lora import attach_adapters

    if not specs:
        return None
    adapters = []
    for spec in specs:
        name, path = parse_adapter(spec)
        adapters.append(load_adapter(path, model, model_dir, name))
    names = [a.name for a in adapters]
    if len(set(names)) < len(names):
        raise MimoError(f"two adapters named {next(n for n in names if names.count(n) > 1)!r}: name them NAME=DIR")
    return attach_adapters(model, adapters, base_answers=serving)
