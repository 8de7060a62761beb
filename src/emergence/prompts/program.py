"""Prompt programs: stages that build prompts, call a backend, and feed one another.

    Template         a prompt written whole, with {variables}
    ZeroShot         an instruction and the input, no examples
    FewShot          instruction, k examples (fixed, seeded random, or nearest by embedding), the query
    CoT              the task, then an instruction such as "break it into steps"; the answer by a pattern
    FewShotCoT       few-shot with worked examples (steps, then the answer)
    Reframe          the task's wording rewritten (by a fixed template or by the model) before the call
    SelfConsistency  another stage's prompt sampled k times; the majority answer wins

A `Program` is named stages forming a DAG: a stage reads the program's inputs and earlier stages'
outputs as {name} variables ({name.answer} is the answer its pattern extracted, {name.FIELD} a
field its `fields` patterns extracted). Stages run in topological order (declaration order among
the ready ones); `Program.run` returns a `Trace`: every stage's prompt, output, answer, token
counts and wall time.

Variables follow Python's str.format: {name}, {{ and }} for literal braces.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import InvalidArgument
from .backends import Backend, Sample


class PromptError(InvalidArgument):
    """A prompt program that cannot run: named, with the file and line where there is one."""


# ------------------------------------------------------------------------------ where
@dataclass
class Mark:
    """Where a value sits in a program file: its first line (1-based) and YAML scalar style
    ('|' literal blocks keep their lines, so a position inside the text maps to its own line)."""

    line: int
    style: str | None = None

    def at(self, text: str, pos: int) -> int:
        if self.style == "|":  # the text starts on the line after the indicator
            return self.line + 1 + text.count("\n", 0, pos)
        return self.line + 1 if self.style == ">" else self.line


@dataclass
class Origin:
    """A stage's place in its file: the stage's own line and each setting's mark."""

    file: str
    line: int
    marks: dict[str, Mark] = field(default_factory=dict)
    examples: list[int] = field(default_factory=list)  # the line of each example

    def line_of(self, setting: str | None = None, text: str = "", pos: int = 0) -> int:
        mark = self.marks.get(setting) if setting else None
        return mark.at(text, pos) if mark else self.line


# ------------------------------------------------------------------------------ rendering
_FORMATTER = string.Formatter()


def variables(template: str) -> list[tuple[str, str | None, int]]:
    """The {variables} of a template, in order: (name, attribute or None, position of its brace).
    Raises ValueError for a malformed template (a lone brace, an empty {})."""
    for _, name, _, _ in _FORMATTER.parse(template):  # str.format's own checks first
        if name is not None and not name:
            raise ValueError("empty {} (name the variable, or write {{ }} for literal braces)")
    found, i = [], 0
    while i < len(template):
        c = template[i]
        if c in "{}" and template.startswith(c * 2, i):
            i += 2
            continue
        if c == "{":
            end = template.index("}", i)
            name = re.split(r"[!:]", template[i + 1:end], maxsplit=1)[0]
            base, dot, attr = name.partition(".")
            if not base.isidentifier() or (dot and not attr.isidentifier()):
                raise ValueError(f"{{{name}}} is not a variable (write {{name}} or {{stage.field}}, "
                                 "and {{ }} for literal braces)")
            found.append((base, attr or None, i))
            i = end + 1
            continue
        i += 1
    return found


def render(template: str, env: Mapping[str, Any]) -> str:
    """`template` with its {variables} filled from env (values as str.format shows them)."""
    values = {k: "\n".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in env.items()}
    return template.format_map(values)


class Value(str):
    """A stage's output as later stages see it: the text (stripped), with .output, .answer and
    the fields its patterns extracted as attributes."""

    def __new__(cls, text: str, answer: str | None = None, fields: Mapping[str, str | None] | None = None):
        self = super().__new__(cls, text.strip())
        self.output = str.__str__(self)
        self.answer = answer if answer is not None else self.output
        for name, value in (fields or {}).items():
            setattr(self, name, "" if value is None else value)
        return self


def extract(pattern: str | re.Pattern | None, text: str) -> str | None:
    """The answer a pattern finds in text: its first match's group 'answer', else its group 1,
    else the whole match, stripped; None when it does not match. No pattern: the stripped text."""
    if pattern is None:
        return text.strip()
    m = re.search(pattern, text)
    if m is None:
        return None
    regex = m.re
    group = "answer" if "answer" in regex.groupindex else 1 if regex.groups else 0
    return (m.group(group) or "").strip()


def normalize(answer: str) -> str:
    """What two answers must share to count as the same vote: case, spacing and a final period aside."""
    return " ".join(answer.split()).rstrip(".").strip().casefold()


def majority(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent answer (normalized) and the votes per answer (each shown as first
    written); a tie goes to the answer that occurred first; None answers do not vote."""
    votes: dict[str, int] = {}
    shown: dict[str, str] = {}
    for a in answers:
        if a is None:
            continue
        key = normalize(a)
        shown.setdefault(key, a)
        votes[key] = votes.get(key, 0) + 1
    if not votes:
        return None, {}
    best = max(votes, key=lambda k: votes[k])  # max keeps the first of equals: insertion order
    return shown[best], {shown[k]: v for k, v in votes.items()}


# ------------------------------------------------------------------------------ trace
@dataclass
class Call:
    """One request to the backend."""

    prompt: str
    outputs: list[str]
    prompt_tokens: int
    completion_tokens: int
    seconds: float


@dataclass
class StageTrace:
    name: str
    type: str
    prompt: str
    output: str
    answer: str | None = None
    pattern: str | None = None  # what the answer was extracted by
    fields: dict[str, str | None] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    calls: list[Call] = field(default_factory=list)
    examples: list[int] | None = None  # few-shot: the indices of the examples chosen, in prompt order
    reframed: str | None = None  # reframe: the task's new wording
    samples: list[dict] | None = None  # self-consistency: each sample's text and answer
    votes: dict[str, int] | None = None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        return {k: v for k, v in out.items() if v is not None or k == "answer"}


@dataclass
class Trace:
    program: str
    inputs: dict[str, str]
    stages: list[StageTrace]
    output: str
    output_stage: str
    seconds: float

    @property
    def prompt_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.stages)

    @property
    def completion_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.stages)

    def __getitem__(self, name: str) -> StageTrace:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"program": self.program, "inputs": self.inputs, "stages": [s.to_dict() for s in self.stages],
                "output_stage": self.output_stage, "output": self.output, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "seconds": round(self.seconds, 4)}

    def format(self) -> str:
        """The trace for a terminal: each stage's prompt and output, indented, with its counts."""
        lines = []
        for i, s in enumerate(self.stages, 1):
            head = (f"== stage {i}/{len(self.stages)}: {s.name} ({s.type}) -- {s.prompt_tokens} prompt + "
                    f"{s.completion_tokens} completion tokens, {s.seconds:.2f} s")
            lines.append(head)
            if s.examples is not None:
                lines.append(f"-- examples chosen (indices from 0): {', '.join(map(str, s.examples)) or 'none'}")
            if s.reframed is not None:
                if len(s.calls) > 1:  # the model rewrote the task
                    lines += ["-- rewrite prompt:", _indent(s.calls[0].prompt)]
                lines += ["-- reframed task:", _indent(s.reframed)]
            lines += ["-- prompt:", _indent(s.prompt)]
            if s.samples is not None:
                for j, sample in enumerate(s.samples, 1):
                    lines += [f"-- sample {j} (answer: {sample['answer']!r}):", _indent(sample["text"])]
                lines.append(f"-- votes: {s.votes}")
            else:
                lines += ["-- output:", _indent(s.output)]
            if s.pattern is not None and s.answer is None:
                lines.append(f"-- answer: none (the pattern {s.pattern!r} found nothing)")
            elif s.answer is not None and (s.samples is not None or s.answer != s.output.strip()):
                lines.append(f"-- answer: {s.answer}")
            for name, value in s.fields.items():
                lines.append(f"-- {name}: {value if value is not None else '(no match)'}")
            lines.append("")
        lines.append(f"== output ({self.output_stage}): {self.output}")
        lines.append(f"== total: {self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                     f"{self.seconds:.2f} s")
        return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("   | " + line for line in text.split("\n"))


# ------------------------------------------------------------------------------ stages
@dataclass
class Settings:
    """How a stage's calls sample: max_tokens, temperature, stop strings, seed."""

    max_tokens: int = 128
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


SETTING_NAMES = ("max_tokens", "temperature", "stop", "seed")


@dataclass(kw_only=True)
class Stage:
    """A named step of a program. Sampling settings left None take the program's defaults.

    pattern: a regex whose first match is the stage's answer (group 'answer', else group 1,
    else the match); fields: more named patterns, each extracting one value."""

    name: str = ""  # may be left out only inside a SelfConsistency, which lends its own
    max_tokens: int | None = None
    temperature: float | None = None
    stop: Sequence[str] | None = None
    seed: int | None = None
    pattern: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    origin: Origin | None = field(default=None, repr=False, compare=False)

    kind: ClassVar[str] = ""
    TEMPLATES: ClassVar[tuple[str, ...]] = ()  # settings holding templates over the program's variables
    local: ClassVar[frozenset[str]] = frozenset()  # variables the stage itself defines

    # -- static view
    def templates(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in self.TEMPLATES if getattr(self, name) is not None}

    def references(self) -> list[tuple[str, str | None, str, int]]:
        """(variable, attribute, setting, line) for each {variable} the stage reads from the program."""
        out = []
        for setting, text in self.templates().items():
            try:
                found = variables(text)
            except ValueError as e:
                raise self.error(f"bad template in {setting}: {e}", setting) from None
            for name, attr, pos in found:
                if name not in self.local:
                    line = self.origin.line_of(setting, text, pos) if self.origin else 0
                    out.append((name, attr, setting, line))
        return out

    def where(self, setting: str | None = None, line: int | None = None) -> str:
        if self.origin is None:
            return ""
        return f"{self.origin.file}:{line or self.origin.line_of(setting)}: "

    def error(self, message: str, setting: str | None = None, line: int | None = None) -> PromptError:
        """PromptError "FILE:LINE: stage 'name' uses ..." (a clause) or "...: stage 'name': bad ..." (a finding)."""
        sep = " " if message.split(" ", 1)[0] in ("uses", "needs", "has", "is", "samples") else ": "
        return PromptError(f"{self.where(setting, line)}stage '{self.name}'{sep}{message}")

    def check(self) -> None:
        """Settings that can be checked without running: patterns compile, counts are positive."""
        if not self.name.isidentifier():
            raise self.error("a stage's name must be an identifier (letters, digits, _), to be used as {name}")
        for setting, regex in [("pattern", self.pattern), *((f"fields.{k}", v) for k, v in self.fields.items())]:
            if regex is not None:
                try:
                    re.compile(regex)
                except re.error as e:
                    raise self.error(f"bad regex in {setting}: {e}", setting.split(".")[0]) from None
        for name in self.fields:
            if not name.isidentifier() or name in ("output", "answer"):
                raise self.error(f"field name {name!r} cannot be used: pick an identifier other than "
                                 "output and answer", "fields")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise self.error(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if self.temperature is not None and (not isinstance(self.temperature, (int, float)) or self.temperature < 0):
            raise self.error(f"temperature must be a number >= 0, got {self.temperature!r}", "temperature")
        self.references()

    def attributes(self) -> set[str]:
        return {"output", "answer", *self.fields}

    def settings(self, defaults: Settings) -> Settings:
        return Settings(*(getattr(self, n) if getattr(self, n) is not None else getattr(defaults, n)
                          for n in SETTING_NAMES))

    # -- running
    def prompt(self, env: Mapping[str, Any], backend: Backend, trace: StageTrace, settings: Settings) -> str:
        raise NotImplementedError

    def run(self, env: Mapping[str, Any], backend: Backend,
            defaults: Settings = Settings()) -> tuple[Value, StageTrace]:
        start = time.perf_counter()
        settings = self.settings(defaults)
        trace = StageTrace(self.name, self.kind, "", "")
        trace.prompt = self.prompt(env, backend, trace, settings)
        sample = call(backend, trace, trace.prompt, settings)[0]
        trace.output = sample.text
        trace.answer = extract(self.pattern, sample.text) if self.pattern else None
        trace.pattern = self.pattern
        trace.fields = {k: extract(p, sample.text) for k, p in self.fields.items()}
        trace.seconds = time.perf_counter() - start
        return Value(sample.text, trace.answer, trace.fields), trace

    def fill(self, setting: str, env: Mapping[str, Any]) -> str:
        text = getattr(self, setting)
        try:
            return render(text, env)
        except KeyError as e:
            name = e.args[0]
            pos = text.find("{" + name)
            raise self.error(f"uses {{{name}}}, which has no value", setting,
                             self.origin.line_of(setting, text, max(pos, 0)) if self.origin else None) from None
        except (AttributeError, ValueError, IndexError) as e:
            raise self.error(f"cannot render {setting}: {e}", setting) from None


def call(backend: Backend, trace: StageTrace, prompt: str, settings: Settings, n: int = 1) -> list[Sample]:
    start = time.perf_counter()
    samples = [Sample(*s) for s in backend.complete(prompt, n=n, temperature=settings.temperature,
                                                    max_tokens=settings.max_tokens, stop=tuple(settings.stop),
                                                    seed=settings.seed)]
    prompt_tokens = samples[0].prompt_tokens if samples else 0
    completion_tokens = sum(s.completion_tokens for s in samples)
    trace.calls.append(Call(prompt, [s.text for s in samples], prompt_tokens, completion_tokens,
                            time.perf_counter() - start))
    trace.prompt_tokens += prompt_tokens
    trace.completion_tokens += completion_tokens
    return samples


def _join(parts: Sequence[str | None], separator: str) -> str:
    return separator.join(p for p in parts if p)


@dataclass(kw_only=True)
class Template(Stage):
    """The prompt written whole: `template` with its {variables} filled."""

    template: str
    kind: ClassVar[str] = "template"
    TEMPLATES: ClassVar[tuple[str, ...]] = ("template",)

    def prompt(self, env, backend, trace, settings) -> str:
        return self.fill("template", env)


@dataclass(kw_only=True)
class ZeroShot(Stage):
    """An instruction and the input, no examples: instruction + separator + template."""

    instruction: str | None = None
    template: str = "{input}"
    separator: str = "\n\n"
    kind: ClassVar[str] = "zero_shot"
    TEMPLATES: ClassVar[tuple[str, ...]] = ("instruction", "template")

    def prompt(self, env, backend, trace, settings) -> str:
        return _join([self.fill("instruction", env) if self.instruction else None, self.fill("template", env)],
                     self.separator)


@dataclass(kw_only=True)
class CoT(Stage):
    """Chain of thought: the task (template), then an instruction to reason in steps; the answer
    is what `pattern` finds in the output."""

    template: str = "{input}"
    instruction: str = "Let's break it into steps."
    separator: str = "\n"
    pattern: str | None = r"Answer:\s*(.+)"
    kind: ClassVar[str] = "cot"
    TEMPLATES: ClassVar[tuple[str, ...]] = ("template", "instruction")

    def prompt(self, env, backend, trace, settings) -> str:
        return _join([self.fill("template", env), self.fill("instruction", env)], self.separator)


SELECTIONS = ("fixed", "random", "nearest")


@dataclass(kw_only=True)
class FewShot(Stage):
    """Instruction, k examples, the query (each joined by `separator`).

    examples: mappings of fields, each rendered by `example_template` ({index} is its 1-based
    place in the prompt; a list value is joined by newlines). select: "fixed" (the first k),
    "random" (k drawn by random.Random(seed).sample: the stage's seed, else the program's, else 0)
    or "nearest" (the k whose `key` field is nearest the query by cosine similarity of the
    backend's embeddings, nearest first; the query is `match` rendered, by default the values of
    `template`'s variables, joined by spaces). k None: every example."""

    examples: list[dict[str, Any]] = field(default_factory=list)
    example_template: str = "Input: {input}\nOutput: {output}"
    template: str = "Input: {input}\nOutput:"
    instruction: str | None = None
    k: int | None = None
    select: str = "fixed"
    key: str = "input"
    match: str | None = None
    separator: str = "\n\n"
    kind: ClassVar[str] = "few_shot"
    TEMPLATES: ClassVar[tuple[str, ...]] = ("instruction", "template", "match")

    def check(self) -> None:
        super().check()
        if self.select not in SELECTIONS:
            raise self.error(f"unknown select {self.select!r}; use {', '.join(SELECTIONS)}", "select")
        if not self.examples:
            raise self.error("has no examples", "examples")
        if self.k is not None and (not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1):
            raise self.error(f"k must be a positive integer, got {self.k!r}", "k")
        try:
            needed = [(n, a) for n, a, _ in variables(self.example_template)]
        except ValueError as e:
            raise self.error(f"bad template in example_template: {e}", "example_template") from None
        for i, example in enumerate(self.examples):
            line = self.origin.examples[i] if self.origin and i < len(self.origin.examples) else None
            if not isinstance(example, Mapping):
                raise self.error(f"example {i + 1} is not a mapping of fields", "examples", line)
            for name, attr in needed:
                if name not in example and name != "index":
                    raise self.error(f"example {i + 1} has no {name!r}, which example_template uses",
                                     "examples", line)
            if self.select == "nearest" and not isinstance(example.get(self.key), str):
                raise self.error(f"example {i + 1} has no text {self.key!r} to compare (select: nearest, "
                                 f"key: {self.key})", "examples", line)

    def choose(self, env: Mapping[str, Any], backend: Backend, query: str, settings: Settings) -> list[int]:
        n = len(self.examples)
        k = n if self.k is None else min(self.k, n)
        if self.select == "fixed":
            return list(range(k))
        if self.select == "random":
            return random.Random(0 if settings.seed is None else settings.seed).sample(range(n), k)
        embed = getattr(backend, "embed", None)
        if embed is None:
            raise self.error("select: nearest needs embeddings, which this backend does not offer", "select")
        if self.match is not None:
            text = self.fill("match", env)
        else:  # the values the query's variables take, as LangChain's similarity selector compares
            refs = dict.fromkeys("{%s}" % (n + ("." + a if a else "")) for n, a, _ in variables(self.template))
            text = " ".join(render(r, env) for r in refs) or query
        vectors = embed([str(e[self.key]) for e in self.examples] + [text])
        return nearest(vectors[-1], vectors[:-1], k)

    def render_example(self, example: Mapping[str, Any], index: int) -> str:
        return render(self.example_template, {"index": index, **example})

    def prompt(self, env, backend, trace, settings) -> str:
        query = self.fill("template", env)
        chosen = self.choose(env, backend, query, settings)
        trace.examples = chosen
        shots = [self.render_example(self.examples[i], j) for j, i in enumerate(chosen, 1)]
        instruction = self.fill("instruction", env) if self.instruction else None
        return _join([instruction, *shots, query], self.separator)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def nearest(query: Sequence[float], vectors: Sequence[Sequence[float]], k: int) -> list[int]:
    """The indices of the k vectors nearest `query` by cosine similarity, nearest first (ties:
    the earlier index)."""
    sims = [cosine(query, v) for v in vectors]
    return sorted(range(len(sims)), key=lambda i: (-sims[i], i))[:k]


@dataclass(kw_only=True)
class FewShotCoT(FewShot):
    """Few-shot with worked examples: each shows its steps, then its answer (the survey's
    train and cyclist problems); the answer is what `pattern` finds in the output."""

    example_template: str = "Q: {question}\nA:\n{steps}\nAnswer: {answer}"
    template: str = "Q: {input}\nA:"
    key: str = "question"
    pattern: str | None = r"Answer:\s*(.+)"
    kind: ClassVar[str] = "few_shot_cot"


@dataclass(kw_only=True)
class Reframe(Stage):
    """The task's wording is rewritten before the call: by `rewrite`, a fixed template, or by
    the model's answer to `rewrite_prompt`. {task} is the original wording in either, and the
    reframed wording in `template`, the prompt sent (default: the reframed task alone)."""

    task: str
    rewrite: str | None = None
    rewrite_prompt: str | None = None
    template: str = "{task}"
    kind: ClassVar[str] = "reframe"
    TEMPLATES: ClassVar[tuple[str, ...]] = ("task", "rewrite", "rewrite_prompt", "template")
    local: ClassVar[frozenset[str]] = frozenset({"task"})

    def references(self):
        refs = super().references()
        try:
            uses_task = [pos for n, _, pos in variables(self.task) if n == "task"]
        except ValueError:
            uses_task = []
        if uses_task:  # the task's own wording cannot be itself
            line = self.origin.line_of("task", self.task, uses_task[0]) if self.origin else None
            raise self.error("{task} in task would be the task itself", "task", line)
        return refs

    def check(self) -> None:
        super().check()
        if (self.rewrite is None) == (self.rewrite_prompt is None):
            raise self.error("give exactly one of rewrite (a fixed rewrite) and rewrite_prompt (the model rewrites)")

    def prompt(self, env, backend, trace, settings) -> str:
        task = self.fill("task", env)
        if self.rewrite is not None:
            reframed = self.fill("rewrite", {**env, "task": task})
        else:
            asked = self.fill("rewrite_prompt", {**env, "task": task})
            reframed = call(backend, trace, asked, settings)[0].text.strip()
        trace.reframed = reframed
        return self.fill("template", {**env, "task": reframed})


@dataclass(kw_only=True)
class SelfConsistency(Stage):
    """`stage`'s prompt sampled k times at `temperature` (default 0.7); each sample's answer is
    extracted by `pattern` (default: the inner stage's; none: the whole text) and the majority
    answer (ties: the first to occur) is the output."""

    stage: Stage
    k: int = 5
    kind: ClassVar[str] = "self_consistency"

    def __post_init__(self) -> None:
        if not self.stage.name:
            self.stage = dataclasses.replace(self.stage, name=self.name)

    def templates(self) -> dict[str, str]:
        return self.stage.templates()

    def references(self):
        return self.stage.references()

    def check(self) -> None:
        super().check()
        self.stage.check()
        if isinstance(self.stage, (Reframe, SelfConsistency)):
            raise self.error(f"samples a prompt-building stage, not {self.stage.kind}", "stage")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise self.error(f"k must be a positive integer, got {self.k!r}", "k")

    def settings(self, defaults: Settings) -> Settings:
        inner = self.stage.settings(defaults)
        own = super().settings(inner)
        if self.temperature is None:
            own.temperature = 0.7
        return own

    def run(self, env, backend, defaults: Settings = Settings()):
        start = time.perf_counter()
        settings = self.settings(defaults)
        trace = StageTrace(self.name, self.kind, "", "")
        trace.prompt = self.stage.prompt(env, backend, trace, settings)
        samples = call(backend, trace, trace.prompt, settings, n=self.k)
        pattern = self.pattern if self.pattern is not None else self.stage.pattern
        answers = [extract(pattern, s.text) for s in samples]
        trace.pattern = pattern
        trace.samples = [{"text": s.text, "answer": a, "completion_tokens": s.completion_tokens}
                         for s, a in zip(samples, answers)]
        trace.answer, trace.votes = majority(answers)
        trace.output = trace.answer or ""
        winner = next((s.text for s, a in zip(samples, answers)
                       if a is not None and trace.answer is not None and normalize(a) == normalize(trace.answer)),
                      "")
        trace.fields = {k: extract(p, winner) for k, p in self.fields.items()}
        trace.seconds = time.perf_counter() - start
        return Value(trace.output, trace.answer, trace.fields), trace


STAGE_TYPES: dict[str, type[Stage]] = {cls.kind: cls for cls in (Template, ZeroShot, FewShot, CoT, FewShotCoT,
                                                                  Reframe, SelfConsistency)}


# ------------------------------------------------------------------------------ program
class Program:
    """Named stages forming a DAG over the program's inputs.

    inputs: the names the program takes (a mapping gives defaults; None: required), or None to
    take whatever its stages use that no stage defines. output: the stage whose output is the
    program's (default: the last to run). defaults: sampling settings for stages that set none."""

    def __init__(self, stages: Sequence[Stage], *, inputs: Mapping[str, str | None] | Sequence[str] | None = None,
                 output: str | None = None, defaults: Mapping[str, Any] | None = None, name: str = "program",
                 file: str | None = None, lines: Mapping[str, int] | None = None) -> None:
        self.name, self.file, self.lines = name, file, dict(lines or {})
        self.stages = list(stages)
        self.declared = inputs is not None
        if inputs is None:
            self.inputs: dict[str, str | None] = {}
        elif isinstance(inputs, Mapping):
            self.inputs = {str(k): None if v is None else str(v) for k, v in inputs.items()}
        else:
            self.inputs = {str(k): None for k in inputs}
        try:
            self.defaults = Settings(**{k: tuple(v) if k == "stop" else v for k, v in (defaults or {}).items()})
        except TypeError as e:
            raise PromptError(f"{self._where('defaults')}bad defaults: {e}") from None
        self.output_name = output
        self.check()
        self.order = self.topological()
        self.output = output or self.order[-1].name

    def _where(self, key: str) -> str:
        return f"{self.file}:{self.lines[key]}: " if self.file and key in self.lines else ""

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def check(self) -> None:
        if not self.stages:
            raise PromptError(f"{self._where('stages')}the program has no stages")
        names: dict[str, Stage] = {}
        for s in self.stages:
            if s.name in names:
                raise s.error("is defined twice")
            if s.name in self.inputs:
                raise s.error("has the name of a program input; rename one of them")
            names[s.name] = s
            s.check()
        if self.output_name is not None and self.output_name not in names:
            raise PromptError(f"{self._where('output')}output names stage {self.output_name!r}, which does not "
                              f"exist (stages: {', '.join(names)})")
        for s in self.stages:
            for var, attr, setting, line in s.references():
                if var in names:
                    if attr is not None and attr not in names[var].attributes():
                        raise s.error(f"uses {{{var}.{attr}}}, but stage '{var}' has no field {attr!r} "
                                      f"(it has: {', '.join(sorted(names[var].attributes()))})", setting, line)
                elif self.declared and var not in self.inputs:
                    have = ", ".join(self.inputs) or "none declared"
                    raise s.error(f"uses {{{var}}}, which is neither a program input ({have}) nor a stage "
                                  f"({', '.join(names)})", setting, line)
                elif attr is not None:
                    raise s.error(f"uses {{{var}.{attr}}}, but {var!r} is a program input, which has no fields",
                                  setting, line)

    def dependencies(self, stage: Stage) -> dict[str, int]:
        """The stages a stage reads, each with the line of its first use."""
        names = {s.name for s in self.stages}
        deps: dict[str, int] = {}
        for var, _, _, line in stage.references():
            if var in names:
                deps.setdefault(var, line)
        return deps

    def topological(self) -> list[Stage]:
        """Kahn's order, declaration order among the ready; a cycle is named, stage by stage, in
        the direction its data flows."""
        deps = {s.name: self.dependencies(s) for s in self.stages}
        done: list[Stage] = []
        left = list(self.stages)
        while left:
            ready = next((s for s in left if all(d in {x.name for x in done} for d in deps[s.name])), None)
            if ready is None:
                raise self.cycle_error(deps, left)
            done.append(ready)
            left.remove(ready)
        return done

    def cycle_error(self, deps: dict[str, dict[str, int]], left: list[Stage]) -> PromptError:
        # walk back along dependencies from the first stage left until a stage repeats
        path = [left[0].name]
        pending = {s.name for s in left}
        while True:
            nxt = next(d for d in deps[path[-1]] if d in pending)
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                break
            path.append(nxt)
        flow = list(reversed(cycle))  # data flows from a dependency to the stage that reads it
        first = min(flow[:-1], key=lambda n: [s.name for s in self.stages].index(n))
        at = flow.index(first)
        flow = flow[at:-1] + flow[:at] + [first]
        reader = self.stage(first)
        fed_by = flow[-2]
        return PromptError(f"{reader.where(line=deps[first][fed_by])}the stages form a cycle: {' -> '.join(flow)}")

    def run(self, backend: Backend, inputs: Mapping[str, Any] | None = None, *, seed: int | None = None,
            max_tokens: int | None = None) -> Trace:
        """Run every stage in order; seed / max_tokens override the program's defaults."""
        given = {k: str(v) for k, v in (inputs or {}).items()}
        if self.declared:
            unknown = [k for k in given if k not in self.inputs]
            if unknown:
                raise PromptError(f"unknown input {unknown[0]!r}; the program takes: "
                                  f"{', '.join(self.inputs) or 'no inputs'}")
        env: dict[str, Any] = {k: v for k, v in self.inputs.items() if v is not None}
        env.update(given)
        names = {s.name for s in self.stages}
        for s in self.order:
            for var, _, setting, line in s.references():
                if var not in names and var not in env:
                    raise s.error(f"needs input {var!r}: give --input {var}=...", setting, line)
        defaults = dataclasses.replace(self.defaults)
        if seed is not None:
            defaults.seed = seed
        if max_tokens is not None:
            defaults.max_tokens = max_tokens
        start = time.perf_counter()
        traces = []
        for s in self.order:
            if max_tokens is not None:
                s = dataclasses.replace(s, max_tokens=max_tokens)
            try:
                value, trace = s.run(env, backend, defaults)
            except PromptError:
                raise
            except InvalidArgument as e:  # the backend's (a prompt too long, a server that does not answer)
                raise PromptError(f"stage '{s.name}': {e}") from None
            env[s.name] = value
            traces.append(trace)
        return Trace(self.name, {k: str(v) for k, v in env.items() if k not in names}, traces,
                     str(env[self.output]), self.output, time.perf_counter() - start)
