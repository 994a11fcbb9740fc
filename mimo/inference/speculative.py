"""MTP speculative decoding, on top of the per-row sampling of mimo/inference/sampling.py.

The MTP layers draft num_draft tokens per row, the main model verifies all of them in
one forward pass, and the lossless rule (Leviathan et al. 2023, Chen et al. 2023) decides how many stay.

One step, per row, with L committed tokens x[0..L-1] (x[L-1] not yet in the main cache) and drafts d1..dk
already written at positions L..L+k-1 of session.hist:

  verify    the main model on [x[L-1], d1..dk] at positions L-1..L-1+k gives p for positions L..L+k.
  accept    d_i with probability min(1, p(d_i) / q(d_i)), in order (p, q: the filtered sampling distributions;
            greedy rows are one-hots, so a draft stays iff it is the argmax). With a accepted, one more token
            comes from normalize(max(0, p - q)) at the first rejection, or from p after all k (the bonus).
  catch up  MTP layer j's cache must hold entries computed from true inputs only. Entry t of layer j needs
            z_{j-1}[t] (the main hidden state before model.norm for j = 0) and x[t+j+1], so it is true for
            t <= L-j-2. With L' = L+a+1 committed, layer j recomputes positions L-j-1..L'-2 (a+j+1 of them,
            padded to k+j+1); its output at L'-2 drafts the token at L'+j. Its first input, z_{j-1} at L-j-1,
            is the newest true one from the step before (prev_z[j]); the rest is layer j-1's output this step.
  chain     drafts past the last MTP layer run that layer again on its own output one position further on;
            the next step's catch-up recomputes those entries.

Rolling back the main cache is free: entries past a row's length are masked and overwritten later.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mimo.inference.sampling import ACCEPT, DRAFT, SamplingFlags, token_logprobs


@dataclass
class SpecStats:
    """Speculative-decoding counters of one request (or, merged, of many)."""
    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    first_accepted: int = 0  # verify steps whose first draft was accepted

    @property
    def acceptance_rate(self) -> float | None:
        """accepted drafts / drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def first_acceptance_rate(self) -> float | None:
        return self.first_accepted / self.verify_steps if self.verify_steps else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens committed per verify step: the accepted drafts plus the verifier's own token."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else None

    @classmethod
    def merge(cls, stats) -> SpecStats:
        total = cls()
        for s in stats:
            if s is not None:
                for k, v in asdict(s).items():
                    setattr(total, k, getattr(total, k) + v)
        return total

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "first_acceptance_rate": self.first_acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length}


class MTPSpeculator:
    """The MTP side of an EngineSession: per-slot draft state, prefill of the MTP caches, draft-verify steps."""

    def __init__(self, session, num_draft: int):
        self.session, self.runner, self.sampler = session, session.runner, session.sampler
        cfg = session.engine.cfg
        n, dev = len(session.slots), session.engine.device
        self.num_draft = num_draft
        self.n_layers = min(num_draft, cfg.num_nextn_predict_layers)  # deeper drafts chain the last one used
        # prev_z[j] (j >= 1): z_{j-1} at position L-j-1, the newest true input of layer j
        self.prev_z = [None] + [torch.zeros(n, cfg.hidden_size, dtype=self.runner.dtype, device=dev)
                                for _ in range(1, self.n_layers)]
        self.q: torch.Tensor | None = None  # [n, num_draft, V] draft distributions, once a row samples
        self.offsets = torch.arange(num_draft + self.n_layers + 1, device=dev)
        self.rows = torch.arange(n, device=dev)

    # ---- drafting ------------------------------------------------------------------------------------

    def _draft(self, i: int, layer: int, z, rows, positions, flags: SamplingFlags):
        """Draft i (0-based) from MTP layer `layer`'s output z [b, H]; write it at positions [b] of hist."""
        logits = self.runner.mtp_logits(layer, z)  # [b, V'], V' <= V: the drafter's head may cover the first ids only
        if flags.greedy:
            d = logits.argmax(-1)
        else:
            q = self.sampler.probs(logits, rows, flags)
            d = self.sampler.sample_from(q, rows, positions, DRAFT)
            if self.q is None:  # [n, num_draft, V]: ids past V' are never drafted, q stays 0 there
                self.q = q.new_zeros(len(self.rows), self.num_draft, self.runner.cfg.vocab_size)
            self.q[rows, i, : q.shape[-1]] = q
        self.session.hist[rows, positions] = d

    def _chain(self, z, rows, slots, L, flags: SamplingFlags, kv_len: int):
        """Drafts n_layers..num_draft-1: the last MTP layer on its own output z [b, H], one position on each."""
        k = self.n_layers - 1
        for i in range(self.n_layers, self.num_draft):
            pos = (L - 2 + i - k)[:, None]  # [b, 1]; layer k at t reads x[t+k+1] = draft i-1
            tokens = self.session.hist[rows[:, None], pos + k + 1]
            z = self.runner.mtp(k, z[:, None], tokens, self.runner.context(pos, slots, kv_len))[:, 0]
            self._draft(i, k, z, rows, L + i, flags)

    def prefill(self, slots, ctx, hidden, lens, flags: SamplingFlags):
        """New rows (slots [b]): fill the MTP caches over the prompts and draft their first tokens.
        ctx / hidden [b, P, H]: the main model's prefill; hist holds the prompts and the first sampled token."""
        b = hidden.shape[0]
        ar = torch.arange(b, device=hidden.device)
        L = lens + 1
        z = hidden
        for j in range(self.n_layers):
            tokens = self.session.hist[slots[:, None], ctx.positions + j + 1]  # x[t+j+1]
            z = self.runner.mtp(j, z, tokens, ctx)  # [b, P, H]
            if j + 1 < self.n_layers:
                self.prev_z[j + 1][slots] = z[ar, (L - j - 2).clamp(min=0)]
            zd = z[ar, lens - 1]  # the drafting position L-2
            self._draft(j, j, zd, slots, L + j, flags)
        self._chain(zd, slots, ctx.slots, L, flags, ctx.kv_len + self.num_draft + 1)

    # ---- one draft-verify step -------------------------------------------------------------------------

    def _accept(self, logits, drafts, rows, L, flags: SamplingFlags):
        """logits [m, k+1, V] of the verify pass, drafts [m, k] -> (accepted count a [m], next token [m])."""
        k = self.num_draft
        if flags.greedy:
            target = logits.argmax(-1)  # [m, k+1]
            a = (drafts == target[:, :k]).long().cumprod(1).sum(1)
            return a, target.gather(1, a[:, None])[:, 0]
        m, T, V = logits.shape
        p = self.sampler.probs(logits.reshape(m * T, V), rows.repeat_interleave(T), flags).view(m, T, V)
        greedy_row = (self.sampler.temperature[rows] == 0)[:, None, None]
        q = torch.where(greedy_row, F.one_hot(drafts, V).to(p.dtype), self.q[:m])  # [m, k, V]
        p_d = p[:, :k].gather(2, drafts[..., None])[..., 0]  # [m, k]
        q_d = q.gather(2, drafts[..., None])[..., 0]
        u = self.sampler.uniforms(rows, L[:, None] + self.offsets[:k], ACCEPT)  # [m, k]
        a = (u * q_d < p_d).long().cumprod(1).sum(1)
        ar = self.rows[:m]
        p_a = p[ar, a]  # [m, V]
        q_a = q[ar, a.clamp(max=k - 1)] * (a < k)[:, None]  # no q after the last draft: the bonus is from p
        residual = (p_a - q_a).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
        return a, self.sampler.sample_from(residual, rows, L + a)

    def step(self, m: int, flags: SamplingFlags, max_len: int, min_len: int):
        """Advance rows 0..m-1 (free slots among them compute garbage). max_len / min_len: host bounds of their
        lengths. Returns (committed tokens [m][k+1], how many of them each row gained [m], log-probs [m][k+1])."""
        padded = self.runner.compiled_rows(m) if flags.greedy else 0
        if padded:  # static shapes for torch.compile: padded rows, the whole cache, the scratch-slot path
            committed, a, logprobs = _compiled_advance(self, padded, flags, self.runner.capacity, -1)
            committed, a, logprobs = committed[:m], a[:m], logprobs[:m]
        else:
            committed, a, logprobs = self._advance(m, flags, max_len, min_len)
        accepted = a.tolist()
        for slot, req in enumerate(self.session.slots[:m]):
            if req is not None:
                st = req.completion.spec
                st.verify_steps += 1
                st.drafted += self.num_draft
                st.accepted += accepted[slot]
                st.first_accepted += accepted[slot] > 0
        return committed.tolist(), [n + 1 for n in accepted], logprobs.tolist()

    def _advance(self, m: int, flags: SamplingFlags, max_len: int, min_len: int):
        """The tensor work of step(): verify, accept, catch up the MTP caches, draft. -> (committed [m, k+1],
        accepted drafts a [m], log-probs [m, k+1]). max_len / min_len: bounds of the rows' lengths (host ints;
        the capacity and -1 are always valid)."""
        k, run, s = self.num_draft, self.runner, self.session
        rows, L, hist = self.rows[:m], s.length[:m], s.hist[:m]
        vpos = (L - 1)[:, None] + self.offsets[: k + 1]  # [m, k+1]
        ctx = run.context(vpos, None, max_len + k)
        h = run.hidden(hist.gather(1, vpos), ctx)  # [m, k+1, H]
        logits = run.logits(h)  # [m, k+1, V]
        a, new = self._accept(logits, hist.gather(1, vpos[:, 1:]), rows, L, flags)
        hist.scatter_(1, (L + a)[:, None], new[:, None])
        committed = hist.gather(1, vpos + 1)  # x[L..L+k]: the accepted drafts, the new token, then stale drafts
        logprobs = token_logprobs(logits, committed)
        L_new = L + (a + 1) * s.active[:m]

        z = run.mtp(0, h, committed, ctx)  # layer 0 over L-1..L-1+k: h[t] and x[t+1]
        new_prev = []
        for j in range(self.n_layers):
            if j > 0:
                jpos = (L - j - 1)[:, None] + self.offsets[: k + j + 1]  # [m, k+j+1]
                kv_len = max_len + k
                if min_len - j - 1 < 0:  # a short row: positions before 0 go to the scratch slot at the end
                    jpos, kv_len = jpos.masked_fill(jpos < 0, run.capacity - 1), run.capacity
                tokens = hist.gather(1, (jpos + j + 1).clamp(max=run.capacity - 1))
                z = run.mtp(j, torch.cat([self.prev_z[j][:m, None], z], 1), tokens, run.context(jpos, None, kv_len))
            if j + 1 < self.n_layers:
                new_prev.append(z[rows, a])  # z_j at L'-j-2: layer j+1's first true input next step
            zd = z[rows, a + j]  # the drafting position L'-2
            self._draft(j, j, zd, rows, L_new + j, flags)
        for j, zp in enumerate(new_prev, start=1):
            self.prev_z[j][:m] = zp
        self._chain(zd, rows, None, L_new, flags, max_len + 2 * k + 1)
        L.copy_(L_new)
        return committed, a, logprobs


def _compiled_advance(spec: MTPSpeculator, *args):
    """MTPSpeculator._advance through torch.compile (compiled once per shape; every session reuses it)."""
    global _compiled_advance_fn
    if _compiled_advance_fn is None:
        from mimo.inference.model_runner import InferenceCompiled

        _compiled_advance_fn = InferenceCompiled(MTPSpeculator._advance, spec.runner.device)
    return _compiled_advance_fn(spec, *args)


_compiled_advance_fn = None
