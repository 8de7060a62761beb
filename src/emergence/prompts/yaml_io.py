"""Prompt programs as YAML files, read with each value's line, so every mistake is reported
as `FILE:LINE: what is wrong`.

    name: financial-summary            # optional
    inputs:                            # name: default (null: required); or a list of names
      summary: "BlueTech Inc. published ..."
    defaults: {max_tokens: 48, temperature: 0, stop: ["\\n\\n"]}
    stages:                            # name: settings; the order is the tie-break of the DAG
      extract:
        type: few_shot                 # template, zero_shot, few_shot, cot, few_shot_cot, reframe, self_consistency
        instruction: Extract the company name, date, and total revenue ...
        examples: [{summary: ..., company: ..., date: ..., revenue: ...}]   # or examples_file: rows.jsonl
        example_template: "Summary: {summary}\\nCompany Name: {company}\\n..."
        template: "Summary: {summary}\\n"
    output: extract                    # optional: the last stage to run

A self_consistency stage samples the stage given as `of` (a nested stage, without a name);
without `of`, its template / instruction form a `cot` stage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from .program import STAGE_TYPES, CoT, Mark, Origin, Program, PromptError, SelfConsistency, Stage

TOP_KEYS = ("name", "description", "inputs", "defaults", "stages", "output")
DEFAULT_KEYS = ("max_tokens", "temperature", "stop", "seed")
INTS = {"max_tokens", "seed", "k"}
NUMBERS = {"temperature"}
SC_OWN = {"k", "temperature", "max_tokens", "stop", "seed", "pattern", "fields", "description", "type", "of"}


def load_program(path: str | Path) -> Program:
    """The program in a YAML file; bad input raises PromptError naming the file and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompt program {path}: {getattr(e, 'strerror', None) or e}") from None
    return loads_program(text, str(path), base=path.parent)


def loads_program(text: str, file: str = "<program>", *, base: Path | None = None) -> Program:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise PromptError(f"{file}:{line}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise PromptError(f"{file}:1: not valid YAML: {e}") from None
    reader = _Reader(file, base or Path("."))
    return reader.program(root)


class _Reader:
    def __init__(self, file: str, base: Path) -> None:
        self.file, self.base = file, base
        self.loader = yaml.SafeLoader("")

    def fail(self, node: yaml.Node | int, message: str) -> PromptError:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        return PromptError(f"{self.file}:{line}: {message}")

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping node's entries, key text -> (key node, value node); duplicate keys are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping (key: value lines)")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = self.value(k)
            if not isinstance(key, str):
                raise self.fail(k, f"{what}: keys must be names, got {key!r}")
            if key in out:
                raise self.fail(k, f"{what}: {key!r} is given twice (first on line {out[key][0].start_mark.line + 1})")
            out[key] = (k, v)
        return out

    def program(self, root: yaml.Node | None) -> Program:
        if root is None:
            raise PromptError(f"{self.file}:1: the file is empty; a prompt program needs stages:")
        top = self.mapping(root, "a prompt program")
        for key, (k, _) in top.items():
            if key not in TOP_KEYS:
                raise self.fail(k, f"unknown key {key!r} (a program has: {', '.join(TOP_KEYS)})")
        if "stages" not in top:
            raise self.fail(root, "the program has no stages:")
        lines = {key: k.start_mark.line + 1 for key, (k, _) in top.items()}
        inputs = self.inputs(top["inputs"][1]) if "inputs" in top else None
        defaults = {}
        if "defaults" in top:
            for key, (k, v) in self.mapping(top["defaults"][1], "defaults").items():
                if key not in DEFAULT_KEYS:
                    raise self.fail(k, f"unknown default {key!r} (defaults take: {', '.join(DEFAULT_KEYS)})")
                defaults[key] = self.setting(key, v, "defaults")
        stages_node = top["stages"][1]
        entries = self.mapping(stages_node, "stages")
        if not entries:
            raise self.fail(stages_node, "the program has no stages")
        stages = [self.stage(name, k, v) for name, (k, v) in entries.items()]
        output = None
        if "output" in top:
            output = self.value(top["output"][1])
            if not isinstance(output, str):
                raise self.fail(top["output"][1], "output must name a stage")
        name = self.value(top["name"][1]) if "name" in top else Path(self.file).stem
        return Program(stages, inputs=inputs, output=output, defaults=defaults, name=str(name), file=self.file,
                       lines=lines)

    def inputs(self, node: yaml.Node) -> dict[str, str | None]:
        if isinstance(node, yaml.SequenceNode):
            names = self.value(node)
            if not all(isinstance(n, str) and n.isidentifier() for n in names):
                raise self.fail(node, "inputs must be names (identifiers)")
            return {n: None for n in names}
        out = {}
        for key, (k, v) in self.mapping(node, "inputs").items():
            if not key.isidentifier():
                raise self.fail(k, f"input name {key!r} is not an identifier")
            value = self.value(v)
            if isinstance(value, (dict, list)):
                raise self.fail(v, f"input {key!r}: a default must be text")
            out[key] = None if value is None else str(value)
        return out

    def setting(self, key: str, node: yaml.Node, stage: str) -> Any:
        value = self.value(node)
        where = f"stage '{stage}'" if stage != "defaults" else "defaults"
        if key in INTS and (not isinstance(value, int) or isinstance(value, bool)):
            raise self.fail(node, f"{where}: {key} must be an integer, got {value!r}")
        if key in NUMBERS and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise self.fail(node, f"{where}: {key} must be a number, got {value!r}")
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
                raise self.fail(node, f"{where}: stop must be a string or a list of non-empty strings")
            return tuple(value)
        if key == "fields":
            if not isinstance(value, dict) or not all(isinstance(p, str) for p in value.values()):
                raise self.fail(node, f"{where}: fields must map names to regex patterns")
        return value

    def stage(self, name: str, key_node: yaml.Node, node: yaml.Node, inner_of: str | None = None) -> Stage:
        what = f"stage '{inner_of or name}'"
        entries = self.mapping(node, what)
        types = ", ".join(STAGE_TYPES)
        if "type" not in entries:
            raise self.fail(key_node, f"{what} has no type (types: {types})")
        kind = self.value(entries["type"][1])
        if kind not in STAGE_TYPES:
            raise self.fail(entries["type"][1], f"{what} has unknown type {kind!r} (types: {types})")
        cls = STAGE_TYPES[kind]
        origin = Origin(self.file, key_node.start_mark.line + 1)
        settings: dict[str, Any] = {}
        if cls is SelfConsistency:
            inner_entries = {k: v for k, v in entries.items() if k not in SC_OWN}
            if "of" in entries:
                if inner_entries:
                    first = next(iter(inner_entries.values()))[0]
                    raise self.fail(first, f"{what}: {next(iter(inner_entries))!r} belongs in the stage under of:")
                settings["stage"] = self.stage(name, entries["of"][0], entries["of"][1], inner_of=name)
            else:
                settings["stage"] = self.plain_stage(CoT, name, origin, inner_entries, what)
            entries = {k: v for k, v in entries.items() if k in SC_OWN and k != "of"}
        settings.update(self.settings(cls, name, origin, entries, what))
        try:
            return cls(name=name, origin=origin, **settings)
        except TypeError as e:  # a required setting left out
            missing = str(e).split("argument")[-1].strip(": '")
            raise self.fail(key_node, f"{what} ({kind}) needs {missing}") from None

    def plain_stage(self, cls: type[Stage], name: str, origin: Origin, entries: dict, what: str) -> Stage:
        inner = Origin(origin.file, origin.line)
        return cls(name=name, origin=inner, **self.settings(cls, name, inner, entries, what))

    def settings(self, cls: type[Stage], name: str, origin: Origin, entries: dict, what: str) -> dict[str, Any]:
        allowed = {f.name for f in dataclasses.fields(cls) if f.name not in ("name", "origin", "stage")}
        if cls is not SelfConsistency and issubclass(cls, Stage) and "examples" in allowed:
            allowed.add("examples_file")
        out: dict[str, Any] = {}
        for key, (k, v) in entries.items():
            if key in ("type", "description"):
                continue
            if key not in allowed:
                raise self.fail(k, f"{what} ({cls.kind}) has no setting {key!r} (it takes: "
                                   f"{', '.join(sorted(allowed))})")
            line = v.start_mark.line + 1
            origin.marks[key] = Mark(line, getattr(v, "style", None))
            if key == "examples":
                out["examples"] = self.examples(v, what)
                origin.examples = [item.start_mark.line + 1 for item in v.value]
            elif key == "examples_file":
                path = self.value(v)
                if "examples" in entries:
                    raise self.fail(k, f"{what}: give examples or examples_file, not both")
                out["examples"] = self.examples_file(v, path, what)
                origin.marks["examples"] = Mark(line)
                origin.examples = [line] * len(out["examples"])
            else:
                value = self.setting(key, v, name)
                if key not in INTS | NUMBERS | {"stop", "fields"} and value is not None and not isinstance(value, str):
                    raise self.fail(v, f"{what}: {key} must be text, got {value!r}")
                out[key] = value
        return out

    def examples(self, node: yaml.Node, what: str) -> list[dict]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what}: examples must be a list of mappings")
        return [self.value(item) for item in node.value]

    def examples_file(self, node: yaml.Node, path: Any, what: str) -> list[dict]:
        if not isinstance(path, str):
            raise self.fail(node, f"{what}: examples_file must be a path")
        full = Path(path) if Path(path).is_absolute() else self.base / path
        try:
            text = full.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise self.fail(node, f"{what}: cannot read examples_file {full}: {getattr(e, 'strerror', None) or e}") \
                from None
        try:
            if full.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            elif full.suffix == ".json":
                rows = json.loads(text)
            else:
                rows = yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise self.fail(node, f"{what}: examples_file {full} is not valid: "
                                  f"{' '.join(str(e).split())[:200]}") from None
        if not isinstance(rows, list):
            raise self.fail(node, f"{what}: examples_file {full} must hold a list of examples")
        return rows
