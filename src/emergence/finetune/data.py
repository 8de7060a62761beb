"""Instruction-tuning (SFT) data: JSONL rows -> token ids with a loss mask -> packed batches.

    file.jsonl --read_jsonl--> rows --detect_format / to_example--> Example(ids, mask)
               --load_examples (drop or truncate to context+1)--> split_held_out --> pack --> batch

**Formats** (`FORMATS`, detected per file from its first row; every later row must match):

    alpaca      {"instruction", "output"[, "input"][, "system"]}
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content"}]}
    sharegpt    {"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}
    completion  {"prompt", "completion"}

**The loss mask**: chat-shaped rows (alpaca, chat, sharegpt) are rendered with the chat
template and trained on every assistant turn only. An assistant message's characters are
found by rendering the conversation incrementally, never by searching the text for template
markers: message k spans [len(render(msgs[:k], add_generation_prompt=True)),
len(render(msgs[:k+1]))). So the span holds the answer and the end-of-turn text the template
writes after it ("<|im_end|>\\n", "<|eot_id|>"; the model learns to stop), but not the
generation prompt before it. A template whose renderings are not prefixes of each other
(one that numbers messages, or rewrites earlier turns) is refused.

The full text is tokenized once; token i is trained when its last character lies in an
assistant span (its end offset e satisfies start < e <= end). A token straddling the start
of a span (a leading space merged into the answer's first word) is trained: only it can
produce those characters. A token straddling the end (answer text merged with the next
message) is not: it writes text of a message the model must not learn to write.

BOS: prepended (untrained) when the tokenizer adds BOS and the text does not already start
with it (most templates write `bos_token` themselves). EOS: chat rows get none appended, the
template's end-of-turn is the stop; completion rows are prompt + completion + EOS, trained on
the completion and EOS (as TRL does).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..chat import ChatTemplate, template_variables
from ..errors import InvalidArgument
from ..files import read_jsonl  # the rows' reader (re-exported: align and rl read rows through it)
from ..tokenizer import Tokenizer
from ..train.objectives import IGNORE_INDEX

FORMATS = ("alpaca", "chat", "sharegpt", "completion")
# format -> the keys a row of it must have (detection tries FORMATS in order).
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "completion": ("prompt", "completion"),
}
_FORMAT_HELP = ("alpaca {instruction, output[, input, system]}, chat {messages: [{role, content}]}, "
                "sharegpt {conversations: [{from, value}]}, completion {prompt, completion}")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}


@dataclass
class Example:
    """One row: ids (T,), mask (T,) with mask[i] True when token i is a training target."""

    ids: list[int]
    mask: list[bool]
    where: str  # "file.jsonl:12", for messages


@dataclass
class Packed:
    """Examples laid end to end: ids / mask / segments (T,), segments[i] = which example (0, 1, ...)."""

    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)


class SFTBatch(NamedTuple):
    inputs: torch.Tensor  # (B, L) int64; padding 0
    targets: torch.Tensor  # (B, L) int64; IGNORE_INDEX where no loss (prompt, boundaries, padding)
    segments: torch.Tensor  # (B, L) int64; example index within the row, -1 on padding


# ------------------------------------------------------------------ reading rows
def detect_format(row: dict, where: str) -> str:
    """The first format of FORMATS whose keys the row has; else InvalidArgument saying what is missing."""
    for fmt in FORMATS:
        if all(key in row for key in FORMAT_KEYS[fmt]):
            return fmt
    for fmt in FORMATS:  # a partial match: name what it lacks
        if any(key in row for key in FORMAT_KEYS[fmt]):
            missing = ", ".join(repr(k) for k in FORMAT_KEYS[fmt] if k not in row)
            raise InvalidArgument(f"{where}: {fmt} row is missing {missing}")
    raise InvalidArgument(f"{where}: unknown row format (keys: {', '.join(sorted(row)) or 'none'}); "
                          f"known formats: {_FORMAT_HELP}")


def _check_format(row: dict, fmt: str, where: str) -> None:
    """A row of a file whose format (from its first row) is `fmt` must be a `fmt` row."""
    missing = [k for k in FORMAT_KEYS[fmt] if k not in row]
    if not missing:
        return
    other = next((f for f in FORMATS if all(k in row for k in FORMAT_KEYS[f])), None)
    if other:
        raise InvalidArgument(f"{where}: a {other} row in a {fmt} file (the first row sets the format; "
                              "formats cannot be mixed in one file)")
    raise InvalidArgument(f"{where}: {fmt} row is missing {', '.join(repr(k) for k in missing)}")


def _string(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where}: {name} must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict, fmt: str, where: str) -> list[dict[str, str]]:
    """A chat-shaped row as [{"role", "content"}], checked: known roles, a first message that
    is not the assistant's, at least one assistant turn, none of them blank."""
    if fmt == "alpaca":
        user = _string(row["instruction"], "'instruction'", where)
        extra = row.get("input")
        if extra is not None and _string(extra, "'input'", where):
            user += "\n\n" + extra
        answer = _string(row["output"], "'output'", where)
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if row.get("system") is not None:
            msgs.insert(0, {"role": "system", "content": _string(row["system"], "'system'", where)})
    else:
        key, role_key, text_key = (("messages", "role", "content") if fmt == "chat"
                                   else ("conversations", "from", "value"))
        items = row[key]
        if not isinstance(items, list) or not items:
            raise InvalidArgument(f"{where}: '{key}' must be a non-empty list, got {type(items).__name__}")
        msgs = []
        for i, item in enumerate(items):
            name = f"{key}[{i}]"
            if not isinstance(item, dict) or role_key not in item or text_key not in item:
                raise InvalidArgument(f"{where}: {name} must be an object with '{role_key}' and '{text_key}'")
            role = _string(item[role_key], f"{name}.{role_key}", where)
            role = role if fmt == "chat" else SHAREGPT_ROLES.get(role, role)
            if role not in ROLES:
                known = ROLES if fmt == "chat" else tuple(SHAREGPT_ROLES)
                raise InvalidArgument(f"{where}: {name} has unknown role {role!r} (known: {', '.join(known)})")
            msgs.append({"role": role, "content": _string(item[text_key], f"{name}.{text_key}", where)})
    roles = [m["role"] for m in msgs]
    if "assistant" not in roles:
        raise InvalidArgument(f"{where}: the conversation has no assistant turn: nothing to train on")
    if roles[0] == "assistant":
        raise InvalidArgument(f"{where}: the conversation starts with an assistant turn; "
                              "start it with a system or user message")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise InvalidArgument(f"{where}: assistant turn {roles[:i + 1].count('assistant')} (message {i}) is empty")
    return msgs


# ------------------------------------------------------------------ rows -> examples
def assistant_spans(messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Tokenizer,
                    where: str) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, [(start, end)] character spans of each assistant message in it), by
    incremental rendering (see the module docstring)."""
    variables = template_variables(tokenizer)

    def render(msgs: list[dict[str, str]], generation: bool = False) -> str:
        try:
            return template.render(msgs, add_generation_prompt=generation, **variables)
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e}") from None

    def check_prefix(shorter: str, longer: str, k: int) -> None:
        if not longer.startswith(shorter):
            raise InvalidArgument(f"{where}: chat template {template.name} does not render conversations "
                                  f"incrementally (the rendering up to message {k} is not a prefix of the next), "
                                  "so assistant tokens cannot be located; use a template that does (e.g. chatml)")

    text, spans = "", []
    for k, message in enumerate(messages):
        full = render(messages[:k + 1])
        if message["role"] == "assistant":
            head = render(messages[:k], generation=True)
            check_prefix(text, head, k)
            check_prefix(head, full, k)
            spans.append((len(head), len(full)))
        check_prefix(text, full, k)
        text = full
    return text, spans


def _with_bos(ids: list[int], mask: list[bool], text: str, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    if tokenizer.add_bos and not text.startswith(tokenizer.bos_token):
        return [tokenizer.bos_id, *ids], [False, *mask]
    return ids, mask


def to_example(row: dict, fmt: str, where: str, tokenizer: Tokenizer, template: ChatTemplate) -> Example:
    """One row of format `fmt` -> ids and loss mask (chat-shaped rows through `template`)."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    _check_format(row, fmt, where)
    if fmt == "completion":
        prompt = _string(row["prompt"], "'prompt'", where)
        completion = _string(row["completion"], "'completion'", where)
        if not completion.strip():
            raise InvalidArgument(f"{where}: the completion is empty")
        if tokenizer.eos_id is None:
            raise InvalidArgument("completion rows end with EOS, and this tokenizer has no EOS token")
        text, spans = prompt + completion, [(len(prompt), len(prompt + completion))]
    else:
        text, spans = assistant_spans(_messages(row, fmt, where), template, tokenizer, where)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    mask = [any(start < end <= stop for start, stop in spans) for _, end in encoding.offsets]
    if fmt == "completion":
        ids, mask = ids + [tokenizer.eos_id], mask + [True]
    ids, mask = _with_bos(ids, mask, text, tokenizer)
    return Example(ids, mask, where)


def load_examples(paths: Sequence[str | Path], tokenizer: Tokenizer, template: ChatTemplate, *, context: int,
                  truncate: bool = False) -> tuple[list[Example], dict]:
    """Every row of every file as an Example of at most context+1 tokens (a row of n tokens
    gives n-1 (input, target) pairs), and a report:

    rows: rows read; tokens / trained_tokens: in the kept examples (trained = scored targets,
    mask[1:]); dropped: rows longer than context+1 (or, with truncate, whose trained tokens all
    fall beyond the cut); truncated: rows cut to context+1 and kept; formats: {path: format}.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise InvalidArgument(f"context must be a positive integer, got {context!r}")
    if isinstance(paths, (str, Path)) or not paths:
        raise InvalidArgument("give a list of one or more JSONL data files")
    limit, examples = context + 1, []
    report: dict[str, Any] = {"rows": 0, "tokens": 0, "trained_tokens": 0, "dropped": 0, "truncated": 0, "formats": {}}
    for path in paths:
        rows = read_jsonl(path)
        fmt = report["formats"][str(path)] = detect_format(rows[0][1], rows[0][0])
        for where, row in rows:
            example = to_example(row, fmt, where, tokenizer, template)
            report["rows"] += 1
            cut = len(example.ids) > limit
            if cut and truncate:
                example = Example(example.ids[:limit], example.mask[:limit], where)
            if (cut and not truncate) or not any(example.mask[1:]):
                report["dropped"] += 1
                continue
            report["truncated"] += cut
            report["tokens"] += len(example.ids)
            report["trained_tokens"] += sum(example.mask[1:])
            examples.append(example)
    if not examples:
        why = "have no trained token within" if truncate else "are longer than"
        raise InvalidArgument(f"all {report['rows']} rows were dropped: they {why} context+1 = {limit} tokens "
                              f"(context {context})")
    return examples, report


# ------------------------------------------------------------------ splitting, packing, batching
def split_held_out(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held_out), each in the original order; round(n * fraction) held-out rows drawn
    with `seed`, at least 1 when fraction > 0 and n >= 2, and never all of them."""
    if not 0 <= fraction < 1:
        raise InvalidArgument(f"the held-out fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    count = round(n * fraction)
    if fraction > 0 and n >= 2:
        count = max(count, 1)
    count = min(count, max(n - 1, 0))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def _first_fit(lengths: Sequence[int], capacity: int) -> list[int]:
    """For each item in order, the first bin with room for it (a new one when none): a tree of
    the bins' largest free room finds it in O(log n)."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = [0] * (2 * size)  # room[size + b] = free room of bin b; unopened bins have `capacity`
    for b in range(size):
        room[size + b] = capacity
    for node in range(size - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])
    placed = []
    for n in lengths:
        node = 1
        while node < size:  # descend to the leftmost leaf with room >= n (always exists: size >= items)
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        placed.append(node - size)
        room[node] -= n
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return placed


def pack(examples: Sequence[Example], context: int) -> list[Packed]:
    """Greedy first-fit, in the given order, into rows of at most context+1 tokens."""
    limit = context + 1
    for e in examples:
        if len(e.ids) > limit:
            raise InvalidArgument(f"{e.where}: {len(e.ids)} tokens do not fit a row of context+1 = {limit}")
    rows: list[Packed] = []
    for e, b in zip(examples, _first_fit([len(e.ids) for e in examples], limit)):
        if b == len(rows):
            rows.append(Packed())
        row = rows[b]
        segment = row.segments[-1] + 1 if row.segments else 0
        row.ids += e.ids
        row.mask += e.mask
        row.segments += [segment] * len(e.ids)
    return rows


def batch(rows: Sequence[Example | Packed], length: int | None = None) -> SFTBatch:
    """rows -> SFTBatch of (B, L) tensors, L = longest row - 1 (or `length`), right-padded.

    inputs = ids[:-1]; targets[i] = ids[i+1] when token i+1 is trained and belongs to the same
    example as token i (no target crosses a packed boundary), else IGNORE_INDEX.
    """
    if not rows:
        raise InvalidArgument("batch() needs at least one row")
    longest = max(len(r.ids) for r in rows) - 1
    width = longest if length is None else length
    if longest > width:
        raise InvalidArgument(f"a row of {longest + 1} tokens does not fit length {width} (+1)")
    inputs = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        seg = r.segments if isinstance(r, Packed) else [0] * len(r.ids)
        n = len(r.ids) - 1
        inputs[b, :n] = torch.tensor(r.ids[:-1], dtype=torch.long)
        segments[b, :n] = torch.tensor(seg[:-1], dtype=torch.long)
        targets[b, :n] = torch.tensor([r.ids[i + 1] if r.mask[i + 1] and seg[i + 1] == seg[i] else IGNORE_INDEX
                                       for i in range(n)], dtype=torch.long)
    return SFTBatch(inputs, targets, segments)
