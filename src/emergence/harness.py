"""`emergence eval`: score a model on a task of JSONL rows, the way lm-evaluation-harness does.

A task file is YAML in a subset of lm-evaluation-harness' task format, so one file runs in both
tools (`lm_eval --include_path DIR --tasks NAME` and `emergence eval --task FILE`):

    task: stories_mc
    dataset_path: json                      # rows from local JSONL files
    dataset_kwargs:
      data_files: rows.jsonl                # a path, a list of paths, or {split: path};
    test_split: train                       #   a path or a list is the split "train"
    output_type: multiple_choice            # or generate_until (the default)
    description: ""                         # text (a template) before every prompt
    doc_to_text: "{{context}}"              # a row's field name, or a Jinja template
    doc_to_choice: endings                  # a field, a template giving a list, or a YAML list
    doc_to_target: label                    # a field, a template or a number: an index or a choice
    target_delimiter: " "                   # between the prompt and each choice
    metric_list:
      - metric: acc
      - metric: acc_norm
    generation_kwargs:                      # generate_until: greedy, until a stop string
      until: ["\\n"]
      max_gen_toks: 32

Relative data_files are read from the task file's folder (lm_eval reads them from its working
directory: give absolute paths, or run it from that folder, when one file serves both).

Multiple choice follows lm_eval's conventions exactly: every choice is a request
(prompt, target_delimiter + choice); trailing whitespace of the prompt moves to the front of the
continuation; the continuation's tokens are those of encode(prompt + continuation) after the
first len(encode(prompt)) ones; BOS as the tokenizer adds it (`add_bos` overrides, as lm_eval's
`add_bos_token`); an empty prompt is BOS (or EOS) alone; sequences longer than the context keep
their end. `acc`: the choice of the largest summed log-likelihood (the first, on a tie) is the
target; `acc_norm`: the same after dividing by each choice's length in characters;
`acc_bytes`: by its length in UTF-8 bytes; `acc_mutual_info`: log P(choice | prompt) -
log P(choice | empty prompt). Log-likelihoods are computed in batches as lm_eval's hf backend
batches them (requests sharing a model input share a row, longest first, right padding, one
forward pass per batch; the output head only at the continuation positions), so that with the
same batch size the two give the same numbers to the bit; another batch size changes them only
by rounding (about 1e-5 on a sum of 30 tokens' log-probabilities in fp32).

Generation metrics (generate_until, greedy, cut at the first `until` string or EOS):
`exact_match` (lm_eval's options ignore_case, ignore_punctuation, ignore_numbers,
regexes_to_ignore), `regex_match` (`pattern`: the first match, its group 1 if it has groups,
compared with the target after the same options), `f1` (SQuAD's token F1: lowercased, without
punctuation and articles; the best over several targets) and `checker` (`function:
package.module:function`, called as function(prediction, target, doc) -> bool or number).

(lm_eval's own `f1` is another metric, scikit-learn's F1 over whole predictions; emergence's
regex_match, f1 and checker have no lm_eval counterpart of the same name.) With a prompt
program (`program=`, `--program`: emergence.prompts), the program answers each row of a
generation task, the row's fields its inputs.

Each metric reports its mean and the standard error of that mean (sample standard deviation /
sqrt(n)), as lm_eval does; `evaluate` also returns every row's result.

Not supported, refused in one line: few-shot prompts, filter_list, process_docs /
process_results, `!function` tags, include / groups, one prompt per choice (Winogrande style),
sampling.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidArgument
from .tokenizer import Tokenizer

OUTPUT_TYPES = ("multiple_choice", "generate_until")
MC_METRICS = ("acc", "acc_norm", "acc_bytes", "acc_mutual_info")
GEN_METRICS = ("exact_match", "regex_match", "f1", "checker")
DEFAULT_METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate_until": ("exact_match",)}
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's
# the metric options each metric takes (lm_eval's metric_list keys besides these are refused)
METRIC_OPTIONS = {
    "exact_match": {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"},
    "regex_match": {"pattern", "group", "ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore"},
    "f1": set(),
    "checker": {"function"},
}
# task fields: those read here, those that change nothing, and lm_eval's that are not supported
FIELDS = {"task", "dataset_path", "dataset_kwargs", "test_split", "validation_split", "output_type", "description",
          "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter", "metric_list", "generation_kwargs"}
IGNORED = {"tag", "metadata", "training_split", "fewshot_split", "fewshot_delimiter", "num_fewshot", "repeats",
           "should_decontaminate", "doc_to_decontamination_query", "dataset_name", "unsafe_code"}
GENERATION_KEYS = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature"}


# ------------------------------------------------------------------------------ task files
class _Map(dict):
    """A YAML mapping that remembers its line and its keys' lines."""

    line = 1

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}


def _read_yaml(path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise InvalidArgument(f"{path}: reading task files needs PyYAML (pip install pyyaml)") from None

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        loader.flatten_mapping(node)
        out = _Map()
        out.line = node.start_mark.line + 1
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise InvalidArgument(f"{path}:{key_node.start_mark.line + 1}: a key must be a plain value")
            out[key] = loader.construct_object(value_node, deep=True)
            out.lines[key] = key_node.start_mark.line + 1
        return out

    def tagged(loader, suffix, node):
        raise InvalidArgument(f"{path}:{node.start_mark.line + 1}: the tag {node.tag} (a Python function in the "
                              "task file) is not supported: use a field name or a Jinja template")

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_multi_constructor("!", tagged)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgument(f"task file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read task file {path}: {e}") from None
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise InvalidArgument(f"{where}: not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{path}: not valid YAML: {e}") from None


def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # lm_eval's environment (StrictUndefined, trailing newlines kept, a regex_replace filter), sandboxed
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Spec:
    """One of doc_to_text / doc_to_choice / doc_to_target: a field, a template or a constant."""

    name: str
    value: Any
    line: int
    template: Any = None  # compiled Jinja template
    fields: frozenset[str] = frozenset()  # the row fields it needs

    @property
    def is_field(self) -> bool:
        return isinstance(self.value, str) and self.template is None


@dataclass
class Metric:
    name: str
    options: dict[str, Any]
    line: int
    function: Callable | None = None  # checker
    pattern: re.Pattern | None = None  # regex_match


@dataclass
class Row:
    line: int  # in its JSONL file
    file: Path
    doc: dict[str, Any]


@dataclass
class Task:
    name: str
    path: Path
    output_type: str
    rows: list[Row]
    text: Spec
    target: Spec
    choice: Spec | None
    description: Spec | None
    target_delimiter: str
    metrics: list[Metric]
    until: list[str] = field(default_factory=list)
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS


def load_task(path: str | Path, *, limit: int | None = None) -> Task:
    """Read and check a task file and its rows (the first `limit` of them): every problem is
    one InvalidArgument naming the file and line."""
    path = Path(path)
    config = _read_yaml(path)
    if not isinstance(config, _Map):
        raise InvalidArgument(f"{path}:1: a task file is a YAML mapping of fields "
                              "(task, dataset_path, doc_to_text, ...)")

    def at(key: str | None = None, mapping: _Map = config) -> str:
        return f"{path}:{mapping.lines.get(key, mapping.line) if key is not None else mapping.line}"

    for key in config:
        if key == "include" or key == "group" or key == "class":
            raise InvalidArgument(f"{at(key)}: {key!r} (task inheritance, groups, task classes) is not supported: "
                                  "write every field in the task file")
        if key not in FIELDS and key not in IGNORED:
            if isinstance(key, str) and key in _LM_EVAL_FIELDS:
                raise InvalidArgument(f"{at(key)}: the field {key!r} is not supported by emergence eval")
            raise InvalidArgument(f"{at(key)}: unknown field {key!r}")
    if config.get("num_fewshot") not in (None, 0):
        raise InvalidArgument(f"{at('num_fewshot')}: num_fewshot must be 0: few-shot prompts are not supported")
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise InvalidArgument(f"{at('output_type')}: unknown output_type {output_type!r} "
                              f"(use {' or '.join(OUTPUT_TYPES)})")
    needed = ["dataset_path", "dataset_kwargs", "doc_to_text", "doc_to_target"]
    if output_type == "multiple_choice":
        needed.append("doc_to_choice")
    missing = [k for k in needed if config.get(k) is None]
    if missing:
        raise InvalidArgument(f"{at()}: the task has no {', '.join(missing)} (a {output_type} task needs "
                              f"{', '.join(needed)})")
    if config["dataset_path"] != "json":
        raise InvalidArgument(f"{at('dataset_path')}: dataset_path must be json (rows from local JSONL files), "
                              f"got {config['dataset_path']!r}")
    kwargs = config["dataset_kwargs"]
    if not isinstance(kwargs, _Map) or kwargs.get("data_files") is None:
        where = at("dataset_kwargs") if not isinstance(kwargs, _Map) else at(None, kwargs)
        raise InvalidArgument(f"{where}: dataset_kwargs has no data_files (the JSONL files the rows are in)")
    split_key = "test_split" if config.get("test_split") is not None else "validation_split"
    split = config.get(split_key)
    if split is None:
        raise InvalidArgument(f"{at()}: the task has no test_split or validation_split (the split to evaluate; "
                              "data_files given as a path or a list are the split 'train')")
    files = _split_files(kwargs["data_files"], split, path, at("data_files", kwargs), at(split_key))
    rows = _read_rows(files, limit)
    if not rows:
        raise InvalidArgument(f"{at('dataset_kwargs')}: the split {split!r} has no rows")
    features = {k for row in rows for k in row.doc}

    env = _environment()
    specs = {}
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "description"):
        if config.get(key) is None or (key == "description" and config[key] == ""):
            specs[key] = None
            continue
        specs[key] = _spec(key, config[key], at(key), features, env, allow_list=key == "doc_to_choice")
    delimiter = config.get("target_delimiter", " ")
    if not isinstance(delimiter, str):
        raise InvalidArgument(f"{at('target_delimiter')}: target_delimiter must be a string")
    metrics = _metrics(config.get("metric_list"), output_type, at, path)
    task = Task(str(config.get("task") or path.stem), path, output_type, rows, specs["doc_to_text"],
                specs["doc_to_target"], specs["doc_to_choice"], specs["description"], delimiter, metrics)
    gen = config.get("generation_kwargs")
    if gen is not None:
        if not isinstance(gen, _Map):
            raise InvalidArgument(f"{at('generation_kwargs')}: generation_kwargs must be a mapping")
        _generation(task, gen, lambda key=None: at(key, gen))
    else:
        task.until = ["\n\n"]  # lm_eval's default: the few-shot delimiter
    for row in rows:  # every row has the fields the task names
        for spec in (task.text, task.target, task.choice, task.description):
            if spec is not None:
                lacking = sorted(spec.fields - row.doc.keys())
                if lacking:
                    raise InvalidArgument(f"{row.file}:{row.line}: the row has no {', '.join(map(repr, lacking))} "
                                          f"(the task's {spec.name} names it)")
    return task


_LM_EVAL_FIELDS = {"process_docs", "process_results", "filter_list", "fewshot_config", "use_prompt", "gen_prefix",
                   "doc_to_image", "doc_to_audio", "custom_dataset", "aggregate_metric_list"}


def _split_files(data_files: Any, split: Any, path: Path, where: str, split_where: str) -> list[Path]:
    if isinstance(data_files, str) or (isinstance(data_files, list) and data_files):
        chosen = data_files if isinstance(data_files, list) else [data_files]
        if split != "train":
            raise InvalidArgument(f"{split_where}: data_files given as a path or a list are the split 'train', "
                                  f"not {split!r}")
    elif isinstance(data_files, _Map) and data_files:
        if split not in data_files:
            raise InvalidArgument(f"{where}: data_files has no split {split!r} "
                                  f"(it has {', '.join(map(str, data_files))})")
        chosen = data_files[split]
        chosen = chosen if isinstance(chosen, list) else [chosen]
    else:
        raise InvalidArgument(f"{where}: data_files must be a path, a list of paths or a mapping of splits to paths")
    out = []
    for name in chosen:
        if not isinstance(name, str):
            raise InvalidArgument(f"{where}: data_files must name files, got {name!r}")
        file = Path(name).expanduser()
        out.append(file if file.is_absolute() else path.parent / file)
    return out


def _read_rows(files: Sequence[Path], limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for file in files:
        try:
            handle = file.open(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidArgument(f"data file {file} does not exist") from None
        except OSError as e:
            raise InvalidArgument(f"cannot read data file {file}: {e}") from None
        with handle:
            try:
                for number, line in enumerate(handle, 1):
                    if limit is not None and len(rows) >= limit:
                        return rows
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise InvalidArgument(f"{file}:{number}: not valid JSON: {e.msg}") from None
                    if not isinstance(doc, dict):
                        raise InvalidArgument(f"{file}:{number}: a row must be a JSON object")
                    rows.append(Row(number, file, doc))
            except UnicodeDecodeError:
                raise InvalidArgument(f"{file}: not UTF-8 text") from None
    return rows


def _spec(name: str, value: Any, where: str, features: set[str], env, *, allow_list: bool) -> Spec:
    from jinja2 import TemplateSyntaxError, meta

    line = int(where.rsplit(":", 1)[1])
    if isinstance(value, bool) or not isinstance(value, (str, int, list, dict)):
        raise InvalidArgument(f"{where}: {name} must be a field name or a template{', a list' if allow_list else ''}"
                              f", got {value!r}")
    if isinstance(value, (list, dict)):
        if not allow_list:
            raise InvalidArgument(f"{where}: {name} must be a field name or a template, got a "
                                  f"{type(value).__name__}")
        choices = list(value.values()) if isinstance(value, dict) else value
        if not all(isinstance(c, str) for c in choices):
            raise InvalidArgument(f"{where}: the choices of {name} must be strings")
        return Spec(name, choices, line)
    if isinstance(value, int):
        return Spec(name, value, line)
    if value in features:
        return Spec(name, value, line, fields=frozenset([value]))
    if _IDENTIFIER.fullmatch(value) and name != "description":  # a field name no row has
        raise InvalidArgument(f"{where}: {name} names the field {value!r}, which no row has "
                              f"(rows have {', '.join(sorted(features)) or 'no fields'})")
    try:
        parsed = env.parse(value)
        template = env.from_string(value)
    except TemplateSyntaxError as e:
        raise InvalidArgument(f"{where}: {name} is not a valid Jinja template: {e.message}") from None
    return Spec(name, value, line, template, frozenset(meta.find_undeclared_variables(parsed)))


def _metrics(metric_list: Any, output_type: str, at: Callable, path: Path) -> list[Metric]:
    known = MC_METRICS if output_type == "multiple_choice" else GEN_METRICS
    if metric_list is None:
        return [Metric(name, {}, 1) for name in DEFAULT_METRICS[output_type]]
    if not isinstance(metric_list, list) or not metric_list:
        raise InvalidArgument(f"{at('metric_list')}: metric_list must be a list of {{metric: NAME}} entries")
    out, seen = [], set()
    for entry in metric_list:
        if not isinstance(entry, _Map):
            raise InvalidArgument(f"{at('metric_list')}: each metric_list entry is a mapping with a metric, "
                                  f"got {entry!r}")
        line = entry.line
        name = entry.get("metric")
        if name is None:
            raise InvalidArgument(f"{path}:{line}: the metric_list entry has no metric")
        if name not in known:
            raise InvalidArgument(f"{path}:{entry.lines['metric']}: unknown metric {name!r} for a {output_type} task "
                                  f"(use {', '.join(known)})")
        if name in seen:
            raise InvalidArgument(f"{path}:{line}: the metric {name!r} is listed twice")
        seen.add(name)
        if entry.get("aggregation", "mean") != "mean":
            raise InvalidArgument(f"{path}:{entry.lines['aggregation']}: aggregation must be mean, "
                                  f"got {entry['aggregation']!r}")
        options = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}
        unknown = sorted(set(options) - METRIC_OPTIONS.get(name, set()))
        if unknown:
            raise InvalidArgument(f"{path}:{entry.lines[unknown[0]]}: {name} takes no option {unknown[0]!r}"
                                  + (f" (it takes {', '.join(sorted(METRIC_OPTIONS[name]))})"
                                     if METRIC_OPTIONS.get(name) else ""))
        metric = Metric(name, options, line)
        if name == "checker":
            if "function" not in options:
                raise InvalidArgument(f"{path}:{line}: the checker metric needs function: package.module:function")
            metric.function = load_checker(options["function"], f"{path}:{entry.lines['function']}")
        if name == "regex_match":
            if not isinstance(options.get("pattern"), str):
                raise InvalidArgument(f"{path}:{line}: regex_match needs pattern: a regular expression")
            try:
                metric.pattern = re.compile(options["pattern"])
            except re.error as e:
                raise InvalidArgument(f"{path}:{entry.lines['pattern']}: pattern is not a valid regular "
                                      f"expression: {e}") from None
        ignore = options.get("regexes_to_ignore", [])
        if not (isinstance(ignore, list) and all(isinstance(r, str) for r in ignore)):
            raise InvalidArgument(f"{path}:{entry.lines['regexes_to_ignore']}: regexes_to_ignore must be a list of "
                                  "regular expressions")
        out.append(metric)
    return out


def _generation(task: Task, gen: _Map, at: Callable) -> None:
    unknown = sorted(set(gen) - GENERATION_KEYS, key=str)
    if unknown:
        raise InvalidArgument(f"{at(unknown[0])}: generation_kwargs takes no {unknown[0]!r} "
                              f"(it takes {', '.join(sorted(GENERATION_KEYS))})")
    if gen.get("do_sample") or (gen.get("temperature") or 0) > 0:
        key = "do_sample" if gen.get("do_sample") else "temperature"
        raise InvalidArgument(f"{at(key)}: emergence eval generates greedily (do_sample false, temperature 0)")
    until = gen.get("until", ["\n\n"])  # lm_eval's default: the few-shot delimiter
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise InvalidArgument(f"{at('until')}: until must be a string or a list of strings")
    task.until = [s for s in until if s]
    key = next((k for k in ("max_gen_toks", "max_new_tokens") if k in gen), None)
    if key is not None:
        value = gen[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgument(f"{at(key)}: {key} must be an integer >= 1, got {value!r}")
        task.max_gen_toks = value


def load_checker(name: Any, where: str) -> Callable:
    """`package.module:function` -> the function."""
    if not isinstance(name, str) or name.count(":") != 1 or not all(name.split(":")):
        raise InvalidArgument(f"{where}: a checker is named package.module:function, got {name!r}")
    module_name, function_name = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidArgument(f"{where}: cannot import the checker's module {module_name!r}: {e}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidArgument(f"{where}: the module {module_name!r} has no function {function_name!r}")
    return function


# ------------------------------------------------------------------------------ rows -> requests
def _render(spec: Spec, row: Row) -> Any:
    """What lm_eval's doc_to_* gives for a row (before its type rules)."""
    if spec.template is None:
        return row.doc[spec.value] if isinstance(spec.value, str) else spec.value
    try:
        return spec.template.render(**row.doc)
    except Exception as e:  # noqa: BLE001 (a template's error is the task's, reported in one line)
        raise InvalidArgument(f"{row.file}:{row.line}: the task's {spec.name} (line {spec.line}) fails on this "
                              f"row: {type(e).__name__}: {e}") from None


def doc_to_text(task: Task, row: Row) -> str:
    text = _render(task.text, row)
    if not isinstance(text, str) or (task.choice is not None and text.isdigit() and task.text.template is not None):
        raise InvalidArgument(f"{row.file}:{row.line}: doc_to_text gives {text!r}, not a prompt "
                              "(one prompt per choice, Winogrande style, is not supported)")
    return text


def doc_to_choice(task: Task, row: Row) -> list[str]:
    value = _render(task.choice, row)
    if task.choice.template is not None:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise InvalidArgument(f"{row.file}:{row.line}: doc_to_choice gives {value!r}, "
                                  "not a list of strings") from None
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise InvalidArgument(f"{row.file}:{row.line}: doc_to_choice gives {value!r}, not a list of strings")
    return value


def doc_to_target(task: Task, row: Row) -> Any:
    value = _render(task.target, row)
    if task.target.template is not None:  # lm_eval's rules for a rendered target
        if value.isdigit() and task.choice is not None:
            return ast.literal_eval(value)
        if len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            try:
                return ast.literal_eval(value)
            except (SyntaxError, ValueError):
                return value
    return value


def context(task: Task, row: Row) -> str:
    """The prompt: description + doc_to_text (zero-shot, lm_eval's plain-text rendering)."""
    text = doc_to_text(task, row)
    if task.description is not None:
        description = _render(task.description, row)
        text = str(description) + text
    return text


def gold_indices(task: Task, row: Row, choices: list[str]) -> list[int]:
    """The target as choice indices (several for a multiple-target row)."""
    target = doc_to_target(task, row)
    targets = target if isinstance(target, list) else [target]
    out = []
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, str)):
            raise InvalidArgument(f"{row.file}:{row.line}: the target {t!r} is neither a choice index nor a choice")
        if isinstance(t, int):
            if not 0 <= t < len(choices):
                raise InvalidArgument(f"{row.file}:{row.line}: the target {t} is not an index of the "
                                      f"{len(choices)} choices")
            out.append(t)
        elif t in choices:
            out.append(choices.index(t))
        else:
            raise InvalidArgument(f"{row.file}:{row.line}: the target {t!r} is not one of the choices")
    if not out:
        raise InvalidArgument(f"{row.file}:{row.line}: the row has no target")
    return out


def encode_pair(tokenizer: Tokenizer, context_text: str, continuation: str, *,
                add_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm_eval's causal models split them."""
    bos = tokenizer.add_bos if add_bos is None else add_bos
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    def encode(text: str, special: bool | None = None) -> list[int]:
        with_bos = bos if special is None else special
        if special is None and with_bos and prefix is not None and \
                text.startswith(tokenizer.decode([prefix], skip_special_tokens=False)):
            with_bos = False  # the text already starts with BOS (lm_eval's has_bos_prefix)
        return tokenizer.encode(text, add_bos=with_bos and tokenizer.bos_id is not None)

    if context_text == "":
        if prefix is None:
            raise InvalidArgument("an empty prompt needs a BOS or EOS token to condition on; "
                                  "this tokenizer has neither")
        cont = encode(continuation, special=False)
        if not cont:
            raise InvalidArgument(f"the continuation {continuation!r} has no tokens")
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context_text) - len(context_text.rstrip())
    if spaces:
        continuation = context_text[-spaces:] + continuation
        context_text = context_text[:-spaces]
    whole = encode(context_text + continuation)
    ctx = encode(context_text)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[tuple[list[int], list[int]]], *,
                   batch_size: int = 32) -> list[tuple[float, bool]]:
    """(sum of log P(continuation | context), whether greedy decoding gives the continuation) for
    every (context ids, continuation ids) pair, batched as lm_eval's hf model batches them, so
    that the same batch size gives the same numbers: requests whose model input (context +
    continuation[:-1]) is the same share one row (the one with the longest continuation);
    rows go longest first, batch_size at a time, right-padded, one forward pass per batch; the
    output head runs only where a continuation token is predicted, and each request's
    log-probabilities are summed in fp32. A pair longer than the context window keeps its last
    block_size + 1 tokens."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument(f"batch size must be an integer >= 1, got {batch_size!r}")
    window = model.config.block_size
    device = next(model.parameters()).device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise InvalidArgument("each log-likelihood request needs a context token and a continuation token")
        if len(cont) > window:
            raise InvalidArgument(f"a continuation of {len(cont)} tokens exceeds the context window of {window}")
        groups.setdefault((*ctx, *cont[:-1]), []).append(i)
    reps = [max(members, key=lambda i: len(requests[i][1])) for members in groups.values()]
    members_of = dict(zip(reps, groups.values()))
    whole = {i: list(requests[i][0]) + list(requests[i][1]) for i in reps}
    reps.sort(key=lambda i: (-len(whole[i]), tuple(whole[i])))
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for start in range(0, len(reps), batch_size):
        chunk = reps[start:start + batch_size]
        inputs = [whole[i][-(window + 1):][:-1] for i in chunk]
        ids = torch.zeros(len(chunk), max(len(x) for x in inputs), dtype=torch.long)
        rows, cols, spans = [], [], []
        for b, (i, inp) in enumerate(zip(chunk, inputs)):
            ids[b, :len(inp)] = torch.tensor(inp)
            n = len(requests[i][1])
            rows += [b] * n
            cols += range(len(inp) - n, len(inp))
            spans.append(n)
        hidden = model.hidden_states(ids.to(device))
        logits = model.head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
        logp = logits.float().log_softmax(dim=-1)
        greedy = logp.argmax(dim=-1)
        offset = 0
        for i, n in zip(chunk, spans):
            for j in members_of[i]:  # the requests this row answers: each reads its own last positions
                cont = torch.tensor(requests[j][1], device=device)
                k = len(cont)
                own = logp[offset + n - k:offset + n]
                chosen = own.gather(1, cont[:, None])[:, 0]
                results[j] = (chosen.sum().item(), bool((greedy[offset + n - k:offset + n] == cont).all()))
            offset += n
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------ metrics
def _normalise(text: str, options: dict[str, Any]) -> str:
    """lm_eval's exact_match preprocessing (HF evaluate's exact_match)."""
    for pattern in options.get("regexes_to_ignore") or ():
        text = re.sub(pattern, "", text)
    if options.get("ignore_case"):
        text = text.lower()
    if options.get("ignore_punctuation"):
        text = text.translate(str.maketrans("", "", string.punctuation))
    if options.get("ignore_numbers"):
        text = text.translate(str.maketrans("", "", string.digits))
    return text


def exact_match(prediction: str, reference: str, **options) -> float:
    return float(_normalise(prediction, options) == _normalise(reference, options))


def regex_extract(prediction: str, pattern: str | re.Pattern, group: int | str | None = None) -> str | None:
    """The answer a pattern extracts: its first match's `group` (default: group 1 if the pattern
    has groups, else the whole match), or None without a match."""
    pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
    match = pattern.search(prediction)
    if match is None:
        return None
    if group is None:
        group = 1 if pattern.groups else 0
    return match.group(group)


def regex_match(prediction: str, reference: str, pattern: str | re.Pattern, group: int | str | None = None,
                **options) -> float:
    found = regex_extract(prediction, pattern, group)
    return 0.0 if found is None else exact_match(found, reference, **options)


def _squad_normalise(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of a prediction against one reference."""
    pred, ref = _squad_normalise(prediction).split(), _squad_normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common: dict[str, int] = {}
    counts = {}
    for t in ref:
        counts[t] = counts.get(t, 0) + 1
    for t in pred:
        if counts.get(t, 0) > 0:
            counts[t] -= 1
            common[t] = common.get(t, 0) + 1
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_generation(metric: Metric, prediction: str, targets: list[str], row: Row, target: Any) -> float:
    if metric.name == "exact_match":
        return max(exact_match(prediction, t, **metric.options) for t in targets)
    if metric.name == "regex_match":
        options = {k: v for k, v in metric.options.items() if k not in ("pattern", "group")}
        return max(regex_match(prediction, t, metric.pattern, metric.options.get("group"), **options) for t in targets)
    if metric.name == "f1":
        return max(f1(prediction, t) for t in targets)
    try:
        value = metric.function(prediction, target, row.doc)
    except Exception as e:  # noqa: BLE001 (the checker's failure, reported with its row)
        raise InvalidArgument(f"{row.file}:{row.line}: the checker {metric.options['function']} failed: "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(value, bool) or isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    raise InvalidArgument(f"{row.file}:{row.line}: the checker {metric.options['function']} returned {value!r}, "
                          "not a bool or a number")


def mean_stderr(values: Sequence[float]) -> float | None:
    """The standard error of the mean: sample standard deviation / sqrt(n) (lm_eval's)."""
    n = len(values)
    if n < 2:
        return None
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


# ------------------------------------------------------------------------------ evaluation
@dataclass
class Result:
    task: str
    output_type: str
    n: int
    metrics: dict[str, tuple[float, float | None]]  # name -> (mean, stderr)
    items: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "output_type": self.output_type, "n": self.n,
                "metrics": {k: {"value": v, "stderr": s} for k, (v, s) in self.metrics.items()}}

    def table(self) -> str:
        lines = [f"{'task':<20} {'metric':<16} {'value':>8}   {'stderr':>8}   n"]
        for name, (value, stderr) in self.metrics.items():
            err = f"{stderr:8.4f}" if stderr is not None else f"{'N/A':>8}"
            lines.append(f"{self.task:<20} {name:<16} {value:8.4f} ± {err}   {self.n}")
        return "\n".join(lines)


def load_program(path: str | Path):
    """--program: a prompt program (emergence.prompts), which answers each row of a generation
    task in place of the task's prompt and greedy completion: the row's fields are its inputs,
    its output the prediction the metrics score."""
    try:
        prompts = importlib.import_module("emergence.prompts")
    except ModuleNotFoundError as e:
        if e.name not in ("emergence.prompts",):
            raise
        raise InvalidArgument("--program needs prompt programs (emergence.prompts), which this version of "
                              "emergence does not have yet") from None
    hook = getattr(prompts, "load_program", None)
    if not callable(hook):
        raise InvalidArgument("--program: emergence.prompts has no load_program(path), the hook emergence eval calls")
    return hook(path)


def evaluate(lm, task: Task | str | Path, *, limit: int | None = None, batch_size: int = 32,
             add_bos: bool | None = None, program: str | Path | Callable | None = None) -> Result:
    """Score `lm` (an emergence.LanguageModel) on a task (a Task or a task file)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgument(f"limit must be an integer >= 1, got {limit!r}")
    if not isinstance(task, Task):
        task = load_task(task, limit=limit)
    elif limit is not None:
        task = Task(**{**task.__dict__, "rows": task.rows[:limit]})
    if isinstance(program, (str, Path)):
        program = load_program(program)
    if task.output_type == "multiple_choice":
        if program is not None:
            raise InvalidArgument(f"{task.path}: --program answers generate_until tasks; "
                                  f"{task.name} is multiple_choice")
        items = _multiple_choice(lm, task, batch_size, add_bos)
    else:
        items = _generate(lm, task, add_bos, program)
    metrics = {}
    for metric in task.metrics:
        values = [item[metric.name] for item in items]
        metrics[metric.name] = (sum(values) / len(values), mean_stderr(values))
    return Result(task.name, task.output_type, len(items), metrics, items)


def _multiple_choice(lm, task: Task, batch_size: int, add_bos: bool | None) -> list[dict]:
    from .api import require_decoder_only

    require_decoder_only(lm.config, "multiple-choice scoring")
    names = {m.name for m in task.metrics}
    mutual = "acc_mutual_info" in names
    per_row, requests = [], []
    for row in task.rows:
        ctx = context(task, row)
        choices = doc_to_choice(task, row)
        gold = gold_indices(task, row, choices)
        conts = [task.target_delimiter + c for c in choices]
        pairs = [(ctx, c) for c in conts] + ([("", c) for c in conts] if mutual else [])
        encoded = []
        for c, t in pairs:
            ids = encode_pair(lm.tokenizer, c, t, add_bos=add_bos)
            if not ids[1]:
                raise InvalidArgument(f"{row.file}:{row.line}: the choice {t!r} has no tokens of its own")
            if not ids[0]:
                raise InvalidArgument(f"{row.file}:{row.line}: the prompt has no tokens (and no BOS)")
            encoded.append(ids)
        per_row.append((row, ctx, choices, gold, len(requests), len(encoded)))
        requests += encoded
    scores = loglikelihoods(lm.model, requests, batch_size=batch_size)
    items = []
    for index, (row, ctx, choices, gold, start, count) in enumerate(per_row):
        got = scores[start:start + count]
        lls = [ll for ll, _ in got[:len(choices)]]
        greedy = [g for _, g in got[:len(choices)]]
        item: dict[str, Any] = {"doc_id": index, "file": str(row.file), "line": row.line, "context": ctx,
                                "choices": choices, "target": gold if len(gold) > 1 else gold[0],
                                "loglikelihoods": lls, "is_greedy": greedy}
        pred = _argmax(lls)
        pred_norm = _argmax([ll / len(c) if len(c) else _div(ll) for ll, c in zip(lls, choices)])
        item["pred"], item["pred_norm"] = pred, pred_norm
        if "acc" in names:
            item["acc"] = float(pred in gold)
        if "acc_norm" in names:
            item["acc_norm"] = float(pred_norm in gold)
        if "acc_bytes" in names:
            nbytes = [len(c.encode("utf-8")) for c in choices]
            item["acc_bytes"] = float(_argmax([ll / n if n else _div(ll) for ll, n in zip(lls, nbytes)]) in gold)
        if mutual:
            unconditional = [ll for ll, _ in got[len(choices):]]
            item["unconditional_loglikelihoods"] = unconditional
            item["acc_mutual_info"] = float(_argmax([a - b for a, b in zip(lls, unconditional)]) in gold)
        items.append(item)
    return items


def _div(ll: float) -> float:
    """ll / 0 as numpy computes it (lm_eval divides arrays): -inf, +inf or nan."""
    return math.copysign(math.inf, ll) if ll != 0 else math.nan


def _argmax(values: Sequence[float]) -> int:
    """numpy.argmax: the first maximum, a nan counting as the maximum."""
    best = 0
    for i, v in enumerate(values):
        if math.isnan(v):
            return i
        if v > values[best]:
            best = i
    return best


def _generate(lm, task: Task, add_bos: bool | None, program) -> list[dict]:
    from .generate import generate
    from .sampling import SamplingParams

    block = lm.model.config.block_size
    if task.max_gen_toks >= block:
        raise InvalidArgument(f"{task.path}: max_gen_toks {task.max_gen_toks} leaves no room for a prompt in the "
                              f"context window of {block}")
    room = block - task.max_gen_toks
    prompts, contexts, targets, raw_targets = [], [], [], []
    for row in task.rows:
        ctx = context(task, row) if program is None else ""
        target = doc_to_target(task, row)
        if task.choice is not None:  # lm_eval: the target indexes the choices
            choices = doc_to_choice(task, row)
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < len(choices):
                raise InvalidArgument(f"{row.file}:{row.line}: the target {target!r} is not an index of the "
                                      f"{len(choices)} choices")
            target = choices[target]
        refs = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        if not refs:
            raise InvalidArgument(f"{row.file}:{row.line}: the row has no target")
        contexts.append(ctx)
        targets.append(refs)
        raw_targets.append(target)
        if program is not None:
            continue
        bos = lm.tokenizer.add_bos if add_bos is None else add_bos
        ids = lm.tokenizer.encode(ctx, add_bos=bos and lm.tokenizer.bos_id is not None)
        if not ids:
            start = lm.tokenizer.bos_id if lm.tokenizer.bos_id is not None else lm.tokenizer.eos_id
            ids = [start] if start is not None else ids
        if len(ids) > room:  # lm_eval keeps the prompt's end, leaving room for max_gen_toks
            ids = ids[-room:]
        prompts.append(ids)
    if program is not None:
        outputs = _run_program(lm, program, task)
    else:
        params = SamplingParams(temperature=0.0, max_new_tokens=task.max_gen_toks, stop=tuple(task.until))
        completions = generate(lm.model, lm.tokenizer, prompts, params, truncate=True, backend=lm.backend)
        outputs = [{"context": ctx, "prediction": c.text, "finish_reason": c.finish_reason}
                   for ctx, c in zip(contexts, completions)]
    items = []
    for index, (row, output, refs, target) in enumerate(zip(task.rows, outputs, targets, raw_targets)):
        item: dict[str, Any] = {"doc_id": index, "file": str(row.file), "line": row.line, **output, "target": target}
        for metric in task.metrics:
            item[metric.name] = score_generation(metric, output["prediction"], refs, row, target)
        items.append(item)
    return items


def _run_program(lm, program, task: Task) -> list[dict]:
    """Each row through a prompt program: the row's fields (those the program declares, if it
    declares any) are its inputs; its output is the prediction."""
    from .prompts import LocalBackend

    backend = LocalBackend(lm)
    declared = getattr(program, "declared", False)
    out = []
    for row in task.rows:
        inputs = {k: v for k, v in row.doc.items() if not declared or k in program.inputs}
        try:
            trace = program.run(backend, inputs)
        except InvalidArgument as e:
            raise InvalidArgument(f"{row.file}:{row.line}: the prompt program fails on this row: {e}") from None
        out.append({"prediction": str(trace.output), "trace": trace.to_dict()})
    return out


def write_items(result: Result, path: str | Path) -> None:
    """Every row's result, one JSON object a line."""
    with open(path, "w", encoding="utf-8") as f:
        for item in result.items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
