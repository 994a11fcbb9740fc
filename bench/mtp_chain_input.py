"""What a chained MTP draft reads: mimo's convention against vLLM's, by acceptance.

    python bench/mtp_chain_input.py MODEL_DIR DATA_DIR [--prompts 24] [--prompt-tokens 32] [--new-tokens 64]

Drafts past the last MTP layer run that layer again on its own output. mimo feeds back the block output z
*before* final_layernorm (as layer 0 reads the main model's state before model.norm); vLLM's MiMo drafter with
num_speculative_tokens > 1 feeds back final_layernorm(z). Greedy decoding of validation-split prompts (DATA_DIR
from `mimo data build`) with 2 and 3 drafts a step, each way; prints acceptance and tokens per verify step.
"""

from __future__ import annotations

import argparse

import torch

from mimo.checkpoint import load_model
from mimo.data.loader import PackedTokens
from mimo.inference.engine import Engine
from mimo.inference.sampling import SamplingParams
from mimo.inference.speculative import MTPSpeculator, SpecStats


def chain_after_final_norm(self, z, rows, slots, L, flags, kv_len):
    """MTPSpeculator._chain with vLLM's input: final_layernorm(z) instead of z [b, H]."""
    k, run = self.n_layers - 1, self.runner
    for i in range(self.n_layers, self.num_draft):
        pos = (L - 2 + i - k)[:, None]
        tokens = self.session.hist[rows[:, None], pos + k + 1]
        normed = run._norm(z, run.mtp_layers[k].final_layernorm)
        z = run.mtp(k, normed[:, None], tokens, run.context(pos, slots, kv_len))[:, 0]
        self._draft(i, k, z, rows, L + i, flags)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_model(args.model)
    val = PackedTokens(args.data, "val")
    stride = max(args.prompt_tokens, (len(val) - args.prompt_tokens) // args.prompts)
    prompts = [val.slice(i * stride, args.prompt_tokens).astype(int).tolist() for i in range(args.prompts)]
    print("| chained input | drafts | acceptance | tokens / verify step |\n|---|---|---|---|")
    for name, chain in (("z (mimo)", MTPSpeculator._chain), ("final_layernorm(z) (vLLM)", chain_after_final_norm)):
        MTPSpeculator._chain = chain
        for k in (2, 3):
            outs = Engine(model, None).generate(prompts, SamplingParams(max_new_tokens=args.new_tokens), mtp=True,
                                                num_draft=k)
            s = SpecStats.merge(o.spec for o in outs)
            print(f"| {name} | {k} | {s.acceptance_rate:.3f} | {s.mean_accepted_length:.3f} |", flush=True)


if __name__ == "__main__":
    main()
