"""Tokenizer on the `tokenizers` library: train a byte-level BPE (Qwen2's pre-tokenization, one token per
digit) with the chat special tokens, or load any Hugging Face tokenizer.json (Qwen2's included).

The chat template (ChatML, as Qwen2 and MiMo) is a Jinja template stored in tokenizer_config.json, so
transformers, vLLM and SGLang render the same prompts mimo does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from mimo.errors import MimoError
from mimo.jsonl import read_json, read_jsonl

END_OF_TEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END, THINK_START, THINK_END]

# Qwen2's split: words, single digits, punctuation runs, newlines, whitespace
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer_config.json keys written back as mimo's own (chat_template), or that describe a load, not the tokenizer
TRANSIENT_CONFIG_KEYS = ("chat_template", "backend", "is_local", "local_files_only", "_commit_hash")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class Tokenizer:
    def __init__(self, tk: HFTokenizer, config: dict | None = None, chat_template: str | None = None):
        self.tk = tk
        self.config = dict(config or {})
        self.chat_template = chat_template or self.config.get("chat_template") or CHAT_TEMPLATE
        eos = self.config.get("eos_token") or END_OF_TEXT
        if isinstance(eos, dict):  # older tokenizer_config.json writes AddedToken dicts
            eos = eos.get("content")
        self.eos_token = eos
        self.eos_token_id = tk.token_to_id(eos)
        if self.eos_token_id is None:
            raise MimoError(f"tokenizer: end-of-text token {eos!r} is not in the vocabulary")
        pad = self.config.get("pad_token")
        if isinstance(pad, dict):
            pad = pad.get("content")
        if not (isinstance(pad, str) and tk.token_to_id(pad) is not None):
            pad = END_OF_TEXT if tk.token_to_id(END_OF_TEXT) is not None else eos
        self.pad_token = pad
        # every token that ends a turn or a document stops generation
        self.stop_token_ids = sorted({i for t in (eos, END_OF_TEXT, IM_END) if (i := tk.token_to_id(t)) is not None})

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def train(cls, files: list, vocab_size: int, min_frequency: int = 2, show_progress: bool = True,
              texts: list[str] | None = None) -> Tokenizer:
        """Byte-level BPE trained on text / JSONL files (the 'text' field, else every string field)."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise MimoError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tk.train_from_iterator(_iter_texts(files, texts or []), trainer=trainer)
        return cls(tk, {"eos_token": END_OF_TEXT})

    @classmethod
    def load(cls, path) -> Tokenizer:
        """A model directory (tokenizer.json + tokenizer_config.json) or a tokenizer.json file."""
        path = Path(path)
        tk_file = path / "tokenizer.json" if path.is_dir() else path
        if not tk_file.is_file():
            raise MimoError(f"{tk_file}: not found")
        try:
            tk = HFTokenizer.from_file(str(tk_file))
        except Exception as e:  # noqa: BLE001 (the Rust library raises plain Exception subclasses)
            raise MimoError(f"{tk_file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        config, template = {}, None
        cfg_file = tk_file.with_name("tokenizer_config.json")
        if cfg_file.is_file():
            config = read_json(cfg_file)
        jinja_file = tk_file.with_name("chat_template.jinja")  # transformers 5 stores it apart
        if jinja_file.is_file():
            template = jinja_file.read_text()
        if "eos_token" not in config and tk.token_to_id(END_OF_TEXT) is None:
            raise MimoError(f"{cfg_file}: no eos_token and no {END_OF_TEXT} in {tk_file}")
        return cls(tk, config, template)

    def save(self, out_dir):
        """tokenizer.json and tokenizer_config.json, which transformers 4 and 5 (AutoTokenizer), vLLM and SGLang open
        with the same special tokens (end of text, pad, the chat and thinking tokens) and chat template."""
        out_dir = Path(out_dir)
        self.tk.save(str(out_dir / "tokenizer.json"))
        added = {str(self.tk.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                               "normalized": False, "single_word": False}
                 for t in SPECIAL_TOKENS if self.tk.token_to_id(t) is not None}
        kept = {k: v for k, v in self.config.items() if k not in TRANSIENT_CONFIG_KEYS}
        # the generic class under the name both transformers 4 and 5 open (5 saves "TokenizersBackend", unknown to 4;
        # 4 saves "PreTrainedTokenizer", dropping "Fast")
        if kept.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizer"):
            kept["tokenizer_class"] = "PreTrainedTokenizerFast"
        extra = kept.pop("extra_special_tokens", None)  # transformers 5's list (a dict of named tokens in 4)
        chat_tokens = kept.get("additional_special_tokens") or (extra if isinstance(extra, list) else None) or \
            [t for t in SPECIAL_TOKENS if t not in (self.eos_token, self.pad_token) and self.tk.token_to_id(t) is not None]
        if isinstance(extra, dict) and extra:
            kept["extra_special_tokens"] = extra
        config = {
            "model_max_length": 32768,
            **kept,
            "added_tokens_decoder": added,
            "additional_special_tokens": chat_tokens,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "bos_token": None,
            "chat_template": self.chat_template,
        }
        (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- use ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise MimoError("chat messages must be objects with string 'role' and 'content'")
        try:
            if getattr(self, "_compiled", (None, None))[0] != self.chat_template:  # compiled once, not per call
                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                self._compiled = (self.chat_template, env.from_string(self.chat_template))
            return self._compiled[1].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token="", eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise MimoError(f"chat template failed to render ({e})") from None


def _iter_texts(files, texts):
    yield from texts
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise MimoError(f"{f}: not found")
        if f.suffix == ".jsonl":
            for _, row in read_jsonl(f):
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    yield row["text"]
                elif isinstance(row, dict):
                    yield "\n".join(v for v in row.values() if isinstance(v, str))
                elif isinstance(row, str):
                    yield row
        else:
            try:
                yield f.read_text()
            except UnicodeDecodeError:
                raise MimoError(f"{f}: not UTF-8 text") from None


def add_arguments(p):
    """`mimo tokenizer` -> its actions (train)."""
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE with the chat special tokens on text/JSONL files")
    t.add_argument("files", nargs="+", metavar="FILE")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--min-frequency", type=int, default=2)
    t.add_argument("--out", required=True, metavar="DIR", help="writes DIR/tokenizer.json and tokenizer_config.json")


def run(args):
    """`mimo tokenizer train`."""
    tok = Tokenizer.train(args.files, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    print(f"wrote {out / 'tokenizer.json'} ({tok.vocab_size} tokens)", file=sys.stderr)
