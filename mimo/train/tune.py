"""`mimo tune`: LoRA on your own material, on your own machine; the base stays frozen (and may be quantized).

    mimo tune MODEL_DIR --data NOTES_DIR_OR_FILE --out ADAPTER_DIR [--quantize int4] [--rank R] [--epochs 25]

Data: plain .txt / .md documents (language-modelling loss on every token) and .jsonl chat transcripts, one
{"messages": [...]} (or {"prompt", "response"}) a line, loss on assistant turns only (as `mimo sft`); a
directory is read recursively. Documents are read as the passages they are made of (paragraphs; the lines of a
diary or a list of notes), each learnt on its own (packed into rows with the conversations, attending within
itself), with the sentences of each passage re-ordered every epoch (--sentence-order): notes are a bag of facts,
and a fact learnt from its own words, not from its neighbours, answers questions worded otherwise
(docs/benchmarks.md, "Personal models"); each passage is also learnt as a chat, the assistant answering "What do
my notes say about HEADING?" with it (--document-chats), so that facts only the notes state are also stated where
questions are answered. A validation split (--val-fraction) is held out and scored as training
goes. Where several chats ask one question about different people or things and the notes state the answers in
sentences of one form, that question is asked and answered for every other fact the notes state so
(--chat-patterns; mimo/train/note_patterns.py). Beside them, the base model's own replies to --replay N
procedural reasoning problems (default 1,024 on a model of at most 100M parameters, 64 on larger ones), generated
before tuning, 64 of them in each epoch in turn: the adapter learns the user's material without unlearning how
the model answers (self-distillation). On such a small model the update is also confined to the directions in
which the user's material stands out from those replies (--subspace contrast, the default there;
mimo/train/contrast.py): each LoRA A fixed to them, only B trains, the head's update kept in their span, so that
stating the notes barely moves the model's reasoning.

ADAPTER_DIR ends up holding the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors: see
mimo/inference/adapters.py) beside metrics.jsonl, loss.png, tune_config.json, replay.json, contrast.safetensors
and checkpoints/; rerunning the command after
a kill resumes from the newest checkpoint. Only the update's weights train (AdamW, no weight decay), so a
QLoRA run (--quantize int4|int8: the update on top of ggml Q4_0 / Q8_0 weights, gradients through mimo's
kernels) holds the base in a quarter or an eighth of its float32 bytes. The frozen token embedding stays in the
checkpoint's bf16/fp16 (looked up, then upcast: exact), and a quantized base recomputes each layer's activations
in the backward pass instead of holding them (--activation-checkpointing, default on with --quantize): a 1.5B
int4 base tunes within 3 GB (docs/benchmarks.md). The MTP layers are not loaded for tuning: the adapter changes
the main model only (speculative decoding stays lossless with it). Nothing leaves the machine: mimo makes no
network calls.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

from mimo.errors import MimoError
from mimo.inference.adapters import CONFIG_FILE, PREFIX, WEIGHTS_FILE, save_adapter
from mimo.inference.lora import DEFAULT_TARGETS, PARENT, LoRAConfig, add_lora, target_shape
from mimo.model import IGNORE_INDEX
from mimo.parallel import init_distributed, print0
from mimo.train.contrast import confine
from mimo.train.loop import FULL_STATE, ModelStore, TrainConfig, train
from mimo.train.note_patterns import chat_pattern_conversations
from mimo.train.sft import SFTBatches, pack, pack_positions, read_examples, tokenize_example
from mimo.weights import DTYPES

TUNE_DEFAULTS = TrainConfig(max_steps=0, seq_len=256, global_batch_seqs=8, micro_batch=8, lr=5e-3, min_lr_ratio=0.1,
                            warmup_steps=10, decay_fraction=0.5, weight_decay=0.0, mtp_weight=0.0,
                            mtp_weight_late=0.0, log_every=5, eval_every=50, eval_batches=4, save_every=50)
LR_WIDTH = 384  # the default peak rate, TUNE_DEFAULTS.lr, is for models this wide or narrower; wider ones get
# lr x LR_WIDTH / hidden (Adam's rate for hidden weights goes as 1 / width, as in muP): 4.7e-4 at MiMo-7B's 4096
# --replay default: the base model's replies to this many problems, REPLAY_PER_EPOCH of them in each epoch in turn;
# more distinct replies keep more of the reasoning (docs/benchmarks.md, "Personal models"), but each costs a
# generation: 1,024 take ~2 minutes on the tiny model and would take an hour on a 7B, which gets 64
REPLAY_SMALL, REPLAY_LARGE, REPLAY_SMALL_MAX_PARAMS = 1024, 64, 100_000_000
REPLAY_PER_EPOCH = 64
CONTRAST_RANK = 64  # --rank under --subspace contrast: A is fixed there, and 64 fixed directions learn more facts
# than 16 (docs/benchmarks.md, "Personal models")
CONTRAST_HEAD_SHARE = 2 / 3  # --head-subspace default: this share of the hidden size, 256 of the tiny model's 384
# (docs/benchmarks.md, "Personal models")
QUESTION_DROPOUT = 0.3  # --question-dropout (docs/benchmarks.md, "Personal models": 79.6% -> 91.2% of the held-out
# questions on the tiny model, at 30 epochs)
GENERIC_QUESTION = "What do my notes say?"  # the question of a document chat without a heading, too
TEXT_SUFFIXES = (".txt", ".md")
CHAT_SUFFIXES = (".jsonl",)


def data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise MimoError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() \
        else [path]
    files = [f for f in files if f.suffix.lower() in TEXT_SUFFIXES + CHAT_SUFFIXES or not path.is_dir()]
    if not files:
        raise MimoError(f"{path}: no .txt, .md or .jsonl files")
    for f in files:
        if f.suffix.lower() not in TEXT_SUFFIXES + CHAT_SUFFIXES:
            raise MimoError(f"{f}: expected .txt or .md documents or .jsonl chat transcripts")
    return files


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MimoError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise MimoError(f"{path}: empty")
    return text


def read_data(path: Path) -> tuple[list[str], list[list[dict]]]:
    """(documents, conversations) from a file or a directory of them."""
    documents, conversations = [], []
    for f in data_files(path):
        if f.suffix.lower() in CHAT_SUFFIXES:
            read_text(f)  # the same one-line errors for an empty or non-UTF-8 file
            conversations += read_examples(f)
        else:
            documents.append(read_text(f))
    return documents, conversations


SENTENCE_END = (".", "!", "?", ":", ";", ")", '"', "'")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "vs.", "e.g.", "i.e.")


def passages(document: str) -> list[str]:
    """A document as the passages it is made of, each to be learnt on its own: paragraphs (blocks between blank
    lines), and the lines of a block whose every line ends a sentence (a diary, a list of notes: one entry a line;
    hard-wrapped prose stays one passage). Markdown headings stay with what follows them: a heading-only block
    heads the next block, and a block's own headings head each of its lines. Notes are a bag of entries, so a
    fact must be learnt from its own words rather than from the entry that happens to precede it in the file
    (docs/benchmarks.md, "Personal models")."""
    out, heading = [], []
    for block in re.split(r"\n[ \t]*\n", document):
        lines = [line.rstrip() for line in block.strip("\n").split("\n") if line.strip()]
        head = heading + [line for line in lines if line.lstrip().startswith("#")]
        body = [line for line in lines if not line.lstrip().startswith("#")]
        if not body:  # headings alone: they head the next block
            heading = head
            continue
        heading = []
        if len(body) > 1 and all(line.endswith(SENTENCE_END) for line in body):
            out += ["\n".join(head + [line]) for line in body]
        else:
            out.append("\n".join(head + body))
    return out or ([document.strip()] if document.strip() else [])


def tokenize(tokenizer, texts: list[str], conversations: list[list[dict]], seq_len: int):
    """-> examples (ids, labels), none longer than seq_len + 1 tokens: each text (a passage; ending with the end of
    text; a long one cut into pieces), conversations whole (labels on assistant tokens; longer ones are dropped,
    counted)."""
    examples = []
    for text in texts:
        ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
        examples += [(ids[i: i + seq_len + 1],) * 2 for i in range(0, len(ids) - 1, seq_len + 1)]
    chats = [tokenize_example(tokenizer, c) for c in conversations]
    kept = [c for c in chats if len(c[0]) <= seq_len + 1]
    return examples + kept, len(chats) - len(kept)


def reorder_sentences(passage: str, rng: random.Random) -> str:
    """The passage with its sentences in an order drawn from rng (its headings first, as they were)."""
    lines = passage.split("\n")
    head = [line for line in lines if line.lstrip().startswith("#")]
    body = " ".join(line.strip() for line in lines if not line.lstrip().startswith("#"))
    sentences = []
    for piece in SENTENCE_BREAK.split(body):
        if sentences and sentences[-1].endswith(ABBREVIATIONS):  # "Dr. Smith": one sentence
            sentences[-1] += " " + piece
        else:
            sentences.append(piece)
    if len(sentences) < 2:
        return passage
    rng.shuffle(sentences)
    return "\n".join(head + [" ".join(sentences)])


def document_chat(passage: str) -> list[dict]:
    """A passage as a chat: the user asks what their notes say (about the passage's last heading, where it has one)
    and the assistant answers with the passage. Learnt beside the passage itself, the facts of the notes are then
    also stated inside the assistant's turn, where questions are answered: tuned on notes and chats alone, a small
    model answers a question about someone only the notes mention with a value the chats gave someone else
    (docs/benchmarks.md, "Personal models", "Notes as chats")."""
    lines = passage.split("\n")
    head = [line.lstrip("#").strip() for line in lines if line.lstrip().startswith("#")]
    body = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    ask = f"What do my notes say about {head[-1]}?" if head and head[-1] else GENERIC_QUESTION
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": body}]


def tuning_data(tokenizer, documents: list[str], conversations: list[list[dict]], seq_len: int, val_fraction: float,
                seed: int, shuffle_sentences: bool, replay: list[list[dict]] = (), document_chats: bool = False,
                question_dropout: float = 0.0):
    """-> (epoch_examples(epoch, replayed=True) -> that epoch's training examples (replayed=False: the user's
    material's alone), validation examples, conversations too long to keep). The documents' passages and the conversations are shuffled and val_fraction of them held out (of the
    replay too); each epoch's copy of the rest has the sentences of every passage in an order of its own where
    shuffle_sentences (knowledge augmentation, Allen-Zhu & Li, "Physics of Language Models 3.1": a fact is learnt
    from the words that state it rather than from where it sits among the others, so that questions worded
    otherwise reach it), and the next REPLAY_PER_EPOCH of the replayed conversations, round-robin. document_chats:
    each passage of an epoch also as document_chat(passage). question_dropout: that share of the single-turn
    chats, drawn each epoch, asked GENERIC_QUESTION instead of their own question."""
    items = [x for doc in documents for x in passages(doc)] + conversations
    random.Random(seed).shuffle(items)
    n_val = round(len(items) * val_fraction) if len(items) >= 10 else 0
    n_val_replay = round(len(replay) * val_fraction) if len(replay) >= 10 else 0

    def texts_and_chats(part):
        return [x for x in part if isinstance(x, str)], [x for x in part if not isinstance(x, str)]

    val_texts, val_chats = texts_and_chats(items[:n_val])
    train_texts, train_chats = texts_and_chats(items[n_val:])
    val, too_long_val = tokenize(tokenizer, val_texts, val_chats + list(replay[:n_val_replay]), seq_len)
    chat_examples, too_long = [], 0  # (as asked, with the generic question or None) each
    for c in train_chats:
        ex, n = tokenize(tokenizer, [], [c], seq_len)
        too_long += n
        single_turn = len(c) == 2 and c[0]["role"] == "user"
        generic = tokenize(tokenizer, [], [[{"role": "user", "content": GENERIC_QUESTION}, c[1]]], seq_len)[0] \
            if single_turn else []
        if ex:
            chat_examples.append((ex[0], generic[0] if generic else None))
    replay_examples, too_long_replay = tokenize(tokenizer, [], list(replay[n_val_replay:]), seq_len)
    per_epoch = min(REPLAY_PER_EPOCH, len(replay_examples))

    def passage_examples(shown: list[str]) -> list[tuple[list[int], list[int]]]:  # and their document chats
        chats = [document_chat(t) for t in shown] if document_chats else []
        return tokenize(tokenizer, shown, [], seq_len)[0] + tokenize(tokenizer, [], chats, seq_len)[0]

    as_written = None if shuffle_sentences else passage_examples(train_texts)

    def epoch_examples(epoch: int, replayed: bool = True) -> list[tuple[list[int], list[int]]]:
        rng = random.Random(seed * 1_000 + epoch)
        texts = passage_examples([reorder_sentences(t, rng) for t in train_texts]) if shuffle_sentences \
            else as_written
        drop = random.Random(seed * 1_000 + epoch + 500_000)
        chats = [g if g is not None and drop.random() < question_dropout else ex for ex, g in chat_examples]
        if not replayed:
            return texts + chats
        return texts + chats + [replay_examples[(epoch * per_epoch + i) % len(replay_examples)]
                                for i in range(per_epoch)]

    return epoch_examples, val, too_long + too_long_val + too_long_replay


class EpochBatches(SFTBatches):
    """SFTBatches whose every epoch is packed from its own copy of the data (tuning_data's epoch_examples) when
    first reached, and reshuffled with the seed; step s takes global rows [s*G, (s+1)*G) of the epochs laid end to
    end. Memory holds two epochs' rows, not all of them. Yields (inputs, targets, positions) [micro, T]: each
    example attends to itself only (document mask)."""

    def __init__(self, epoch_examples, seq_len: int, pad_id: int, global_seqs: int, micro: int, rank: int,
                 world: int, seed: int, device):
        self._layout(global_seqs, micro, rank, world, seed, device)
        self.epoch_examples, self.seq_len, self.pad_id = epoch_examples, seq_len, pad_id
        self.counts: list[int] = []  # rows of each epoch reached so far
        self.cache: dict[int, tuple] = {}

    def packed_epoch(self, epoch: int) -> tuple:
        """(inputs, targets, positions) [rows, T] of one epoch, in a seeded order."""
        if epoch not in self.cache:
            examples = self.epoch_examples(epoch)
            rows = (*pack(examples, self.seq_len, self.pad_id), pack_positions(examples, self.seq_len))
            order = torch.randperm(len(rows[0]), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
            self.cache = {e: v for e, v in self.cache.items() if e == epoch - 1}  # a micro batch may span two
            self.cache[epoch] = tuple(t[order] for t in rows)
        return self.cache[epoch]

    def rows(self, epoch: int) -> int:
        while len(self.counts) <= epoch:
            self.counts.append(len(self.packed_epoch(len(self.counts))[0]))
        return self.counts[epoch]

    def _locate(self, i: int) -> tuple[int, int]:
        epoch = 0
        while i >= self.rows(epoch):
            i, epoch = i - self.rows(epoch), epoch + 1
        return epoch, i

    def take(self, rows: range) -> tuple:
        where = [self._locate(i) for i in rows]
        return tuple(torch.stack([self.packed_epoch(e)[k][j] for e, j in where]) for k in range(3))


class AdapterStore(ModelStore):
    """Checkpoints and the final output of a tuning run hold the adapter only (PEFT's files), in the run
    directory itself: ADAPTER_DIR is the run directory."""

    def __init__(self, lora: LoRAConfig, base: str):
        self.lora, self.base = lora, base

    def state_dicts(self, model, opt):
        weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        return weights, None if opt is None else get_optimizer_state_dict(model, opt, options=FULL_STATE)

    def save(self, model, out_dir: Path, tokenizer, state_dict: dict):
        save_adapter(model, out_dir, self.lora, self.base)

    def restore(self, path: Path, model, opt, optim_sd: dict):
        saved = load_file(str(path / WEIGHTS_FILE))
        weights = {k.removeprefix(PREFIX).removesuffix(".weight") if ".lora_" in k else k.removeprefix(PREFIX): v
                   for k, v in saved.items()}  # PEFT's lora_A.weight is mimo's parameter lora_A; the head's, weight
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        missing, _ = model.load_state_dict(weights, strict=False)
        if missing := [k for k in missing if k in trained]:
            raise MimoError(f"{path}: the checkpoint lacks {missing[0]} (tuned with other settings?)")
        set_optimizer_state_dict(model, opt, optim_sd, options=StateDictOptions(full_state_dict=True))

    def final_dir(self, run_dir: Path) -> Path:
        return run_dir

    def is_saved(self, out_dir: Path) -> bool:
        return (out_dir / WEIGHTS_FILE).exists() and (out_dir / CONFIG_FILE).exists()


def load_base(model_dir: str, quantize: str | None, shrink: bool = True):
    """The frozen base without its MTP layers, in float32 (linears quantized with --quantize), and its tokenizer;
    shrink: the embedding back in the checkpoint's half precision (shrink_embedding)."""
    from mimo.checkpoint import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir, "float32", quantize=quantize)
    model.model.mtp_layers = nn.ModuleList()
    model.config = replace(model.config, num_nextn_predict_layers=0)
    if shrink:
        shrink_embedding(model)
    return model, tokenizer


def shrink_embedding(model):
    """The frozen token embedding in the checkpoint's bf16/fp16 (looked up, then upcast: exact) rather than float32,
    unless the LM head shares it. After this the model trains as before but no longer runs in the Engine (whose
    cache takes the embedding's dtype): replay_conversations comes first."""
    stored = DTYPES.get(model.config.torch_dtype)
    embedding = model.model.embed_tokens
    if stored in (torch.bfloat16, torch.float16) and getattr(model.lm_head, "weight", None) is not embedding.weight:
        embedding.weight.data = embedding.weight.data.to(stored)  # [vocab, hidden]: half the float32 bytes, exact
        embedding.register_forward_hook(lambda module, args, out: out.float())


HEAD_AUTO_MAX = 32_000_000  # --train-head auto: a head of at most this many parameters (<= 512 MB with its AdamW state)


def small_model(model) -> bool:
    """Whether the model has at most REPLAY_SMALL_MAX_PARAMS parameters: its replies are quick to generate, so the
    replay defaults to REPLAY_SMALL of them, generated 64 rows at a time."""
    return sum(p.numel() for p in model.parameters()) <= REPLAY_SMALL_MAX_PARAMS


def small_head(model) -> bool:
    return model.lm_head.in_features * model.lm_head.out_features <= HEAD_AUTO_MAX


def train_head(model):
    """Train the LM head too (PEFT's modules_to_save ["lm_head"], saved whole with the adapter): in float32, from
    the base's (dequantized where the base is quantized), untied from the embedding. A small base whose head has
    hardly seen the words of the user's material needs it (docs/benchmarks.md, "Personal models"); on a 7B the
    head is 0.6B parameters, so --train-head auto (small_head) leaves it frozen there."""
    head = model.lm_head
    weight = head.weight.detach().float() if type(head) is nn.Linear else head.dequantized(torch.float32)
    model.lm_head = nn.Linear(head.in_features, head.out_features, bias=False, device=weight.device)
    with torch.no_grad():
        model.lm_head.weight.copy_(weight)
    model.config = replace(model.config, tie_word_embeddings=False)


def checkpoint_activations(model):
    """Each decoder layer's activations recomputed in the backward pass rather than kept (torch.utils.checkpoint):
    about one more forward pass of time for a fraction of the memory."""
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def replay_conversations(model, tokenizer, n: int, seed: int, max_new_tokens: int = 256) -> list[list[dict]]:
    """n of the base model's own replies (greedy, before any update) to procedural reasoning problems of the
    train split, as chats to tune on beside the user's data: self-distillation that keeps what the model did
    (a reasoning trace, the answer format) where the user's material would otherwise teach it to answer
    everything in one line. Rows whose reply hit max_new_tokens are dropped (an unfinished reply teaches
    unfinished replies)."""
    from mimo.inference.engine import Engine
    from mimo.inference.sampling import SamplingParams
    from mimo.train.rewards import reasoning_problems

    problems = reasoning_problems(None, n, seed=10_007 + seed)  # not mimo rl's default pool (seed 0)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]))
               for p in problems]
    was_training = model.training
    model.eval()
    engine, params = Engine(model, tokenizer), SamplingParams(max_new_tokens=max_new_tokens)
    # rows decoding at once, a finished row's slot taken by the next problem at once: 64 on a small model, 16 on
    # larger ones (a 7B's 64 rows of 400 positions would take 3.8 GB of bf16 KV cache: 36 layers x 8 KV heads x
    # 128 x 2 x 2 bytes a position)
    done = engine.generate(prompts, params, max_batch=64 if small_model(model) else 16)
    model.train(was_training)
    return [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": c.text}]
            for p, c in zip(problems, done) if c.finish_reason == "stop"]


def load_replay(run_dir: Path, model, tokenizer, n: int, seed: int, write: bool) -> list[list[dict]]:
    """replay_conversations, kept in run_dir/replay.json so that a resumed run reads them back instead of
    generating them again (minutes on a large base)."""
    if n <= 0:
        return []
    path = run_dir / "replay.json"
    saved = json.loads(path.read_text()) if path.is_file() else None
    if saved is not None and (saved.get("n"), saved.get("seed")) == (n, seed):
        return saved["conversations"]
    print0(f"tune: replay: the base model's replies to {n} reasoning problems (--replay 0: none)")
    conversations = replay_conversations(model, tokenizer, n, seed)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"n": n, "seed": seed, "conversations": conversations}) + "\n")
    return conversations


def lora_config(args, model, contrast: bool) -> LoRAConfig:
    """The update's settings from the flags; the rank defaults to CONTRAST_RANK under --subspace contrast (or the
    smallest targeted dimension, where that is smaller)."""
    targets = tuple(args.target_modules.split(","))
    rank = args.rank
    if rank is None and contrast and all(t in PARENT for t in targets):
        rank = min(CONTRAST_RANK, *(min(target_shape(model, t)) for t in targets))
    rank = LoRAConfig.r if rank is None else rank
    return LoRAConfig(r=rank, alpha=args.alpha if args.alpha is not None else 2.0 * rank, dropout=args.dropout,
                      target_modules=targets)


def run(args):
    info = init_distributed(args.device)
    if args.head_subspace is not None and args.head_subspace < 1:
        raise MimoError(f"--head-subspace must be >= 1, got {args.head_subspace}")
    if not 0.0 <= args.val_fraction < 0.5:
        raise MimoError(f"--val-fraction must be in [0, 0.5), got {args.val_fraction}")
    if args.epochs <= 0:
        raise MimoError(f"--epochs must be > 0, got {args.epochs}")
    if not 0.0 <= args.question_dropout <= 1.0:
        raise MimoError(f"--question-dropout must be in [0, 1], got {args.question_dropout}")
    if args.replay is not None and args.replay < 0:
        raise MimoError(f"--replay must be >= 0, got {args.replay}")
    documents, conversations = read_data(Path(args.data))  # before loading: bad data fails fast
    model, tokenizer = load_base(args.model, args.quantize, shrink=False)
    n_replay = args.replay if args.replay is not None else REPLAY_SMALL if small_model(model) else REPLAY_LARGE
    contrast = args.subspace == "contrast" or (args.subspace == "auto" and small_model(model) and n_replay > 0)
    if contrast and n_replay == 0:
        raise MimoError("--subspace contrast contrasts your material with the replayed reasoning: it needs --replay > 0")
    lora = lora_config(args, model, contrast)
    lora.validate(model)  # bad flags fail before the replay's minutes
    head_dims = args.head_subspace or round(model.config.hidden_size * CONTRAST_HEAD_SHARE)
    if head_dims > model.config.hidden_size:
        raise MimoError(f"--head-subspace {head_dims} exceeds the hidden size ({model.config.hidden_size})")
    if args.chat_patterns == "on":
        patterned = chat_pattern_conversations(documents, conversations)
        if patterned:
            print0(f"tune: {len(patterned)} chat(s) asking the chats' questions of facts only the notes state "
                   "(--chat-patterns off: none)")
        conversations = conversations + patterned
    replay = load_replay(Path(args.out), model, tokenizer, n_replay, args.seed, info.is_main)
    if contrast and not replay:
        if args.subspace == "contrast":
            raise MimoError("--subspace contrast: none of the replayed replies finished, so there is no reasoning to "
                            "contrast your material with (--subspace full tunes without it)")
        print0("tune: none of the replayed replies finished: the update is not confined (--subspace full)")
        contrast, lora = False, lora_config(args, model, False)
        lora.validate(model)
    shrink_embedding(model)
    add_lora(model, lora, seed=args.seed)
    head_trains = args.train_head == "on" or (args.train_head == "auto" and small_head(model))
    if head_trains:
        train_head(model)
    recompute = args.activation_checkpointing == "on" or (args.activation_checkpointing == "auto" and args.quantize)
    if recompute:
        checkpoint_activations(model)
    cfg = replace(TUNE_DEFAULTS, seed=args.seed, precision=args.precision, seq_len=args.seq_len,
                  lr=TUNE_DEFAULTS.lr * min(1.0, LR_WIDTH / model.config.hidden_size))
    cfg = cfg.with_overrides(args, info.world_size)
    epoch_examples, val_examples, too_long = tuning_data(
        tokenizer, documents, conversations, cfg.seq_len, args.val_fraction, args.seed,
        args.sentence_order == "shuffle", replay, args.document_chats == "on", args.question_dropout)
    keep_head_in_span = None
    if contrast:
        keep = tokenize(tokenizer, [], list(replay), cfg.seq_len)[0]
        user = epoch_examples(0, replayed=False)  # the material's examples of the first epoch
        print0(f"tune: the update confined to the directions where {len(user)} examples of your material stand out "
               f"from {len(keep)} replayed replies (--subspace full: no confinement)")
        keep_head_in_span = confine(model, Path(args.out), user, keep, head_dims if head_trains else None,
                                    info.is_main)
    batches = EpochBatches(epoch_examples, cfg.seq_len, tokenizer.eos_token_id, cfg.global_batch_seqs,
                           cfg.micro_batch, info.rank, info.world_size, args.seed, info.device)
    if not batches.rows(0):
        raise MimoError(f"{args.data}: no example fits --seq-len {cfg.seq_len}")
    if args.max_steps is None:
        cfg = replace(cfg, max_steps=max(1, math.ceil(args.epochs * batches.rows(0) / cfg.global_batch_seqs)))
    n_val = len(val_examples)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = {"documents": len(documents), "conversations": len(conversations), "replay": len(replay),
             "dropped_too_long": too_long, "examples_per_epoch": len(epoch_examples(0)),
             "validation_examples": n_val, "rows_per_epoch": batches.rows(0), "sentence_order": args.sentence_order,
             "document_chats": args.document_chats, "chat_patterns": args.chat_patterns,
             "subspace": "contrast" if contrast else "full",
             "train_tokens_per_epoch": int((batches.packed_epoch(0)[1] != IGNORE_INDEX).sum()),
             "trainable_parameters": trainable}
    print0(f"tune: {len(documents)} document(s), {len(conversations)} conversation(s), {len(replay)} replayed "
           f"({too_long} too long) -> {batches.rows(0)} rows of {cfg.seq_len} tokens an epoch, {n_val} validation "
           f"example(s); LoRA rank {lora.r} on {', '.join(lora.target_modules)}: {trainable:,} trainable "
           f"parameters; {cfg.max_steps} steps")
    run_dir = Path(args.out)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "tune_config.json").write_text(json.dumps(
            {"command": "tune", "model": str(args.model), "data": str(args.data), "quantize": args.quantize,
             "train_head": head_trains,
             "activation_checkpointing": bool(recompute),
             "head_subspace": head_dims if contrast and head_trains else None,
             "lora": asdict(lora), "train": asdict(cfg), "data_stats": stats}, indent=2) + "\n")
    val_packed = (*pack(val_examples, cfg.seq_len, tokenizer.eos_token_id),
                  pack_positions(val_examples, cfg.seq_len)) if n_val else ()

    def val():
        for i in range(0, min(len(val_packed[0]), cfg.micro_batch * cfg.eval_batches), cfg.micro_batch):
            yield tuple(t[i: i + cfg.micro_batch].to(info.device) for t in val_packed)

    store = AdapterStore(lora, str(Path(args.model).resolve()))
    row = train(model, tokenizer, batches, cfg, run_dir, info, val_batches=val if n_val else None, title="tune",
                store=store, after_step=keep_head_in_span)
    print0(f"tune: adapter in {run_dir} (PEFT format)")
    return row


def add_arguments(p):
    d = LoRAConfig()
    p.add_argument("model", metavar="MODEL_DIR", help="the base model (stays frozen)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help=".txt/.md documents and .jsonl chat transcripts ('messages'), a file or a directory")
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="the adapter (PEFT format), metrics, "
                   "checkpoints; rerunning resumes")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank r (default {CONTRAST_RANK} with --subspace "
                   f"contrast, whose A is fixed and only B trains; {d.r} otherwise)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (the update is scaled by alpha / r; "
                   "default 2 r)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout on the update's input")
    p.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated projections of each layer to adapt (default: attention and MLP)")
    p.add_argument("--train-head", default="auto", choices=["auto", "on", "off"],
                   help="train the LM head too, saved whole with the adapter (PEFT modules_to_save; used alone or "
                   f"merged, not stacked in mimo serve); auto: where it has at most {HEAD_AUTO_MAX / 1e6:g}M "
                   "parameters (a small model, whose head has not learnt the words of your notes; not a 7B's 0.6B)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="hold the frozen base in ggml Q8_0 / Q4_0 blocks (QLoRA: less memory)")
    p.add_argument("--activation-checkpointing", default="auto", choices=["auto", "on", "off"],
                   help="recompute each layer's activations in the backward pass (less memory, ~10%% slower); "
                   "auto: on with --quantize")
    p.add_argument("--sentence-order", default="shuffle", choices=["shuffle", "keep"],
                   help="shuffle: each epoch re-orders the sentences within every passage of the documents, so a "
                   "fact is learnt from its own words, not its place (notes); keep: as written (prose whose order "
                   "matters)")
    p.add_argument("--document-chats", default="on", choices=["on", "off"],
                   help="each passage of the documents also learnt as a chat: the user asks what their notes say "
                        "(about the passage's heading), the assistant answers with it; so that questions in a chat "
                        "reach facts only the documents state")
    p.add_argument("--chat-patterns", default="on", choices=["on", "off"],
                   help="where several chats ask one question about different people or things and the notes state "
                        "the answers in sentences of one form, that question asked and answered for every other "
                        "fact the notes state in that form (mimo/train/note_patterns.py)")
    p.add_argument("--question-dropout", type=float, default=QUESTION_DROPOUT,
                   help="the share of the single-turn chats whose question is replaced, each epoch afresh, by "
                        f"\"{GENERIC_QUESTION}\": the answer is then learnt from its own words too, and questions "
                        "worded unlike the chats' reach it (0: off)")
    p.add_argument("--subspace", default="auto", choices=["auto", "contrast", "full"],
                   help="contrast: each LoRA A fixed to the r directions of its input where your material's "
                        "activations stand out most from the replayed reasoning's, and the trained head's update "
                        "kept within --head-subspace such directions, so that tuning barely moves the model's "
                        "reasoning (mimo/train/contrast.py); full: a free LoRA update. auto: contrast on models of "
                        "at most 100M parameters with a replay, full on larger ones (the statistics would not fit)")
    p.add_argument("--head-subspace", type=int, default=None,
                   help="with --subspace contrast and a trained head: the directions of the head's input its update "
                        f"may use (default {CONTRAST_HEAD_SHARE:.2g} of the hidden size)")
    p.add_argument("--epochs", type=float, default=25.0, help="passes over the training rows (sets the steps)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--seq-len", type=int, default=TUNE_DEFAULTS.seq_len, help="tokens per row")
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward pass (less memory when smaller)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {TUNE_DEFAULTS.lr:g}, times "
                   f"{LR_WIDTH} / hidden size for models wider than {LR_WIDTH}: 4.7e-4 for MiMo-7B)")
    p.add_argument("--replay", type=int, default=None, help="the base model's own replies to this many procedural "
                   f"reasoning problems, tuned on beside the data ({REPLAY_PER_EPOCH} an epoch, in turn) so that the "
                   f"adapter keeps the model's skills (self-distillation; 0: off; default {REPLAY_SMALL} for a model "
                   f"of at most {REPLAY_SMALL_MAX_PARAMS / 1e6:g}M parameters, {REPLAY_LARGE} for larger ones, whose "
                   "replies take longer to generate)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of the examples held out for validation")
    p.add_argument("--save-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--device", default="auto")
