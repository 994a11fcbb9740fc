"""Questions the user's chats answer, asked again of every fact their notes state the same way.

A user's chats often ask one kind of question about several people or things ("What is Lena's favourite food?"
-> "Lena loves ramen.", "What is Kofi's favourite food?" -> "Kofi loves sushi."), and their notes state the same
facts in words of their own ("Lena's favourite dish is ramen."). Tuned on both, a small model learns to answer
that question about the people the chats asked about, but about the people only the notes describe it answers
with one of the chats' values: it has never seen their facts said in the answers' words (docs/benchmarks.md,
"Personal models"). chat_pattern_conversations finds such questions and the note sentences that state their
answers, as patterns (DIPRE, Brin 1998: patterns induced from seed pairs, then applied to the rest of the text),
and writes the chat for every other fact a pattern matches:

1. Question groups: single-turn chats whose questions differ only in one span (the key, "Lena" / "Kofi"), at
   least MIN_SEEDS of them; the answers, the key written {K}, share a prefix and a suffix, and what differs between
   them is the value ({K} loves {V}.).
2. Note patterns: each note sentence that holds a chat's key and value, both written as slots ("{K}'s favourite
   dish is {V}."), kept where at least MIN_SEEDS chats of the group agree on it.
3. Every note sentence a kept pattern matches with a key the group has not asked about gives a new chat: the
   group's question and answer with that key and value.

Only words are matched (no model runs), so the result is exact where the notes are regular (lists, one fact a
sentence, the same phrasing from entry to entry) and empty where they are not."""

from __future__ import annotations

import os
import re
from collections import defaultdict

TOKEN = re.compile(r"\w+")
MIN_SEEDS = 2  # chats a question group and a note pattern need: one example cannot tell slots from fixed words
MAX_KEY_WORDS = 4  # the longest key a question group may vary in
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def key_templates(question: str) -> list[tuple[str, str]]:
    """(template with {K}, key) for every span of 1 to MAX_KEY_WORDS words of the question."""
    spans = [m.span() for m in TOKEN.finditer(question)]
    return [(question[: spans[i][0]] + "{K}" + question[spans[j][1]:], question[spans[i][0]: spans[j][1]])
            for i in range(len(spans)) for j in range(i, min(i + MAX_KEY_WORDS, len(spans)))]


def slot(text: str, value: str, name: str) -> str | None:
    """text with each whole-word occurrence of value written {name}; None if there is none."""
    out, n = re.subn(rf"(?<!\w){re.escape(value)}(?!\w)", "{" + name + "}", text)
    return out if n else None


def common_ends(texts: list[str]) -> tuple[int, int]:
    """Lengths of the prefix and the suffix all texts share (not overlapping), cut back to word boundaries."""
    pre = len(os.path.commonprefix(texts))
    while pre and any(pre < len(t) and t[pre - 1].isalnum() and t[pre].isalnum() for t in texts):
        pre -= 1
    suf = min(len(os.path.commonprefix([t[::-1] for t in texts])), min(len(t) for t in texts) - pre)
    while suf and any(len(t) - suf > 0 and t[len(t) - suf].isalnum() and t[len(t) - suf - 1].isalnum()
                      for t in texts):
        suf -= 1
    return pre, suf


def question_groups(chats: list[tuple[str, str]]) -> list[dict]:
    """Groups of single-turn chats asking one question about different keys: {"question": "...{K}...",
    "answer": "...{K}...{V}...", "seeds": {key: value}}."""
    buckets: dict[str, dict[str, str]] = defaultdict(dict)  # question template -> key -> answer
    for question, answer in chats:
        for template, key in key_templates(question):
            buckets[template].setdefault(key, answer)
    groups = []
    for template, answers in buckets.items():
        slotted = {k: a for k, a in ((k, slot(a, k, "K")) for k, a in answers.items()) if a is not None}
        if len(slotted) < MIN_SEEDS:
            continue
        texts = list(slotted.values())
        pre, suf = common_ends(texts)
        values = {k: a[pre: len(a) - suf] for k, a in slotted.items()}
        if any(not v.strip() or "{K}" in v for v in values.values()):
            continue
        first = texts[0]
        groups.append({"question": template, "answer": first[:pre] + "{V}" + first[len(first) - suf:],
                       "seeds": values})
    return groups


def pattern_regex(template: str) -> re.Pattern:
    """A note template ("{K}'s favourite dish is {V}.") as a regex capturing K and V (a repeated {K}: the same)."""
    out, named = [], set()
    for piece in re.split(r"(\{[KV]\})", template):
        if piece in ("{K}", "{V}"):
            name = piece[1]
            out.append(f"(?P={name})" if name in named else f"(?P<{name}>.+?)")
            named.add(name)
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out))


def note_patterns(group: dict, sentences: list[str]) -> list[re.Pattern]:
    """The note sentences' templates with {K} and {V} that at least MIN_SEEDS of the group's seeds agree on."""
    support: dict[str, set] = defaultdict(set)
    for key, value in group["seeds"].items():
        for s in sentences:
            t = slot(s, value, "V")
            t = t and slot(t, key, "K")
            if t and t.count("{V}") == 1 and "{K}" in t:
                support[t].add(key)
    return [pattern_regex(t) for t, keys in support.items() if len(keys) >= MIN_SEEDS]


def note_sentences(documents: list[str]) -> list[str]:
    """The documents' sentences (headings dropped), each stripped."""
    out = []
    for doc in documents:
        for line in doc.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out += [s.strip() for s in SENTENCE.split(line.strip()) if s.strip()]
    return out


def chat_pattern_conversations(documents: list[str], conversations: list[list[dict]]) -> list[list[dict]]:
    """New single-turn chats: each question group's question and answer for every note sentence that one of its
    patterns matches, about a key the group's chats did not ask about (one chat a key and group)."""
    pairs = [(c[0]["content"], c[1]["content"]) for c in conversations
             if len(c) == 2 and c[0]["role"] == "user" and c[1]["role"] == "assistant"]
    sentences = note_sentences(documents)
    out, asked = [], {q for q, _ in pairs}
    for group in question_groups(pairs):
        done = set(group["seeds"])
        for pattern in note_patterns(group, sentences):
            for s in sentences:
                m = pattern.fullmatch(s)
                if m is None or m["K"] in done:
                    continue
                done.add(m["K"])
                question = group["question"].replace("{K}", m["K"])
                if question in asked:  # another group's template of the same question
                    continue
                asked.add(question)
                out.append([{"role": "user", "content": question},
                            {"role": "assistant",
                             "content": group["answer"].replace("{K}", m["K"]).replace("{V}", m["V"])}])
    return out
