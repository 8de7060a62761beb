"""Multi-step arithmetic word problems: a seeded generator, a solution parser and a step checker.

The problems follow the few-shot chain-of-thought example of the survey ("A car drives 50 miles
per hour for 3 hours. How far did it travel?"): a short story in which every sentence adds one
arithmetic step, ending with one question. Four templates (`TEMPLATES`):

    rates     rates and times: distances from speed x hours, legs, the miles still to go
    shopping  buying and giving away: bags of items, gifts to friends, what the items are worth
    sharing   sharing equally: items shared among friends, what each one then gets or uses
    totals    running totals: money saved and spent month by month

The difficulty of a problem is its number of steps (1 to 8). Every operand and every result is
an integer in [1, 999] (`MAX_NUMBER`), every division is exact, and every operand of a step is a
number written in the question or the result of an earlier step.

A problem is one JSON row (the format everything else reads; `load_problems` also takes
GSM8K-style rows, scored on their final answer):

    {"question": "...", "answer": 150, "steps": ["Step 1: 50 × 3 = 150"], "difficulty": 1,
     "template": "rates"}

and its canonical solution (`solution_text`) is one line per step, then the answer:

    Step 1: 50 × 3 = 150
    Answer: 150

`parse_solution` reads such text back (whitespace is free; `x`, `X`, `*` and `×` multiply, `/` and
`÷` divide, `-`, `−` and `–` subtract; text between "Step k:" and the equation is allowed, so the
survey's "Step 3: Multiply speed by time: 50 × 3 = 150 miles." parses too), and `check_solution`
grades every step (is the arithmetic right? are its operands in the question or earlier results?)
and the final answer (`extract_answer`).
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from .errors import InvalidArgument

MIN_STEPS, MAX_STEPS = 1, 8
MAX_NUMBER = 999  # every operand and result of a generated problem is in [1, MAX_NUMBER]
OPERATORS = ("+", "-", "×", "÷")  # the canonical spelling
_OPERATOR_SPELLINGS = {"+": "+", "-": "-", "−": "-", "–": "-", "x": "×", "X": "×", "*": "×", "×": "×",
                       "/": "÷", "÷": "÷"}

# ------------------------------------------------------------------------------------ numbers
# An integer (1,234 with thousands commas allowed) or a decimal, not glued to a digit, comma or
# point before it; a minus directly before the digits makes it negative (so "5-3" reads 5 and 3).
_NUMBER = r"(?<![\d.,])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d]|[.,]\d)"
_NUMBER_RE = re.compile(_NUMBER)
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"


def _to_number(text: str) -> int | float:
    """'1,234' -> 1234, '-3' -> -3, '2.50' -> 2.5, '4.0' -> 4."""
    value = Fraction(text.replace(",", ""))
    return int(value) if value.denominator == 1 else float(value)


def numbers_in(text: str) -> list[int | float]:
    """The numbers written with digits in `text`, in order ('$1,200' -> 1200; words such as
    'three' or 'half' are not numbers here)."""
    return [_to_number(m.group()) for m in _NUMBER_RE.finditer(text)]


# ------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class Step:
    a: int
    op: str  # one of OPERATORS
    b: int
    result: int

    def text(self, k: int) -> str:
        return f"Step {k}: {self.a} {self.op} {self.b} = {self.result}"


def _apply(a, op: str, b):
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "×":
        return a * b
    return Fraction(a) / b if b != 0 else None


class _Retry(Exception):
    """The numbers drawn cannot make this move (a bound or a divisor is missing)."""


@dataclass
class _Story:
    """A problem being written: its sentences, its steps, and what the running value means."""

    rng: random.Random
    template: str
    name: str
    he: str
    his: str
    sentences: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    value: int = 0
    kind: str | None = None  # what `value` counts (None before the first sentence)
    question: str = ""  # asked after the last sentence; set by every move
    used: set[str] = field(default_factory=set)  # moves that happen once per story
    extra: dict = field(default_factory=dict)  # template-specific: the vehicle, the items, the month...

    # numbers
    def randint(self, lo: int, hi: int) -> int:
        if lo > hi:
            raise _Retry
        return self.rng.randint(lo, hi)

    def divisor(self, value: int, lo: int = 2, hi: int = 9, min_quotient: int = 2,
                max_quotient: int = MAX_NUMBER) -> int:
        """A divisor of `value` in [lo, hi] leaving a quotient in [min_quotient, max_quotient]."""
        choices = [k for k in range(lo, hi + 1) if value % k == 0 and min_quotient <= value // k <= max_quotient]
        if not choices:
            raise _Retry
        return self.rng.choice(choices)

    def step(self, a: int, op: str, b: int) -> int:
        c = _apply(a, op, b)
        if c is None or c != int(c) or not 1 <= c <= MAX_NUMBER or not (1 <= a <= MAX_NUMBER and 1 <= b <= MAX_NUMBER):
            raise _Retry
        c = int(c)
        self.steps.append(Step(a, op, b, c))
        return c

    def say(self, sentence: str) -> None:
        self.sentences.append(sentence[0].upper() + sentence[1:])

    @property
    def He(self) -> str:  # noqa: N802 - the capitalised pronoun
        return self.he.capitalize()


@dataclass(frozen=True)
class _Move:
    """One sentence of a story: `apply` draws its numbers, adds its steps and sentence, sets the
    new value, kind and question (or raises _Retry, leaving a copy to be thrown away)."""

    name: str
    kinds: tuple  # the kinds of value it continues (None: it opens the story)
    steps: int
    apply: Callable[[_Story], None]
    weight: float = 1.0
    final: bool = False  # ends the story: only taken as its last sentence
    once: bool = False


_NAMES = (("Ana", "she", "her"), ("Ben", "he", "his"), ("Maya", "she", "her"), ("Sam", "he", "his"),
          ("Lena", "she", "her"), ("Omar", "he", "his"), ("Priya", "she", "her"), ("Tom", "he", "his"),
          ("Zoe", "she", "her"), ("Leo", "he", "his"), ("Nora", "she", "her"), ("Eli", "he", "his"))
_THEN = ("Then", "After that", "Later", "Next")


def _then(s: _Story) -> str:
    """A connective, not the one used just before."""
    last = s.extra.get("then")
    word = s.rng.choice([w for w in _THEN if w != last])
    s.extra["then"] = word
    return word


def _other_name(s: _Story) -> str:
    return s.rng.choice([n for n, _, _ in _NAMES if n != s.name])


# --- rates and times: a vehicle's distance, then the miles still to go
_VEHICLES = (("car", "drives", 20, 70), ("truck", "drives", 20, 60), ("train", "travels", 30, 90),
             ("bus", "drives", 20, 50), ("cyclist", "rides", 6, 20), ("boat", "sails", 5, 30))


def _rates_setup(s: _Story) -> None:
    s.extra["vehicle"] = s.rng.choice(_VEHICLES)


def _leg(s: _Story) -> tuple[int, int]:
    _, _, lo, hi = s.extra["vehicle"]
    r, t = s.randint(lo, hi), s.randint(2, 9)
    return r, t


def _rates_open(s: _Story) -> None:
    vehicle, verb, _, _ = s.extra["vehicle"]
    r, t = _leg(s)
    s.value = s.step(r, "×", t)
    s.say(f"A {vehicle} {verb} {r} miles per hour for {t} hours.")
    s.kind = "distance"


def _rates_question(s: _Story) -> None:
    vehicle = s.extra["vehicle"][0]
    if s.kind == "distance":
        s.question = f"How many miles does the {vehicle} travel in all?"
    else:
        s.question = f"How many miles does the {vehicle} still have to go?"


def _rates_more_leg(s: _Story) -> None:
    verb = s.extra["vehicle"][1]
    r, t = _leg(s)
    x = s.step(r, "×", t)
    if s.kind == "distance":
        s.value = s.step(s.value, "+", x)
        s.say(f"{_then(s)} it {verb} {r} miles per hour for {t} more hours.")
    else:
        s.value = s.step(s.value, "-", x)
        s.say(f"{_then(s)} it {verb} {r} miles per hour for {t} hours.")


def _rates_more_miles(s: _Story) -> None:
    verb = s.extra["vehicle"][1]
    if s.kind == "distance":
        n = s.randint(5, min(99, MAX_NUMBER - s.value))
        s.value = s.step(s.value, "+", n)
        s.say(f"{_pause(s)}, it {verb} another {n} miles.")
    else:
        n = s.randint(2, min(99, s.value - 1))
        s.value = s.step(s.value, "-", n)
        s.say(f"{_pause(s)}, it {verb} {n} more miles.")


def _pause(s: _Story) -> str:
    return s.rng.choice(("After a short stop", "After lunch", "Before dark", "On the next day"))


def _rates_repeat(s: _Story) -> None:
    n = s.randint(2, min(4, MAX_NUMBER // s.value))
    s.value = s.step(s.value, "×", n)
    s.say(f"It makes this whole trip {n} times that week.")


def _rates_route(s: _Story) -> None:
    total = s.randint(s.value + 10, min(MAX_NUMBER, s.value + 300))
    s.value = s.step(total, "-", s.value)
    s.say(f"It aims to travel {total} miles in all.")
    s.kind = "to go"


def _rates_speed(s: _Story) -> None:
    vehicle = s.extra["vehicle"][0]
    other = s.rng.choice([v for v, *_ in _VEHICLES if v != vehicle])
    h = s.divisor(s.value, max_quotient=150)  # a believable speed
    s.value = s.step(s.value, "÷", h)
    s.say(f"A {other} covers the same total distance in {h} hours.")
    s.question = f"How many miles per hour does the {other} go?"


def _rates_days(s: _Story) -> None:
    k = s.divisor(s.value)
    s.value = s.step(s.value, "÷", k)
    s.say(f"It covers the rest in {k} days, going the same distance each day.")
    s.question = "How many miles does it go each day?"


# --- buying and giving away: the items someone has
_ITEMS = (("apple", "apples"), ("pencil", "pencils"), ("sticker", "stickers"), ("marble", "marbles"),
          ("cookie", "cookies"), ("card", "cards"), ("balloon", "balloons"), ("book", "books"))


def _items_setup(s: _Story) -> None:
    s.extra["item"], s.extra["items"] = s.rng.choice(_ITEMS)


def _shopping_question(s: _Story) -> None:
    s.question = f"How many {s.extra['items']} does {s.name} have now?"


def _shopping_open_bags(s: _Story) -> None:
    p, k = s.randint(2, 9), s.randint(2, 12)
    s.value = s.step(p, "×", k)
    s.say(f"{s.name} buys {p} bags of {s.extra['items']} with {k} {s.extra['items']} in each bag.")
    s.kind = "items"


def _shopping_open_has(s: _Story) -> None:
    a, b = s.randint(5, 60), s.randint(2, 40)
    s.value = s.step(a, "+", b)
    s.say(f"{s.name} has {a} {s.extra['items']} and buys {b} more.")
    s.kind = "items"


def _shopping_buy(s: _Story) -> None:
    n = s.randint(2, min(50, MAX_NUMBER - s.value))
    s.value = s.step(s.value, "+", n)
    s.say(f"{_then(s)}, {s.he} buys {n} more {s.extra['items']}.")


def _shopping_buy_bags(s: _Story) -> None:
    p, k = s.randint(2, 6), s.randint(2, 12)
    x = s.step(p, "×", k)
    s.value = s.step(s.value, "+", x)
    s.say(f"{_then(s)}, {s.he} buys {p} more bags with {k} {s.extra['items']} in each.")


def _shopping_spend(s: _Story) -> None:
    c = s.randint(2, 9)
    q = s.randint(2, min(20, MAX_NUMBER - s.value))
    x = s.step(q * c, "÷", c)
    s.value = s.step(s.value, "+", x)
    s.say(f"{_then(s)}, {s.he} spends {q * c} dollars on more {s.extra['items']} that cost {c} dollars each.")


def _shopping_give(s: _Story) -> None:
    n = s.randint(2, min(30, s.value - 1))
    s.value = s.step(s.value, "-", n)
    s.say(f"{_then(s)}, {s.he} gives {n} {s.extra['items']} to {_other_name(s)}.")


def _shopping_give_each(s: _Story) -> None:
    f = s.randint(2, 6)
    k = s.randint(2, min(10, (s.value - 1) // f))
    x = s.step(f, "×", k)
    s.value = s.step(s.value, "-", x)
    s.say(f"{_then(s)}, {s.he} gives {k} {s.extra['items']} to each of {f} friends.")


def _shopping_lose(s: _Story) -> None:
    n = s.randint(1, min(15, s.value - 1))
    s.value = s.step(s.value, "-", n)
    s.say(f"On the way home, {s.he} loses {n} of them.")


def _shopping_worth(s: _Story) -> None:
    c = s.randint(2, min(9, MAX_NUMBER // s.value))
    s.value = s.step(s.value, "×", c)
    s.say(f"Each {s.extra['item']} is worth {c} dollars.")
    s.question = f"How many dollars are {s.name}'s {s.extra['items']} worth in all?"


def _shopping_boxes(s: _Story) -> None:
    k = s.divisor(s.value)
    s.value = s.step(s.value, "÷", k)
    s.say(f"{s.He} packs all the {s.extra['items']} into {k} boxes, with the same number in each box.")
    s.question = f"How many {s.extra['items']} are in each box?"


# --- sharing equally: what each person of a group gets
_SHARED = (("cookies", "eats"), ("apples", "eats"), ("stickers", "uses"), ("marbles", "loses"),
           ("pencils", "gives away"), ("cards", "trades away"), ("grapes", "eats"), ("beads", "uses"))
_GROUPS = (("friend", "friends"), ("child", "children"), ("student", "students"), ("cousin", "cousins"))


def _sharing_setup(s: _Story) -> None:
    s.extra["items"], s.extra["verb"] = s.rng.choice(_SHARED)
    s.extra["group"] = s.rng.choice(_GROUPS)


def _sharing_question(s: _Story) -> None:
    one, many = s.extra["group"]
    if s.kind == "each":
        s.question = f"How many {s.extra['items']} does each {one} have now?"
    else:
        s.question = f"How many {s.extra['items']} do the {many} have together?"


def _share(s: _Story, total: int) -> int:
    k = s.divisor(total, 2, 9, min_quotient=3)
    return k, s.step(total, "÷", k)


def _sharing_open(s: _Story) -> None:
    many = s.extra["group"][1]
    k = s.randint(2, 9)
    total = k * s.randint(3, min(40, MAX_NUMBER // k))
    s.value = s.step(total, "÷", k)
    s.say(f"{s.name} has {total} {s.extra['items']} and shares them equally among {k} {many}.")
    s.kind, s.extra["size"] = "each", k


def _sharing_open_trays(s: _Story) -> None:
    many = s.extra["group"][1]
    t, n = s.randint(2, 9), s.randint(4, 24)
    total = s.step(t, "×", n)
    k, s.value = _share(s, total)
    s.say(f"{s.name} has {t} boxes of {s.extra['items']} with {n} in each box and shares them equally "
          f"among {k} {many}.")
    s.kind, s.extra["size"] = "each", k


def _sharing_each_more(s: _Story) -> None:
    one = s.extra["group"][0]
    n = s.randint(2, min(20, MAX_NUMBER - s.value))
    s.value = s.step(s.value, "+", n)
    s.say(f"{_then(s)}, {_other_name(s)} gives each {one} {n} more {s.extra['items']}.")


def _sharing_each_less(s: _Story) -> None:
    one = s.extra["group"][0]
    n = s.randint(1, min(20, s.value - 1))
    s.value = s.step(s.value, "-", n)
    s.say(f"{_then(s)}, each {one} {s.extra['verb']} {n} of them.")


def _sharing_together(s: _Story) -> None:
    many, k = s.extra["group"][1], s.extra["size"]
    s.value = s.step(s.value, "×", k)
    s.say(f"The {k} {many} put all their {s.extra['items']} together.")
    s.kind = "together"


def _sharing_total_more(s: _Story) -> None:
    n = s.randint(2, min(60, MAX_NUMBER - s.value))
    s.value = s.step(s.value, "+", n)
    s.say(f"{_other_name(s)} adds {n} more {s.extra['items']} to the pile.")


def _sharing_total_less(s: _Story) -> None:
    n = s.randint(1, min(40, s.value - 1))
    s.value = s.step(s.value, "-", n)
    s.say(f"They set {n} of the {s.extra['items']} aside for later.")


def _sharing_reshare(s: _Story) -> None:
    new = s.rng.choice([g for g in _GROUPS if g != s.extra["group"]])
    k, s.value = _share(s, s.value)
    s.say(f"Then they share the pile equally among {k} {new[1]}.")
    s.kind, s.extra["group"], s.extra["size"] = "each", new, k


def _sharing_bags(s: _Story) -> None:
    one = s.extra["group"][0]
    j = s.divisor(s.value)
    s.value = s.step(s.value, "÷", j)
    s.say(f"Each {one} splits their {s.extra['items']} equally into {j} bags.")
    s.question = f"How many {s.extra['items']} are in each bag?"


# --- running totals: money saved and spent, month after month
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_THINGS = (("book", "books"), ("ticket", "tickets"), ("toy", "toys"), ("plant", "plants"), ("game", "games"))


def _totals_setup(s: _Story) -> None:
    s.extra["month"] = s.rng.randint(0, 2)


def _month(s: _Story) -> str:
    """The next month of the story (the first sentence takes one or two)."""
    m = _MONTHS[s.extra["month"] % 12]
    s.extra["month"] += 1
    return m


def _totals_question(s: _Story) -> None:
    s.question = f"How many dollars does {s.name} have at the end of {_MONTHS[(s.extra['month'] - 1) % 12]}?"


def _totals_open_two(s: _Story) -> None:
    a, b = s.randint(5, 90), s.randint(5, 90)
    s.value = s.step(a, "+", b)
    s.say(f"{s.name} saves {a} dollars in {_month(s)} and {b} dollars in {_month(s)}.")
    s.kind = "money"


def _totals_open_weeks(s: _Story) -> None:
    a, w = s.randint(3, 25), s.randint(2, 4)
    s.value = s.step(a, "×", w)
    s.say(f"{s.name} saves {a} dollars a week for {w} weeks in {_month(s)}.")
    s.kind = "money"


def _totals_save(s: _Story) -> None:
    n = s.randint(5, min(90, MAX_NUMBER - s.value))
    s.value = s.step(s.value, "+", n)
    s.say(f"In {_month(s)}, {s.he} {s.rng.choice(('saves', 'earns', 'is given'))} {n} dollars.")


def _totals_spend(s: _Story) -> None:
    thing = s.rng.choice(_THINGS)[0]
    n = s.randint(2, min(60, s.value - 1))
    s.value = s.step(s.value, "-", n)
    s.say(f"In {_month(s)}, {s.he} spends {n} dollars on a {thing}.")


def _totals_weeks(s: _Story) -> None:
    a, w = s.randint(2, 25), s.randint(2, 4)
    x = s.step(a, "×", w)
    s.value = s.step(s.value, "+", x)
    s.say(f"In {_month(s)}, {s.he} saves {a} dollars a week for {w} weeks.")


def _totals_buy(s: _Story) -> None:
    things = s.rng.choice(_THINGS)[1]
    q = s.randint(2, 5)
    c = s.randint(2, min(20, (s.value - 1) // q))
    x = s.step(q, "×", c)
    s.value = s.step(s.value, "-", x)
    s.say(f"In {_month(s)}, {s.he} buys {q} {things} that cost {c} dollars each.")


def _totals_prize(s: _Story) -> None:
    k = s.randint(2, 6)
    share = s.randint(3, min(40, MAX_NUMBER - s.value, MAX_NUMBER // k))
    prize = k * share
    x = s.step(prize, "÷", k)
    s.value = s.step(s.value, "+", x)
    s.say(f"In {_month(s)}, {s.his} team of {k} wins a {prize} dollar prize and splits it equally.")


def _totals_envelopes(s: _Story) -> None:
    k = s.divisor(s.value)
    month = _MONTHS[(s.extra["month"] - 1) % 12]
    s.value = s.step(s.value, "÷", k)
    s.say(f"At the end of {month}, {s.he} puts all of it into {k} envelopes, with the same amount in each.")
    s.question = "How many dollars are in each envelope?"


@dataclass(frozen=True)
class _Template:
    name: str
    description: str
    setup: Callable[[_Story], None]
    question: Callable[[_Story], None]  # the question for the value's kind (a final move sets its own)
    moves: tuple[_Move, ...]


TEMPLATES: dict[str, _Template] = {t.name: t for t in (
    _Template("rates", "rates and times: speed x hours, more legs, the miles still to go", _rates_setup,
              _rates_question, (
                  _Move("drive", (None,), 1, _rates_open),
                  _Move("leg", ("distance", "to go"), 2, _rates_more_leg, 2.0),
                  _Move("miles", ("distance", "to go"), 1, _rates_more_miles, 1.5),
                  _Move("repeat", ("distance",), 1, _rates_repeat, 0.7, once=True),
                  _Move("route", ("distance",), 1, _rates_route, 1.0, once=True),
                  _Move("speed", ("distance",), 1, _rates_speed, 2.0, final=True),
                  _Move("days", ("to go",), 1, _rates_days, 2.0, final=True))),
    _Template("shopping", "buying and giving away: bags of items, gifts, what they are worth", _items_setup,
              _shopping_question, (
                  _Move("bags", (None,), 1, _shopping_open_bags),
                  _Move("has", (None,), 1, _shopping_open_has),
                  _Move("buy", ("items",), 1, _shopping_buy),
                  _Move("buy bags", ("items",), 2, _shopping_buy_bags),
                  _Move("spend", ("items",), 2, _shopping_spend),
                  _Move("give", ("items",), 1, _shopping_give, 1.5),
                  _Move("give each", ("items",), 2, _shopping_give_each, 1.5),
                  _Move("lose", ("items",), 1, _shopping_lose, 0.7, once=True),
                  _Move("worth", ("items",), 1, _shopping_worth, 1.5, final=True),
                  _Move("boxes", ("items",), 1, _shopping_boxes, 1.5, final=True))),
    _Template("sharing", "sharing equally: a pile shared among a group, what each one then has", _sharing_setup,
              _sharing_question, (
                  _Move("share", (None,), 1, _sharing_open),
                  _Move("trays", (None,), 2, _sharing_open_trays),
                  _Move("each more", ("each",), 1, _sharing_each_more),
                  _Move("each less", ("each",), 1, _sharing_each_less),
                  _Move("together", ("each",), 1, _sharing_together, 1.5),
                  _Move("add", ("together",), 1, _sharing_total_more),
                  _Move("set aside", ("together",), 1, _sharing_total_less),
                  _Move("reshare", ("together",), 1, _sharing_reshare, 2.0),
                  _Move("bags", ("each",), 1, _sharing_bags, 1.0, final=True))),
    _Template("totals", "running totals: money saved and spent month by month", _totals_setup,
              _totals_question, (
                  _Move("two months", (None,), 1, _totals_open_two),
                  _Move("weekly", (None,), 1, _totals_open_weeks),
                  _Move("save", ("money",), 1, _totals_save),
                  _Move("spend", ("money",), 1, _totals_spend),
                  _Move("weeks", ("money",), 2, _totals_weeks),
                  _Move("buy", ("money",), 2, _totals_buy),
                  _Move("prize", ("money",), 2, _totals_prize),
                  _Move("envelopes", ("money",), 1, _totals_envelopes, 1.0, final=True))),
)}


def _copy(s: _Story) -> _Story:
    return _Story(s.rng, s.template, s.name, s.he, s.his, list(s.sentences), list(s.steps), s.value, s.kind,
                  s.question, set(s.used), dict(s.extra))


def _weighted_order(rng: random.Random, moves: list[_Move]) -> list[_Move]:
    moves, order = list(moves), []
    while moves:
        pick = rng.choices(range(len(moves)), weights=[m.weight for m in moves])[0]
        order.append(moves.pop(pick))
    return order


def _write(rng: random.Random, template: _Template, steps: int) -> _Story | None:
    """One story of exactly `steps` steps, or None when the draws led to a dead end."""
    name, he, his = rng.choice(_NAMES)
    s = _Story(rng, template.name, name, he, his)
    template.setup(s)
    while len(s.steps) < steps:
        left = steps - len(s.steps)
        moves = [m for m in template.moves if s.kind in m.kinds and m.steps <= left
                 and (not m.final or m.steps == left) and not (m.once and m.name in s.used)]
        for move in _weighted_order(rng, moves):
            attempt = _copy(s)
            try:
                move.apply(attempt)
            except _Retry:
                continue
            attempt.used.add(move.name)
            if not move.final:
                template.question(attempt)
            s = attempt
            break
        else:
            return None
    return s


def generate_problem(rng: random.Random, steps: int, template: str) -> dict:
    """One problem of `steps` steps from the named template, drawn with `rng`."""
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidArgument(f"a problem has {MIN_STEPS} to {MAX_STEPS} steps, not {steps}")
    if template not in TEMPLATES:
        raise InvalidArgument(f"unknown problem template {template!r} (one of {', '.join(TEMPLATES)})")
    for _ in range(1000):
        s = _write(rng, TEMPLATES[template], steps)
        if s is not None:
            return {"question": " ".join((*s.sentences, s.question)), "answer": s.steps[-1].result,
                    "steps": [step.text(k) for k, step in enumerate(s.steps, 1)], "difficulty": steps,
                    "template": template}
    raise RuntimeError(f"no {steps}-step {template} problem after 1000 draws")  # a bug in the templates


def parse_steps_range(text: str | int) -> tuple[int, int]:
    """'3' -> (3, 3); '1-8' -> (1, 8); each end in [1, 8]."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if match is None:
        raise InvalidArgument(f"--steps takes a number or a range such as 1-8, got {text!r}")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) is not None else lo
    if not (MIN_STEPS <= lo <= MAX_STEPS and MIN_STEPS <= hi <= MAX_STEPS):
        raise InvalidArgument(f"--steps must be within {MIN_STEPS}..{MAX_STEPS}, got {text}")
    if lo > hi:
        raise InvalidArgument(f"--steps range {text} is reversed (write {hi}-{lo})")
    return lo, hi


def generate_problems(n: int, steps: str | int | tuple[int, int] = (1, 8), seed: int = 0,
                      templates: Sequence[str] | None = None) -> list[dict]:
    """`n` distinct problems. Difficulties cycle through the `steps` range (so they are spread
    evenly), templates cycle within each round of difficulties, so the first span x templates rows
    hold every pair. Row i is drawn from random.Random(f"{seed}:{i}"): the same seed gives the
    same rows, and a larger `n` only appends rows."""
    if n < 1:
        raise InvalidArgument(f"--n must be at least 1, got {n}")
    lo, hi = steps if isinstance(steps, tuple) else parse_steps_range(steps)
    if not (MIN_STEPS <= lo <= hi <= MAX_STEPS):
        raise InvalidArgument(f"steps must be within {MIN_STEPS}..{MAX_STEPS}, got {lo}-{hi}")
    names = list(templates) if templates else list(TEMPLATES)
    for name in names:
        if name not in TEMPLATES:
            raise InvalidArgument(f"unknown problem template {name!r} (one of {', '.join(TEMPLATES)})")
    span = hi - lo + 1
    rows, seen = [], set()
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        difficulty, template = lo + i % span, names[(i // span) % len(names)]
        for _ in range(100):  # a question already written is drawn again
            row = generate_problem(rng, difficulty, template)
            if row["question"] not in seen:
                break
        seen.add(row["question"])
        rows.append(row)
    return rows


def first_per_difficulty(rows: Iterable[dict], k: int) -> list[dict]:
    """The first k rows of each difficulty, in their order (an evenly spread evaluation subset)."""
    seen: dict = {}
    out = []
    for row in rows:
        seen[row.get("difficulty")] = seen.get(row.get("difficulty"), 0) + 1
        if seen[row.get("difficulty")] <= k:
            out.append(row)
    return out


def solution_text(row: dict) -> str:
    """The canonical solution: the row's steps, one a line, then `Answer: N`."""
    return "\n".join([*row.get("steps", []), f"Answer: {row['answer']}"])


def write_problems(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows as JSON lines (UTF-8, × and ÷ as they are), atomically; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


# ---------------------------------------------------------------------------------- reading
_GSM8K_FINAL = re.compile(r"####\s*(" + _NUMBER + r")")


def _answer_value(value, where: str):
    """A row's answer: a number, a number string ('1,234'), or GSM8K text ending in '#### N'."""
    if isinstance(value, bool):
        raise InvalidArgument(f"{where}: 'answer' must be a number or text ending in '#### N', got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, str):
        found = _GSM8K_FINAL.findall(value)
        if found:
            return _to_number(found[-1])
        if re.fullmatch(r"\s*\$?\s*" + _NUMBER + r"\s*", value):
            return _to_number(_NUMBER_RE.search(value).group())
    raise InvalidArgument(f"{where}: 'answer' must be a number or text ending in '#### N', got {str(value)[:60]!r}")


def load_problems(path: str | os.PathLike) -> list[dict]:
    """Problems from a JSONL file: rows of our format ({"question", "answer", "steps",
    "difficulty"}) or GSM8K-style rows ({"question", "answer": "...#### N"}). Each row comes back
    with "question", "answer" (a number), "steps" (a list of step lines; [] for GSM8K rows, which
    are scored on their final answer), "difficulty" (its value, else the number of steps, else
    None) and "source" ("FILE:LINE"); a GSM8K answer text is kept as "reasoning", and other keys
    are kept. Blank lines are skipped. Bad JSON, a row that is not an object, or a missing or
    malformed field raises InvalidArgument naming the file and line."""
    from .files import read_jsonl

    rows = []
    for where, row in read_jsonl(path):
        for key in ("question", "answer"):
            if key not in row:
                raise InvalidArgument(f"{where}: missing {key!r} (a problem needs 'question' and 'answer')")
        if not isinstance(row["question"], str) or not row["question"].strip():
            raise InvalidArgument(f"{where}: 'question' must be non-empty text")
        steps = row.get("steps", [])
        if not isinstance(steps, list) or not all(isinstance(t, str) for t in steps):
            raise InvalidArgument(f"{where}: 'steps' must be a list of step lines such as 'Step 1: 2 + 3 = 5'")
        difficulty = row.get("difficulty", len(steps) or None)
        if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, int)):
            raise InvalidArgument(f"{where}: 'difficulty' must be an integer, got {difficulty!r}")
        out = dict(row)
        if isinstance(row["answer"], str) and "####" in row["answer"]:
            out["reasoning"] = row["answer"]
        out.update(answer=_answer_value(row["answer"], where), steps=steps, difficulty=difficulty, source=where)
        rows.append(out)
    return rows


# -------------------------------------------------------------------------- parsing, grading
_OP_CLASS = r"[+\-−–xX*×/÷]"
_STEP_LINE = re.compile(r"^\s*Step\s*(\d+)\s*[:.)]\s*(.*)$", re.IGNORECASE)
_SIGNED = _NUMBER.removeprefix(r"(?<![\d.,])")  # a number right after an "=", "$" or ":"
_EQUATION = re.compile(r"(?<![\d.,])(-?" + _UNSIGNED + r")\s*(" + _OP_CLASS + r")\s*(-?" + _UNSIGNED
                       + r")\s*=\s*\$?\s*(" + _SIGNED + r")")
_ANSWER = re.compile(r"Answer\s*:\s*\$?\s*(" + _SIGNED + r")", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedStep:
    number: int  # k, as written in "Step k:"
    line: str
    a: int | float | None = None  # None: the line holds no `a op b = c` equation
    op: str | None = None  # canonical: + - × ÷
    b: int | float | None = None
    result: int | float | None = None


@dataclass(frozen=True)
class ParsedSolution:
    steps: list[ParsedStep]
    answer: int | float | None  # extract_answer(text)


def parse_solution(text: str) -> ParsedSolution:
    """The "Step k: a op b = c" lines of a solution and its final answer. Whitespace is free, the
    operators may be written x X * × (times), / ÷ (divided by), - − – (minus); words may stand
    between "Step k:" and the equation, and after it (units). A "Step k:" line without an
    equation is kept with a, op, b, result None (the checker counts it as a wrong step)."""
    steps = []
    for line in text.splitlines():
        match = _STEP_LINE.match(line)
        if match is None:
            continue
        eq = _EQUATION.search(match.group(2))
        if eq is None:
            steps.append(ParsedStep(int(match.group(1)), line.strip()))
            continue
        a, op, b, c = eq.groups()
        steps.append(ParsedStep(int(match.group(1)), line.strip(), _to_number(a), _OPERATOR_SPELLINGS[op],
                                _to_number(b), _to_number(c)))
    return ParsedSolution(steps, extract_answer(text))


def extract_answer(completion: str) -> int | float | None:
    """A completion's final answer, looked for in this order:
    1. the first "Answer: N" (case-insensitive; "$" and units around N are allowed), the first
       so that text a model runs on with after answering does not count;
    2. else the first GSM8K-style "#### N";
    3. else the last number in the text;
    None when there is no number at all. "1,234" reads 1234; an integral value comes back an int."""
    for pattern in (_ANSWER, _GSM8K_FINAL):
        match = pattern.search(completion)
        if match is not None:
            return _to_number(match.group(1))
    found = _NUMBER_RE.findall(completion)
    return _to_number(found[-1]) if found else None


@dataclass(frozen=True)
class StepGrade:
    number: int  # k, as written
    line: str
    arithmetic: bool  # a op b really is the result (exactly; division by zero is wrong)
    operands: bool  # a and b are numbers of the question or results of earlier steps
    unknown_operands: tuple = ()  # the operands that are neither

    @property
    def valid(self) -> bool:
        return self.arithmetic and self.operands


@dataclass(frozen=True)
class Grade:
    steps: list[StepGrade]
    answer: int | float | None  # the completion's final answer (extract_answer)
    expected: int | float
    answer_correct: bool
    steps_valid: bool  # at least one step, and every step valid

    @property
    def correct(self) -> bool:
        """All steps valid and the answer right."""
        return self.steps_valid and self.answer_correct

    def to_json(self) -> dict:
        return {"steps": [{"number": g.number, "arithmetic": g.arithmetic, "operands": g.operands,
                           "valid": g.valid} for g in self.steps],
                "answer": self.answer, "expected": self.expected, "answer_correct": self.answer_correct,
                "steps_valid": self.steps_valid, "correct": self.correct}


def check_solution(question: str, solution: str, answer: int | float) -> Grade:
    """Grade a solution (ours, or a model's completion) of `question` whose right answer is
    `answer`: every step's arithmetic, whether its operands come from the question's numbers or
    from the results that earlier steps wrote (right or not: a wrong result is the wrong step's
    fault, not the next one's), and the final answer (`extract_answer`)."""
    parsed = parse_solution(solution)
    known = set(numbers_in(question))
    grades = []
    for step in parsed.steps:
        if step.op is None:
            grades.append(StepGrade(step.number, step.line, False, False))
            continue
        value = _apply(step.a, step.op, step.b)
        unknown = tuple(x for x in (step.a, step.b) if x not in known)
        grades.append(StepGrade(step.number, step.line, value is not None and value == step.result, not unknown,
                                unknown))
        known.add(step.result)
    return Grade(grades, parsed.answer, answer, parsed.answer is not None and parsed.answer == answer,
                 bool(grades) and all(g.valid for g in grades))


def grade_row(row: dict, completion: str) -> Grade:
    """Grade a completion against a problem row (`load_problems`, `generate_problems`). A row
    without steps (GSM8K's) is scored on its final answer: read `answer_correct`."""
    return check_solution(row["question"], completion, row["answer"])


def difficulty_histogram(rows: Iterable[dict]) -> str:
    """'1:13 2:13 3:12 ...' (rows per difficulty)."""
    counts = Counter(row.get("difficulty") for row in rows)
    return " ".join(f"{d}:{counts[d]}" for d in sorted(counts, key=lambda d: (d is None, d or 0)))
