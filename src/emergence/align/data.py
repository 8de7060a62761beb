"""Preference data: JSONL rows {prompt, chosen, rejected[, margin]} -> token ids with completion masks.

    file.jsonl --read_jsonl--> rows --to_pair--> PreferencePair(chosen, rejected: Example(ids, mask), margin)
               --load_pairs (identical pairs skipped, over-long ones dropped)--> collate --> PreferenceBatch

**Row forms** (each row on its own; TRL's explicit-prompt preference formats):

    text   {"prompt": str, "chosen": str, "rejected": str}
    chat   any of them a message list [{"role", "content"}]: a prompt string is one user message,
           a chosen / rejected string one assistant message; the prompt may hold a whole earlier
           conversation, a completion several messages (at least one the assistant's)
    both   optional "margin": a number (the reward model loss's margin)

**The masks**: the completion's tokens, and only them, are true. A text row is the SFT
"completion" row prompt + completion + EOS (trained on the completion and EOS); a chat row is
prompt + completion rendered with the chat template, trained on the assistant messages of the
completion only (not on earlier assistant turns of the prompt), located by incremental rendering
(finetune/data.py: assistant_spans). Rows whose chosen equals rejected say nothing about a
preference: they are counted and skipped. A bad row stops the load with one line naming its
file and line.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..chat import ChatTemplate
from ..errors import InvalidArgument
from ..finetune.data import ROLES, Example, _messages, _with_bos, assistant_spans, read_jsonl, to_example
from ..tokenizer import Tokenizer

KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    chosen: Example  # prompt + chosen completion; mask true on the completion's tokens
    rejected: Example  # prompt + rejected completion
    margin: float | None
    where: str  # "file.jsonl:12"


class PreferenceBatch(NamedTuple):
    input_ids: torch.Tensor  # (2B, L) int64: the B chosen rows, then the B rejected rows; right-padded
    completion_mask: torch.Tensor  # (2B, L) bool: completion tokens (false on prompt and padding)
    margin: torch.Tensor | None  # (B,) float32, when the pairs have margins


def _margin(row: dict, where: str) -> float | None:
    value = row.get("margin")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)


def _part(value: Any, key: str, role: str, where: str) -> list[dict[str, str]]:
    """A prompt / chosen / rejected value as messages: a string is one `role` message."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"{where}: '{key}' must be a string or a non-empty list of messages, "
                              f"got {type(value).__name__}")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InvalidArgument(f"{where}: {key}[{i}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InvalidArgument(f"{where}: {key}[{i}] has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _chat_example(prompt: list[dict[str, str]], completion: list[dict[str, str]], key: str, where: str,
                  tokenizer: Tokenizer, template: ChatTemplate) -> Example:
    if not any(m["role"] == "assistant" for m in completion):
        raise InvalidArgument(f"{where}: '{key}' has no assistant message: nothing to prefer")
    conversation = _messages({"messages": prompt + completion}, "chat", where)  # roles, order, empty answers
    text, spans = assistant_spans(conversation, template, tokenizer, where)
    spans = spans[sum(m["role"] == "assistant" for m in prompt):]  # the completion's answers only
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(start < end <= stop for start, stop in spans) for _, end in encoding.offsets]
    ids, mask = _with_bos(list(encoding.ids), mask, text, tokenizer)
    return Example(ids, mask, where)


def to_pair(row: dict, where: str, tokenizer: Tokenizer, template: ChatTemplate) -> PreferencePair | None:
    """One row -> its chosen and rejected examples; None when chosen equals rejected."""
    missing = [k for k in KEYS if k not in row]
    if missing:
        raise InvalidArgument(f"{where}: preference row is missing {', '.join(repr(k) for k in missing)} "
                              "(rows are {prompt, chosen, rejected[, margin]})")
    margin = _margin(row, where)
    prompt, chosen, rejected = (row[k] for k in KEYS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        if chosen == rejected:
            return None
        pair = [to_example({"prompt": prompt, "completion": c}, "completion", where, tokenizer, template)
                for c in (chosen, rejected)]
        return PreferencePair(*pair, margin, where)
    prompt_msgs = _part(prompt, "prompt", "user", where)
    chosen_msgs = _part(chosen, "chosen", "assistant", where)
    rejected_msgs = _part(rejected, "rejected", "assistant", where)
    if chosen_msgs == rejected_msgs:
        return None
    pair = [_chat_example(prompt_msgs, msgs, key, where, tokenizer, template)
            for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs))]
    return PreferencePair(*pair, margin, where)


def load_pairs(paths: Sequence[str | Path], tokenizer: Tokenizer, template: ChatTemplate, *,
               max_length: int | None = None) -> tuple[list[PreferencePair], dict[str, int]]:
    """Every row of every file as a PreferencePair, and a report: rows read, pairs kept,
    identical (chosen == rejected, skipped), too_long (chosen or rejected over max_length
    tokens, dropped)."""
    if isinstance(paths, (str, Path)) or not paths:
        raise InvalidArgument("give a list of one or more JSONL preference files")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise InvalidArgument(f"max_length must be an integer >= 2, got {max_length!r}")
    pairs: list[PreferencePair] = []
    report = {"rows": 0, "pairs": 0, "identical": 0, "too_long": 0}
    for path in paths:
        for where, row in read_jsonl(path):
            report["rows"] += 1
            pair = to_pair(row, where, tokenizer, template)
            if pair is None:
                report["identical"] += 1
            elif max_length is not None and max(len(pair.chosen.ids), len(pair.rejected.ids)) > max_length:
                report["too_long"] += 1
            else:
                pairs.append(pair)
    report["pairs"] = len(pairs)
    if not pairs:
        raise InvalidArgument(f"no preference pairs in {', '.join(map(str, paths))}: of {report['rows']} rows, "
                              f"{report['identical']} have chosen == rejected and {report['too_long']} exceed "
                              f"max_length {max_length}")
    return pairs, report


def collate(pairs: Sequence[PreferencePair], pad_token_id: int) -> PreferenceBatch:
    """B pairs -> one batch of 2B rows (chosen first, as the losses' chunk(2) expects), right-padded
    with pad_token_id. For a reward model, whose score is the last token that is not padding, pick
    a pad token other than EOS, or the EOS that ends each completion reads as padding."""
    if not pairs:
        raise InvalidArgument("collate() needs at least one pair")
    with_margin = [p.margin is not None for p in pairs]
    if any(with_margin) and not all(with_margin):
        bare = pairs[with_margin.index(False)]
        raise InvalidArgument(f"{bare.where}: this row has no 'margin' but others in its batch do")
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        input_ids[i, :len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        completion_mask[i, :len(r.mask)] = torch.tensor(r.mask, dtype=torch.bool)
    margin = torch.tensor([p.margin for p in pairs], dtype=torch.float32) if all(with_margin) else None
    return PreferenceBatch(input_ids, completion_mask, margin)
