"""Inference engine: continuous batching over a static KV cache, per-row sampling, stop conditions, streaming,
and MTP speculative decoding (mimo/inference/speculative.py).

Every caller (generate, chat, evaluation, RL rollouts, the server) goes through `Engine.generate` or, to let
requests join and leave a running batch, an `EngineSession`:

    session = engine.session(max_batch=8, mtp=True, num_draft=2)
    rid = session.add(prompt_ids, SamplingParams(...))
    while session.has_work():
        for event in session.step():     # each running row gains >= 1 token per step
            ...event.request_id, event.text, event.finished, event.completion

Rows are independent: each owns one KV-cache slot (reused when it finishes), has its own sampling settings
and seed, and stops on its own (end-of-text, stop strings, max tokens). Random numbers are a hash of
(row seed, position), so a seeded request samples the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mimo.errors import MimoError
from mimo.inference.lora import AdapterSelection
from mimo.inference.model_runner import ModelRunner, RunContext, mkl_packing_available
from mimo.inference.sampling import RowSampler, SamplingFlags, SamplingParams, row_seed, token_logprobs
from mimo.inference.speculative import MTPSpeculator, SpecStats
from mimo.model import MiMoForCausalLM
from mimo.tokenizer import Tokenizer


@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the sampling distribution's model
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    time_to_first_token_s: float = 0.0
    decode_time_s: float = 0.0
    spec: SpecStats | None = None  # speculative-decoding counters (None without MTP)


@dataclass
class Event:
    """What one session step produced for one request."""
    request_id: int
    text: str  # new text since the previous event (may be empty)
    finished: bool
    completion: Completion  # the request's completion so far


class IncrementalDetokenizer:
    """Streams text as tokens arrive without ever splitting a UTF-8 character (as vLLM's detokenizer)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.tokens, self.prefix_offset, self.read_offset = tokenizer, [], 0, 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end decodes as U+FFFD)."""
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full[len(prefix):]


# ---- sessions: continuous batching -----------------------------------------------------------------

@dataclass(eq=False)
class _Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    completion: Completion
    detok: IncrementalDetokenizer | None
    t_added: float
    t_first: float | None = None
    slot: int = -1
    adapter: int = 0  # the LoRA adapter's index in the engine's stack (Engine.adapters)


@dataclass
class _HeldPrompt:
    slots: set[int]  # running rows whose cache holds the prompt's keys and values
    last: torch.Tensor  # [H] the main model's hidden state at the prompt's last position


class EngineSession:
    """A running batch: requests join with add() and leave when they finish, freeing their KV-cache slot.

    Each step() admits waiting requests into free slots (one batched, ragged prefill that samples their first
    token), then advances every running row by one decode step (or one MTP draft-and-verify step) and returns
    the events. A row's state is its slot: `length` committed tokens (the newest not yet in the cache) whose ids
    are in `hist`. Rows are kept in the lowest free slots; decode runs over slots 0..m-1 through cache views, or
    over the live slots alone once a lower slot is free (_decode).
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_seq_len: int | None = None, mtp: bool = False,
                 num_draft: int = 1):
        if max_batch < 1:
            raise MimoError(f"max_batch must be >= 1, got {max_batch}")
        if num_draft < 1:
            raise MimoError(f"num_draft must be >= 1, got {num_draft}")
        self.engine, self.model, self.tokenizer = engine, engine.model, engine.tokenizer
        self.max_seq_len = min(max_seq_len or engine.max_seq_len, engine.max_seq_len)
        n_mtp = engine.cfg.num_nextn_predict_layers if mtp else 0
        # scratch positions past the longest sequence for drafts, padding and the rows of free slots
        self.runner = engine.acquire_runner(max_batch, self.max_seq_len + 2 * num_draft + n_mtp + 3,
                                            engine.pack_rows(max_batch, num_draft if n_mtp else 0))
        capacity = self.runner.capacity
        self.sampler = RowSampler(max_batch, engine.device)
        self.idle_length = n_mtp + 1  # a free slot's length (keeps MTP catch-up positions >= 0)
        self.length = torch.full((max_batch,), self.idle_length, dtype=torch.long, device=engine.device)
        self.hist = torch.zeros(max_batch, capacity, dtype=torch.long, device=engine.device)
        self.active = torch.zeros(max_batch, dtype=torch.long, device=engine.device)
        self.host_length = [self.idle_length] * max_batch
        self.slots: list[_Request | None] = [None] * max_batch
        self.free_slots = list(range(max_batch))  # a heap: rows fill the lowest free slots
        self.waiting: deque[_Request] = deque()
        self.requests: dict[int, _Request] = {}
        self.held: dict[tuple, _HeldPrompt] = {}  # (adapter, *prompt) of running rows -> their slots (_prefill)
        self._ids = itertools.count()
        self.spec = None
        if n_mtp:
            self.spec = MTPSpeculator(self, num_draft)

    # ---- requests -------------------------------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams, adapter: int | None = None) -> int:
        """Queue a request (token ids); returns its id. params.seed None: a fresh random seed. adapter: the index
        of the LoRA adapter it uses (None: the engine's default_adapter; adapters.base_index: the base model)."""
        params.validate()
        adapters = self.engine.adapters
        adapter = self.engine.default_adapter if adapter is None else adapter
        if adapters is not None and not 0 <= adapter <= adapters.base_index:
            raise MimoError(f"no adapter {adapter} (the engine holds {adapters.base_index})")
        if len(prompt) == 0:
            raise MimoError("every prompt needs at least one token")
        if len(prompt) >= self.max_seq_len:
            raise MimoError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_seq_len}")
        if params.stop and self.tokenizer is None:
            raise MimoError("stop strings need a tokenizer")
        if max(prompt) >= self.engine.cfg.vocab_size or min(prompt) < 0:
            raise MimoError(f"prompt token ids must be in [0, {self.engine.cfg.vocab_size})")
        if params.top_k >= self.engine.cfg.vocab_size:  # keeps every token: off (and any int fits the tensors)
            params = dataclasses.replace(params, top_k=0)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31, ()))
        rid = next(self._ids)
        completion = Completion(prompt_tokens=list(prompt))
        if self.spec is not None:
            completion.spec = SpecStats()
        detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        req = _Request(rid, list(prompt), params, seed, completion, detok, time.perf_counter(), adapter=adapter)
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, rid: int):
        """Drop a request: stop it if waiting or running (its completion keeps what was generated so far) and
        forget it (finished ones too: a long-lived session holds only live requests)."""
        req = self.requests.pop(rid, None)
        if req is None:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        elif req.slot >= 0:
            self._free(req)
        req.completion.finish_reason = req.completion.finish_reason or "abort"

    def completion(self, rid: int) -> Completion:
        return self.requests[rid].completion

    def close(self):
        """Hand the KV cache back to the engine for its next session (the session is unusable after)."""
        self.engine.release_runner(self.runner)
        self.runner = None

    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    def running(self) -> list[int]:
        return [s for s, r in enumerate(self.slots) if r is not None]

    # ---- stepping -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Event]:
        events: list[Event] = []
        self._admit(events)
        rows = self.running()
        if not rows:
            return events
        m = self.runner.rows_to_run(rows[-1] + 1)
        flags = self.sampler.flags(rows)
        max_len = max(self.host_length[:m])
        with self.runner.step_threads(max_len, m):
            if self.spec is not None:
                tokens, counts, logprobs = self.spec.step(m, flags, max_len, min(self.host_length[s] for s in rows))
            else:
                tokens, logprobs = self._decode(rows, m, flags, max_len)
                counts = [1] * m
        for s in rows:
            req = self.slots[s]
            self.host_length[s] += counts[s]
            text, done = "", False
            for j in range(counts[s]):
                new, done = self._append(req, tokens[s][j], logprobs[s][j])
                text += new
                if done:
                    break
            if text or done:
                events.append(Event(req.rid, text, done, req.completion))
            if done:
                self._free(req)
        return events

    def _decode(self, rows: list[int], m: int, flags: SamplingFlags, max_len: int):
        """One token for the running slots `rows` (ascending) -> per-slot token and log-prob lists for slots
        0..m-1. Dense (every slot up to the last live one live, or m every slot: weights packed for the full
        batch): rows 0..m-1 run through cache views, free slots computing garbage that nobody reads. Else only
        the live slots run: rows leave in any order, so a batch draining to its stragglers would compute its
        highest live slot's worth of rows (1.4x the live rows over a tiny RL rollout of 128 slots)."""
        dense = len(rows) == m or m > rows[-1] + 1
        dev = self.engine.device
        order = range(m) if dense else rows
        idx = torch.arange(m, device=dev) if dense else torch.tensor(rows, device=dev)  # [b]
        L = self.length[idx]  # [b] committed tokens; x[L-1] is not in the cache yet
        logits = self.runner.decode(self.hist[idx, L - 1][:, None], (L - 1)[:, None], max_len,
                                    None if dense else idx)  # [b, V]
        if flags.greedy:  # the token and its log-prob without a separate argmax
            logits = logits.float()
            top, tokens = logits.max(-1)
            lp = top - logits.logsumexp(-1)
        else:
            tokens = self.sampler.sample(logits, idx, L, flags)  # [b]
            lp = token_logprobs(logits, tokens)
        self.hist[idx, L] = tokens
        self.length[idx] = L + self.active[idx]
        out_tokens, out_lp = [None] * m, [None] * m
        for s, t, p in zip(order, tokens.tolist(), lp.tolist()):
            out_tokens[s], out_lp[s] = [t], [p]
        return out_tokens, out_lp

    def _admit(self, events: list[Event]):
        """Prefill waiting requests into free slots (one right-padded batch) and sample their first tokens. Rows
        with the same prompt (n samples of one request, a GRPO group) share one main-model prefill: the others
        get its keys and values copied into their slots. (MTP layers still run per row: their last prompt
        position reads the row's own first token.)"""
        batch: list[_Request] = []
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            if req.params.max_new_tokens == 0:
                req.completion.finish_reason = "length"
                events.append(Event(req.rid, "", True, req.completion))
                continue
            req.slot = heapq.heappop(self.free_slots)
            self.slots[req.slot] = req
            self.sampler.set(req.slot, req.params, req.seed)
            self.runner.slot_adapter[req.slot] = req.adapter
            batch.append(req)
        if not batch:
            return
        dev = self.engine.device
        b, P = len(batch), max(len(r.prompt) for r in batch)
        slot_list = [r.slot for r in batch]
        slots = torch.tensor(slot_list, device=dev)
        ids = torch.zeros(b, P, dtype=torch.long, device=dev)
        for i, r in enumerate(batch):
            ids[i, : len(r.prompt)] = torch.tensor(r.prompt)
        lens = torch.tensor([len(r.prompt) for r in batch], device=dev)
        # padding writes land past each row's length: masked now, overwritten later
        ctx = self.runner.context(torch.arange(P, device=dev).expand(b, P),
                                  None if slot_list == list(range(b)) else slots, P)
        flags = self.sampler.flags(slot_list)
        with self.runner.step_threads(P, b * P):
            hidden = self._prefill(batch, ids, slots, ctx)  # [b, P, H]
            logits = self.runner.logits(hidden[torch.arange(b, device=dev), lens - 1])  # [b, V]
            tokens = self.sampler.sample(logits, slots, lens, flags)
            lp = token_logprobs(logits, tokens).tolist()
            self.hist[slots, :P] = ids
            self.hist[slots, lens] = tokens
            self.length[slots] = lens + 1
            self.active[slots] = 1
            if self.spec is not None:
                self.spec.prefill(slots, ctx, hidden, lens, flags)
        now = time.perf_counter()
        for req, token, logprob in zip(batch, tokens.tolist(), lp):
            req.t_first = now
            req.completion.time_to_first_token_s = now - req.t_added
            self.host_length[req.slot] = len(req.prompt) + 1
            text, done = self._append(req, token, logprob)
            if text or done:
                events.append(Event(req.rid, text, done, req.completion))
            if done:
                self._free(req)

    def _prefill(self, batch: list[_Request], ids, slots, ctx: RunContext):
        """The main model over the prompts ids [b, P] -> hidden [b, P, H]. Each prompt is computed once: a row
        whose prompt another row of the batch has gets that row's keys and values copied, and so, in a session
        without MTP, does a row whose prompt a running row holds (the samples of a GRPO group admitted a few at a
        time as slots free), with the prompt's last hidden state, kept while a row holds it. (MTP's prefill
        reads every position's hidden state: its sessions share prompts within a batch.) Positions a copy does
        not need read zeros."""
        keys = [(r.adapter, *r.prompt) for r in batch]
        source = {key: min(self.held[key].slots) for key in keys if key in self.held}  # prompt -> a slot holding it
        fresh: dict[tuple, int] = {}  # prompt -> the row of the batch that computes it
        for i, key in enumerate(keys):
            if key not in source:
                fresh.setdefault(key, i)
        dev, P = ids.device, ids.shape[1]
        if len(fresh) == len(batch):
            hidden = self.runner.hidden(ids, ctx)
        elif fresh:
            unique = torch.tensor(list(fresh.values()), device=dev)
            hidden = self.runner.hidden(ids[unique], self.runner.context(ctx.positions[unique], slots[unique], P))
        computed = dict(zip(fresh, hidden)) if fresh else {}  # prompt -> its hidden states [P, H]
        for key, h in computed.items():
            source[key] = batch[fresh[key]].slot
            if self.spec is None:
                self.held[key] = _HeldPrompt(set(), h[len(key) - 2].clone())
        for r, key in zip(batch, keys):
            if key in self.held:
                self.held[key].slots.add(r.slot)
        if len(fresh) == len(batch):
            return hidden
        copies = [i for i, key in enumerate(keys) if fresh.get(key) != i]
        self.runner.copy_prefix(torch.tensor([source[keys[i]] for i in copies], device=dev),
                                torch.tensor([batch[i].slot for i in copies], device=dev), P)
        out = torch.zeros(len(batch), P, self.engine.cfg.hidden_size, dtype=self.runner.dtype, device=dev)
        for i, key in enumerate(keys):
            if key in computed:
                out[i] = computed[key]
            else:
                out[i, len(key) - 2] = self.held[key].last
        return out

    def _free(self, req: _Request):
        s = req.slot
        key = (req.adapter, *req.prompt)
        if key in self.held:
            self.held[key].slots.discard(s)
            if not self.held[key].slots:
                del self.held[key]
        self.slots[s], req.slot = None, -1
        heapq.heappush(self.free_slots, s)
        self.active[s] = 0
        self.length[s] = self.idle_length
        self.host_length[s] = self.idle_length
        req.completion.decode_time_s = time.perf_counter() - (req.t_first or req.t_added)

    def _append(self, req: _Request, token: int, logprob: float) -> tuple[str, bool]:
        """Add one token to a row; return (new text, whether the row is finished)."""
        out, p = req.completion, req.params
        new = ""
        if self.tokenizer is not None and token in self.tokenizer.stop_token_ids and not p.ignore_eos:
            out.finish_reason = "stop"
            new = req.detok.flush()
        else:
            out.tokens.append(token)
            out.logprobs.append(logprob)
            new = req.detok.push(token) if req.detok else ""
            if len(out.tokens) >= p.max_new_tokens or len(out.prompt_tokens) + len(out.tokens) >= self.max_seq_len:
                out.finish_reason = "length"
                new += req.detok.flush() if req.detok else ""
        if new:
            before = len(out.text)
            out.text += new
            for s in p.stop:
                at = out.text.find(s, max(0, before - len(s) + 1))
                if at >= 0:
                    new = new[: max(0, at - before)]
                    out.text = out.text[:at]
                    out.finish_reason = "stop"
                    break
        return new, out.finish_reason is not None


class Engine:
    def __init__(self, model: MiMoForCausalLM, tokenizer: Tokenizer | None, max_seq_len: int | None = None,
                 compile: bool = False, draft_quantize: str | None = None, pack_weights: bool = False,
                 adapters: AdapterSelection | None = None, default_adapter: int = 0, draft_vocab: int | None = None):
        """tokenizer None: token ids only (no text, no stop tokens), as benchmarks want.
        compile: torch.compile the plain decode step and MTP's greedy draft-verify step for batches of 1-2 rows,
        with the weights frozen into the graphs and every matmul autotuned (InferenceCompiled; the first call per
        batch size and cache size compiles, 15-60 s). Compiled steps do not see later in-place weight updates:
        for serving and evaluation, not for a model that is still training.
        draft_quantize "int8" | "int4": MTP drafts come from weight-only quantized copies of the MTP layers and
        the LM head, which read a quarter or an eighth of the bytes. Still lossless: the full-precision model
        verifies every draft, so only the acceptance rate can change.
        draft_vocab N: MTP drafts pick among the vocabulary's first N ids only (rounded down to a multiple of 8;
        None or >= the vocabulary: all of it), through a head that is a view of the LM head's first N rows. A
        byte-pair vocabulary numbers its tokens in the order its merges were learnt, frequent pieces first, so
        the first ids hold most of what a model says (FR-Spec, Zhao et al. 2025, ranks by counted frequency);
        MiMo-7B's head is 151,680 rows, 9% of an int4 step's bytes, and a draft reads it again. Lossless too:
        the verify pass scores every id, and a token outside the first N is never drafted, only verified.
        pack_weights: sessions of PACK_MIN_BATCH rows or more keep MKL-packed copies of the linear weights for
        their full batch (and MTP's verify pass over it) and run a nearly full batch as a full one (pack_rows;
        fp32 on x86 CPUs; copies up to PACK_MAX_BYTES). Like compile, for weights that no longer change.
        adapters: LoRA adapters stacked on the model (lora.attach_adapters); each request picks one (or the base
        model), requests for different ones decode in the same batch. default_adapter: the index requests get
        when they name none (the first adapter unless told)."""
        if adapters is not None and compile:
            raise MimoError("--compile does not work with adapters yet; leave one out")
        self.adapters, self.default_adapter = adapters, default_adapter
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cfg = model.config
        self.max_seq_len = max_seq_len or self.cfg.max_position_embeddings
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.compile, self.pack_weights = compile, pack_weights
        self.drafter = (list(model.model.mtp_layers), model.lm_head)  # what drafts: [MTP layers], LM head
        if draft_quantize and len(model.model.mtp_layers):  # quantized once, here (stale if weights change)
            from mimo.quantize import quantized_copy

            self.drafter = ([quantized_copy(layer, draft_quantize) for layer in model.model.mtp_layers],
                            quantized_copy(model.lm_head, draft_quantize))
        if draft_vocab is not None and draft_vocab < 0:
            raise MimoError(f"--draft-vocab must be 0 (the whole vocabulary) or a number of ids, got {draft_vocab}")
        if draft_vocab and draft_vocab // 8 * 8 < self.cfg.vocab_size and len(model.model.mtp_layers):
            from mimo.quantize import first_rows

            self.drafter = (self.drafter[0], first_rows(self.drafter[1], max(8, draft_vocab // 8 * 8)))
        self._idle_runner: ModelRunner | None = None  # KV cache (and compiled step) kept between sessions
        if tokenizer is not None and tokenizer.vocab_size > self.cfg.vocab_size:
            raise MimoError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has "
                            f"{self.cfg.vocab_size}")

    PACK_MIN_BATCH = 8  # packed products win at 16-48 rows (bench/packed_linear.py); a single row gains nothing
    PACK_MAX_BYTES = 2 << 30  # the packed copies cost memory: as much again as the linear weights, per size

    def pack_rows(self, max_batch: int, num_draft: int = 0) -> tuple[int, ...]:
        """The input sizes a session of max_batch rows keeps packed weights for (() for none): a full batch, and
        its MTP verify pass of num_draft + 1 tokens a row."""
        if not self.pack_weights or max_batch < self.PACK_MIN_BATCH:
            return ()
        linears = [m.weight for m in self.model.modules() if type(m) is torch.nn.Linear]
        sizes = (max_batch, max_batch * (num_draft + 1)) if num_draft else (max_batch,)
        if not linears or not all(mkl_packing_available(w) for w in linears):
            return ()
        if sum(w.numel() * w.element_size() for w in linears) * len(sizes) > self.PACK_MAX_BYTES:
            return ()
        return sizes

    def acquire_runner(self, n_slots: int, capacity: int, pack_rows: tuple[int, ...] = ()) -> ModelRunner:
        """The idle runner if it is big enough and packed for the same sizes (no reallocation, no
        recompilation), else a new one."""
        if self.compile:  # compiled steps specialise on the cache's shape: a few capacities only
            capacity = max(256, 1 << (capacity - 1).bit_length())
        runner = self._idle_runner
        if (runner is not None and runner.n_slots >= n_slots and runner.capacity >= capacity
                and runner.pack_rows == pack_rows):
            self._idle_runner = None
            return runner
        return ModelRunner(self.model, n_slots, capacity, self.compile, self.drafter, pack_rows, self.adapters)

    def release_runner(self, runner: ModelRunner | None):
        if runner is not None:
            self._idle_runner = runner

    def session(self, max_batch: int = 8, max_seq_len: int | None = None, mtp: bool = False,
                num_draft: int = 1) -> EngineSession:
        """A continuous-batching session (MTP needs a model with MTP layers; without them it decodes plainly)."""
        return EngineSession(self, max_batch, max_seq_len, mtp, num_draft)

    def _generation_session(self, prompts, params: SamplingParams, mtp: bool, num_draft: int,
                            max_batch: int | None = None) -> EngineSession:
        params.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise MimoError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest >= self.max_seq_len:
            raise MimoError(f"prompt of {longest} tokens does not fit the context of {self.max_seq_len}")
        return self.session(min(len(prompts), max_batch or len(prompts)),
                            min(self.max_seq_len, longest + max(1, params.max_new_tokens)), mtp, num_draft)

    def warm_up(self, prompts: list[list[int]], params: SamplingParams, *, mtp: bool = False, num_draft: int = 1,
                tokens: int = 4):
        """A few tokens of generate(prompts, params, ...) through a session of the same size, so that compile=True
        compiles here rather than inside a timed call."""
        session = self._generation_session(prompts, params, mtp, num_draft)
        for p in prompts:
            session.add(p, dataclasses.replace(params, max_new_tokens=min(tokens, params.max_new_tokens)))
        try:
            while session.has_work():
                session.step()
        finally:
            session.close()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_text: Callable[[int, str], None] | None = None, *, mtp: bool = False,
                 num_draft: int = 1, max_batch: int | None = None) -> list[Completion]:
        """Complete each prompt (token ids). on_text(row, new_text) streams text as it is produced.

        mtp: speculative decoding with the model's MTP layers drafting num_draft tokens per step (lossless:
        greedy output is identical, sampled output has the same distribution). Row i samples with seed
        row_seed(params.seed, i). max_batch: rows decoding at once (default every prompt); the others wait and
        take a slot as soon as one frees (continuous batching).
        """
        session = self._generation_session(prompts, params, mtp, num_draft, max_batch)
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**31, ()))
        rids = [session.add(p, dataclasses.replace(params, seed=row_seed(base, i))) for i, p in enumerate(prompts)]
        row_of = {rid: i for i, rid in enumerate(rids)}
        try:
            while session.has_work():
                for ev in session.step():
                    if on_text and ev.text:
                        on_text(row_of[ev.request_id], ev.text)
        finally:
            session.close()
        return [session.completion(rid) for rid in rids]
