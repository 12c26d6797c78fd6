"""Config-time routing checks: which sensor ids each input can produce, and where they land.

Two problems cannot be seen in one message and used to show up only at run time:

* a model group holds one model width; if inputs with different widths (a 3-field vector input
  and scalar inputs) can put sensors into the same group, whichever arrives second is rejected
  with ``wrong_arity`` for ever;
* two inputs that can produce the same sensor id feed one model with two streams (readings of
  one refused as ``out_of_order`` against the other's, models learning a mix).

Both are decided on *patterns*: an input's ids are a sequence of tokens (literal characters,
"any text", "any text without /") built from its topic template and ``sensor_name``; group
``match`` globs (fnmatch: ``*``, ``?``, ``[...]``) become the same kind of token sequence.
Whether two patterns share a string and whether one pattern is inside a glob are decided on
these sequences exactly for intersection, and soundly (never claiming containment wrongly) for
containment, so a refusal may be conservative but a pass is never wrong.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from .sensor_names import SensorName

__all__ = ["Pattern", "check_routing", "glob_pattern", "input_patterns"]

# Character sets: (positive, chars). (False, frozenset()) is any character.
_ANY = (False, frozenset())
_NOT_SLASH = (False, frozenset("/"))
_MAX_SET = 4096  # a [a-z]-style range larger than this counts as "any character"


class _Tok(NamedTuple):
    cs: tuple      # character set
    many: bool     # True: zero or more characters of cs; False: exactly one


class Pattern(NamedTuple):
    tokens: tuple
    text: str      # for messages, e.g. "*/temperature"


def _lit(text: str) -> list:
    return [_Tok((True, frozenset(ch)), False) for ch in text]


def _some(cs) -> list:
    # One or more characters (captured topic levels and names are never empty).
    return [_Tok(cs, False), _Tok(cs, True)]


def glob_pattern(glob: str) -> Pattern:
    """fnmatch glob (as group ``match`` uses it) -> Pattern."""
    toks = []
    i, n = 0, len(glob)
    while i < n:
        ch = glob[i]
        i += 1
        if ch == "*":
            if not toks or toks[-1] != _Tok(_ANY, True):
                toks.append(_Tok(_ANY, True))
        elif ch == "?":
            toks.append(_Tok(_ANY, False))
        elif ch == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                toks.append(_Tok((True, frozenset("[")), False))  # fnmatch: a literal '['
                continue
            body = glob[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            chars, big = set(), False
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = ord(body[k]), ord(body[k + 2])
                    if hi - lo > _MAX_SET:
                        big = True
                    else:
                        chars.update(chr(c) for c in range(lo, hi + 1))
                    k += 3
                else:
                    chars.add(body[k])
                    k += 1
            if big:
                toks.append(_Tok(_ANY, False) if not negate else _Tok((False, frozenset(chars)), False))
            else:
                toks.append(_Tok((not negate, frozenset(chars)), False))
        else:
            toks.append(_Tok((True, frozenset(ch)), False))
    return Pattern(tuple(toks), glob)


def _meet(a, b) -> bool:
    """Whether two character sets share a character (the alphabet is unbounded)."""
    pa, ca = a
    pb, cb = b
    if pa and pb:
        return bool(ca & cb)
    if pa:
        return bool(ca - cb)
    if pb:
        return bool(cb - ca)
    return True


def _inside(a, b) -> bool:
    """Whether character set a is a subset of b."""
    pa, ca = a
    pb, cb = b
    if pb:
        return pa and ca <= cb
    return not (ca & cb) if pa else cb <= ca


def _search(a: tuple, b: tuple, moves) -> bool:
    """Whether both token sequences can be used up together: state (len a, len b) reachable
    from (0, 0), where `moves(ta, tb, i, j)` yields the next states (ta/tb None at the end)."""
    seen = set()
    stack = [(0, 0)]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j = state
        if i == len(a) and j == len(b):
            return True
        stack.extend(moves(a[i] if i < len(a) else None, b[j] if j < len(b) else None, i, j))
    return False


def _meet_moves(ta, tb, i, j):
    if ta is not None and ta.many:
        yield i + 1, j
    if tb is not None and tb.many:
        yield i, j + 1
    if ta is None or tb is None or (ta.many and tb.many):
        return  # consuming with both repeating makes no progress; the skips above cover it
    if _meet(ta.cs, tb.cs):
        yield (i if ta.many else i + 1), (j if tb.many else j + 1)


def _inside_moves(ta, tb, i, j):
    # A repeating glob token absorbs any run of pattern tokens inside its set; a single one
    # absorbs exactly one single pattern token.
    if tb is not None and tb.many:
        yield i, j + 1
        if ta is not None and _inside(ta.cs, tb.cs):
            yield i + 1, j
    elif ta is not None and tb is not None and not ta.many and _inside(ta.cs, tb.cs):
        yield i + 1, j + 1


def intersects(p: Pattern, q: Pattern) -> bool:
    """Whether some string matches both patterns (exact)."""
    return _search(p.tokens, q.tokens, _meet_moves)


def contained(p: Pattern, g: Pattern) -> bool:
    """Sound test that every string of p matches g (False when unsure)."""
    return _search(p.tokens, g.tokens, _inside_moves)


def input_patterns(inp) -> list:
    """[(Pattern, width)] of the sensor ids an input (config.InputConfig) can produce."""
    topic_levels = inp.topic.split("/")
    if inp.format == "batch":
        sensor = _some(_ANY)  # batch payloads name their sensors
    elif "{sensor+}" in topic_levels:
        sensor = _some(_ANY)
    else:
        sensor = _some(_NOT_SLASH)
    namer = SensorName(inp.sensor_template)
    per_field = inp.format == "influx" or bool(inp.fields)
    listed = [f for f in inp.fields if f != "*"] if per_field else []
    field_values = [(f, _lit(f)) for f in listed] if listed else [(None, _some(_ANY))]
    out = []
    for field, field_toks in field_values if per_field else [(None, [])]:
        toks, text = [], []
        for is_ph, part in namer.parts:
            if not is_ph:
                toks += _lit(part)
                text.append(part)
            elif part == "sensor":
                toks += sensor
                text.append("*")
            elif part == "field":
                toks += field_toks
                text.append(field if field is not None else "*")
            else:  # measurement, tag.NAME
                toks += _some(_ANY)
                text.append("*")
        out.append((Pattern(tuple(toks), "".join(text)), inp.width))
    return out


def check_routing(inputs, groups) -> list:
    """[(key path, reason)] for inputs whose ids may collide or mix widths in a group."""
    errors = []
    pats = [input_patterns(inp) for inp in inputs]
    # 1. Same sensor id from two inputs.
    colliding = set()
    for j in range(len(inputs)):
        for i in range(j):
            hit = _first_overlap(pats[i], pats[j])
            if hit is not None:
                errors.append((f"inputs[{j}]", (
                    f"can produce the same sensor ids as inputs[{i}] ({hit[0].text!r} and {hit[1].text!r}): "
                    f"one sensor would get two streams; name this input's sensors apart, e.g. "
                    f"sensor_name: \"{_suggest(inputs[j])}\"")))
                colliding.add(j)
                break
    # 2. One width per model group (first matching group wins).
    reach: dict = {}  # group index -> {width: (input index, pattern text)}
    for k, plist in enumerate(pats):
        for pat, width in plist:
            for gi, g in enumerate(groups):
                gp = glob_pattern(g.match)
                if not intersects(pat, gp):
                    continue
                reach.setdefault(gi, {}).setdefault(width, (k, pat.text))
                if contained(pat, gp):
                    break
    for gi, widths in sorted(reach.items()):
        if len(widths) < 2:
            continue
        (w1, (k1, t1)), (w2, (k2, t2)) = sorted(widths.items(), key=lambda kv: kv[1][0])[:2]
        if k2 in colliding:
            continue  # its collision is reported already; naming it apart comes first
        g = groups[gi]
        errors.append((f"inputs[{k2}]", (
            f"its sensors ({t2!r}, {w2} value(s) per reading) and those of inputs[{k1}] ({t1!r}, {w1} value(s)) "
            f"can land in group {g.name!r} (match {g.match!r}), but a group's model has one input width: "
            f"add a group whose match takes only one of them, e.g. {{name: width{w1}, match: {t1!r}}} "
            f"before {g.name!r}")))
    return errors


def _first_overlap(a, b) -> Optional[tuple]:
    for pa, _ in a:
        for pb, _ in b:
            if intersects(pa, pb):
                return pa, pb
    return None


def _suggest(inp) -> str:
    first = next((lvl for lvl in inp.topic.split("/") if lvl and "{" not in lvl), "input")
    return f"{first}/{inp.sensor_template}"
