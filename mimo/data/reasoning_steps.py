"""Step-by-step solutions for the reasoning-gym tasks that `mimo.data.reasoning` uses.

Each step generator takes a raw reasoning-gym entry (question, answer, metadata) and returns
``(steps, answer)``: a short, mechanical, plain-text derivation and the final answer computed from
those steps. The generators never copy ``entry["answer"]``; `mimo.data.reasoning` checks the answer
with the task's own verifier and drops the item if it fails. A generator raises `StepError` for
an item it cannot solve by its rules (for example a degenerate equation "0 = 0").

Some reasoning-gym questions carry long boilerplate instructions that would eat a tiny model's
context; `QUESTIONS` holds per-task functions that restate those questions in one short line
(the verifiers read only the entry's answer and metadata, never the question text).
"""

from __future__ import annotations

import re
from collections.abc import Callable


class StepError(ValueError):
    """The step generator cannot solve this item by its rules."""


# ---------------------------------------------------------------- shared helpers


def _place_parts(n: int) -> list[int]:
    """Split a non-negative integer into its non-zero place values: 305 -> [300, 5]; 0 -> [0]."""
    digits = str(n)
    parts = [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]
    return parts or [0]


def _euclid(a: int, b: int) -> tuple[list[str], int]:
    """Euclid's algorithm on positive integers as lines "a = q * b + r"; returns (lines, gcd)."""
    if a <= 0 or b <= 0:
        raise StepError(f"Euclid needs positive numbers, got {a} and {b}")
    a, b = max(a, b), min(a, b)
    lines = []
    while b:
        q, r = divmod(a, b)
        lines.append(f"{a} = {q} * {b} + {r}")
        a, b = b, r
    return lines, a


def _times_digit(a: int, d: int) -> str:
    """One line for a non-negative number times one digit: "47 * 8 = 40 * 8 + 7 * 8 = 320 + 56 = 376"."""
    parts = _place_parts(a)
    if len(parts) == 1 or d <= 1:
        return f"{a} * {d} = {a * d}"
    terms = " + ".join(f"{p} * {d}" for p in parts)
    products = " + ".join(str(p * d) for p in parts)
    return f"{a} * {d} = {terms} = {products} = {a * d}"


def _multiply(a: int, b: int) -> list[str]:
    """Long multiplication of two non-negative integers, one partial product per non-zero digit of b."""
    if a == 0 or b == 0 or (a < 10 and b < 10):
        return [f"{a} * {b} = {a * b}"]
    parts = _place_parts(b)
    lines, done = [], set()
    if len(parts) > 1:
        lines.append(f"{a} * {b} = " + " + ".join(f"{a} * {p}" for p in parts))
    for p in parts:
        digit, zeros = int(str(p)[0]), len(str(p)) - 1
        if digit not in done:  # 13 * 99: work out 13 * 9 once
            lines.append(_times_digit(a, digit))
            done.add(digit)
        if zeros:
            lines.append(f"{a} * {p} = {a * digit * 10**zeros}")
    if len(parts) > 1:
        lines.append(" + ".join(str(a * p) for p in parts) + f" = {a * b}")
    return lines


# ---------------------------------------------------------------- arithmetic


_TOKEN = re.compile(r"\d+|[-+*/()]")


def _tokens(expression: str) -> list[str]:
    """Tokens of an integer expression; a unary minus before a number is folded into the number."""
    raw = _TOKEN.findall(expression)
    if "".join(raw) != re.sub(r"\s+", "", expression):
        raise StepError(f"unexpected characters in {expression!r}")
    out: list[str] = []
    for tok in raw:
        unary_position = not out or out[-1] in "+-*/(" or out[-1] == "neg"
        if tok == "-" and unary_position:
            out.append("neg")
        elif tok.isdigit() and out and out[-1] == "neg":
            out[-1] = "-" + tok
        else:
            out.append(tok)
    return out


def _apply(a: int, op: str, b: int, lines: list[str]) -> int:
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        if b == 0 or a % b:
            raise StepError(f"inexact division {a} / {b}")
        value = a // b
    lines.append(f"{a} {op} {b} = {value}")
    return value


def _evaluate(tokens: list[str], pos: int, lines: list[str]) -> tuple[int, int]:
    """Evaluate tokens from pos up to a closing parenthesis or the end: parentheses first,
    then * and / left to right, then + and - left to right. Returns (value, next position)."""
    values: list[int] = []
    ops: list[str] = []
    expect_value = True
    while pos < len(tokens) and tokens[pos] != ")":
        tok = tokens[pos]
        if expect_value:
            negate = tok == "neg"
            if negate:
                pos += 1
                tok = tokens[pos] if pos < len(tokens) else ""
            if tok == "(":
                value, pos = _evaluate(tokens, pos + 1, lines)
                if pos >= len(tokens):
                    raise StepError("unbalanced parentheses")
                pos += 1  # the ")"
            elif re.fullmatch(r"-?\d+", tok):
                value, pos = int(tok), pos + 1
            else:
                raise StepError(f"expected a number, got {tok!r}")
            if negate:
                lines.append(f"-({value}) = {-value}")
                value = -value
            values.append(value)
        else:
            if tok not in "+-*/":
                raise StepError(f"expected an operator, got {tok!r}")
            ops.append(tok)
            pos += 1
        expect_value = not expect_value
    if expect_value:
        raise StepError("expression ends with an operator")
    # Multiplication and division first, then addition and subtraction, left to right.
    for group in ("*/", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] in group:
                values[i : i + 2] = [_apply(values[i], ops[i], values[i + 1], lines)]
                del ops[i]
            else:
                i += 1
    return values[0], pos


def steps_basic_arithmetic(entry: dict) -> tuple[str, str]:
    """Calculate ( 2 + -8 ) * 4.  ->  "2 + -8 = -6" / "-6 * 4 = -24" (parentheses, then * /, then + -)."""
    tokens = _tokens(entry["metadata"]["expression"])
    lines: list[str] = []
    value, pos = _evaluate(tokens, 0, lines)
    if pos != len(tokens):
        raise StepError("unbalanced parentheses")
    return "\n".join(lines or [str(value)]), str(value)


def steps_chain_sum(entry: dict) -> tuple[str, str]:
    """47 + 85 - 19  ->  add or subtract each number one place value at a time, left to right."""
    tokens = entry["metadata"]["expression"].split()
    if len(tokens) % 2 == 0:
        raise StepError("malformed chain")
    total = int(tokens[0])
    lines = []
    for op, num in zip(tokens[1::2], tokens[2::2]):
        b = int(num)
        if op not in "+-":
            raise StepError(f"unexpected operator {op!r}")
        if b < 0:  # "+ -85" is "- 85", "- -85" is "+ 85"
            flipped = "-" if op == "+" else "+"
            lines.append(f"{total} {op} {b} = {total} {flipped} {-b}")
            op, b = flipped, -b
        for part in _place_parts(b):
            new = total + part if op == "+" else total - part
            lines.append(f"{total} {op} {part} = {new}")
            total = new
    return "\n".join(lines or [str(total)]), str(total)


def steps_products(entry: dict) -> tuple[str, str]:
    """47 * 38  ->  "47 * 38 = 47 * 30 + 47 * 8", each partial product by place value, then the sum."""
    numbers = [int(t) for t in entry["metadata"]["expression"].split("*")]
    negative = sum(n < 0 for n in numbers) % 2 == 1
    lines = []
    if any(n < 0 for n in numbers):
        lines.append("multiply the sizes, then fix the sign")
    value = abs(numbers[0])
    for n in numbers[1:]:
        lines += _multiply(value, abs(n))
        value *= abs(n)
    if negative and value:
        value = -value
        lines.append(f"an odd number of negative factors, so the product is {value}")
    return "\n".join(lines or [str(value)]), str(value)


_TERM = re.compile(r"\s*([+-]?)\s*(\d*)\s*\*?\s*([a-z]?)\s*")


def _linear(side: str, var: str) -> tuple[int, int]:
    """Coefficient and constant of a linear sympy-printed expression like "56 - 98*e" -> (-98, 56)."""
    coef, const, pos = 0, 0, 0
    side = side.strip()
    while pos < len(side):
        m = _TERM.match(side, pos)
        if not m or m.end() == pos or (not m.group(2) and not m.group(3)):
            raise StepError(f"cannot parse {side!r}")
        sign = -1 if m.group(1) == "-" else 1
        if m.group(3):
            if m.group(3) != var:
                raise StepError(f"unexpected variable in {side!r}")
            coef += sign * (int(m.group(2)) if m.group(2) else 1)
        else:
            const += sign * int(m.group(2))
        pos = m.end()
    return coef, const


def steps_simple_equations(entry: dict) -> tuple[str, str]:
    """Solve for e: 56 - 98*e = -1218  ->  move the constant, then divide by the coefficient."""
    var = entry["metadata"]["variable"]
    left, right = entry["metadata"]["equation"].split("=")
    a, b = _linear(left, var)
    c_coef, c = _linear(right, var)
    if a == 0 or c_coef != 0:
        raise StepError(f"not of the form a*x + b = c: {entry['metadata']['equation']}")
    term = var if a == 1 else f"-{var}" if a == -1 else f"{a}*{var}"
    lines = [f"{left.strip()} = {right.strip()}"]
    rest = c - b
    if b > 0:
        lines.append(f"{term} = {c} - {b} = {rest}")
    elif b < 0:
        lines.append(f"{term} = {c} + {-b} = {rest}")
    if rest % a:
        raise StepError("the solution is not an integer")
    if a != 1:
        lines.append(f"{var} = {rest} / {a} = {rest // a}")
    return "\n".join(lines), str(rest // a)


# ---------------------------------------------------------------- number theory


def steps_gcd(entry: dict) -> tuple[str, str]:
    """GCD of 84, 36  ->  Euclid: "84 = 2 * 36 + 12" / "36 = 3 * 12 + 0" / "gcd(84, 36) = 12"."""
    numbers = entry["metadata"]["numbers"]
    g, lines = numbers[0], []
    for n in numbers[1:]:
        euclid, new = _euclid(g, n)
        lines += euclid + [f"gcd({g}, {n}) = {new}"]
        g = new
    return "\n".join(lines or [str(g)]), str(g)


def steps_lcm(entry: dict) -> tuple[str, str]:
    """LCM of 12, 18  ->  Euclid for the gcd, then "lcm(12, 18) = 12 / 6 * 18 = 2 * 18 = 36"."""
    numbers = entry["metadata"]["numbers"]
    m, lines = numbers[0], []
    for n in numbers[1:]:
        euclid, g = _euclid(m, n)
        new = m // g * n
        lines += euclid + [
            f"gcd({m}, {n}) = {g}",
            f"lcm({m}, {n}) = {m} / {g} * {n} = {m // g} * {n} = {new}",
        ]
        m = new
    return "\n".join(lines or [str(m)]), str(m)


def steps_prime_factorization(entry: dict) -> tuple[str, str]:
    """980  ->  trial division: "980 / 2 = 490" ... "7 is prime"; factors joined by " × "."""
    n = entry["metadata"]["number"]
    if n < 2:
        raise StepError(f"cannot factor {n}")
    factors, lines, d = [], [], 2
    while n > 1:
        if d * d > n:
            lines.append(f"{n} is prime")
            factors.append(n)
            break
        if n % d == 0:
            lines.append(f"{n} / {d} = {n // d}")
            factors.append(d)
            n //= d
        else:
            d += 1
    return "\n".join(lines), " × ".join(str(f) for f in factors)


def steps_fraction_simplification(entry: dict) -> tuple[str, str]:
    """84/96  ->  Euclid for gcd(96, 84) = 12, then "84 / 12 = 7", "96 / 12 = 8"; answer "7/8"."""
    num, den = entry["metadata"]["numerator"], entry["metadata"]["denominator"]
    lines, g = _euclid(den, num)
    lines += [f"gcd({num}, {den}) = {g}", f"{num} / {g} = {num // g}", f"{den} / {g} = {den // g}"]
    return "\n".join(lines), f"{num // g}/{den // g}"


# ---------------------------------------------------------------- bases, counting, sorting, spelling

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def steps_base_conversion(entry: dict) -> tuple[str, str]:
    """base-11 115 to base-15  ->  expand to decimal by place values, then divide repeatedly by 15."""
    meta = entry["metadata"]
    src, sb, tb = meta["source_repr"].lower(), meta["source_base"], meta["target_base"]
    if not src:  # reasoning-gym writes 0 as "" in most bases
        raise StepError("empty source number")
    lines = []
    if sb == 10:
        value = int(src)
    else:
        digits = [_DIGITS.index(ch) for ch in src]
        if any(d >= sb for d in digits):
            raise StepError(f"{src} is not a base-{sb} number")
        places = [sb ** (len(digits) - 1 - i) for i in range(len(digits))]
        value = sum(d * p for d, p in zip(digits, places))
        terms = " + ".join(f"{d}*{p}" for d, p in zip(digits, places))
        nonzero = [str(d * p) for d, p in zip(digits, places) if d]
        sums = f" = {' + '.join(nonzero)}" if len(nonzero) > 1 else ""
        lines.append(f"{src} in base {sb} = {terms}{sums} = {value}")
    if tb == 10:
        return "\n".join(lines or [f"{value} is already in base 10"]), str(value)
    out, n = [], value
    while True:
        q, r = divmod(n, tb)
        lines.append(f"{n} / {tb} = {q} r {r}" + (f" ({_DIGITS[r]})" if r >= 10 else ""))
        out.append(_DIGITS[r])
        n = q
        if n == 0:
            break
    answer = "".join(reversed(out))
    lines.append(f"remainders from last to first: {answer}")
    return "\n".join(lines), answer


def steps_letter_counting(entry: dict) -> tuple[str, str]:
    """Count "h" in "hundred thousand names"  ->  one line per word with a running total."""
    meta = entry["metadata"]
    letter, total, lines = meta["target_letter"].lower(), 0, []
    for word in meta["span"]:
        k = word.lower().count(letter)
        total += k
        lines.append(f"{word}: {k}, total {total}")
    return "\n".join(lines or ["0"]), str(total)


def _number_text(s: str) -> str:
    """Whole numbers without ".0" ("14.0" -> "14", "-0.0" -> "0"); other numbers unchanged."""
    s = s.removesuffix(".0")
    return "0" if s == "-0" else s


def steps_number_sorting(entry: dict) -> tuple[str, str]:
    """Sort 14, -49, 52 ascending  ->  selection sort: "smallest of 14, -49, 52 is -49" ..."""
    meta = entry["metadata"]
    ascending = meta["direction"] == "ascending"
    word = "smallest" if ascending else "largest"
    left = [_number_text(s) for s in meta["original_numbers"]]
    lines, out = [], []
    while len(left) > 1:
        pick = (min if ascending else max)(left, key=float)
        lines.append(f"{word} of {', '.join(left)} is {pick}")
        out.append(pick)
        left.remove(pick)
    out += left
    lines.append(f"last is {left[0]}" if left else "nothing to sort")
    return "\n".join(lines), "[" + ", ".join(out) + "]"


def steps_spell_backward(entry: dict) -> tuple[str, str]:
    """ammonia  ->  "spelled: a m m o n i a" / "backward: a i n o m m a"."""
    word = entry["metadata"]["word"]
    backward = word[::-1]
    return f"spelled: {' '.join(word)}\nbackward: {' '.join(backward)}", backward


STEPS: dict[str, Callable[[dict], tuple[str, str]]] = {
    "basic_arithmetic": steps_basic_arithmetic,
    "chain_sum": steps_chain_sum,
    "products": steps_products,
    "simple_equations": steps_simple_equations,
    "gcd": steps_gcd,
    "lcm": steps_lcm,
    "prime_factorization": steps_prime_factorization,
    "fraction_simplification": steps_fraction_simplification,
    "base_conversion": steps_base_conversion,
    "letter_counting": steps_letter_counting,
    "number_sorting": steps_number_sorting,
    "spell_backward": steps_spell_backward,
}


# ---------------------------------------------------------------- short questions


def question_base_conversion(entry: dict) -> str:
    """Drop the two-sentence preamble: "Convert the base-11 number 115 to base-15." (+ a digit note
    when the target base is above 10)."""
    meta = entry["metadata"]
    last = entry["question"].strip().splitlines()[-1]
    q = re.sub(r"^Now, convert", "Convert", last).rstrip(".") + "."
    if meta["target_base"] > 10:
        q += " Use lowercase letters a-z for digits above 9."
    return q


def question_number_sorting(entry: dict) -> str:
    """Drop the formatting instructions and write whole numbers without ".0":
    "Sort these numbers in ascending order: 14, -49, 52"."""
    meta = entry["metadata"]
    numbers = ", ".join(_number_text(s) for s in meta["original_numbers"])
    return f"Sort these numbers in {meta['direction']} order: {numbers}"


QUESTIONS: dict[str, Callable[[dict], str]] = {
    "base_conversion": question_base_conversion,
    "number_sorting": question_number_sorting,
}
