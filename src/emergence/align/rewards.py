"""Where GRPO's and PPO's rewards come from: a Python function, or a reward model.

A reward function is named `package.module:function` (or `path/to/file.py:function`) and is
called once per completion as

    function(prompt, completion, row) -> float

prompt: the row's prompt as written in the prompts file (text, a message list, or a problem's
question); completion: the sampled text; row: the whole JSONL row (a problem row with its
"answer"). A function that raises, or returns anything but a finite number (None, NaN, text),
has *failed* on that completion: the failure is counted, the completion gets no reward (NaN,
which GRPO leaves out of its group's statistics, PPO scores as 0) and the run goes on.

A reward model (align/reward.py) scores prompt + completion at the last token. It reads the
policy's token ids when both share a tokenizer. One with a tokenizer of its own (the files in its
folder) that differs gets the texts re-encoded; one without, whose vocabulary differs from the
policy's, is refused.

Built in, for the arithmetic word problems of problems.py:

    emergence.align.rewards:exact_answer   1.0 when extract_answer(completion) == row["answer"], else 0.0
    emergence.align.rewards:format_reward  1.0 when the completion states "Answer: N", else 0.0
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidArgument
from ..tokenizer import Tokenizer

RewardFunction = Callable[[object, str, dict], float]


# ---------------------------------------------------------------------- built-in rewards
def exact_answer(prompt: object, completion: str, row: dict) -> float:
    """1.0 when the completion's final answer (problems.extract_answer) is the row's "answer"."""
    from ..problems import extract_answer

    if "answer" not in row:
        raise KeyError("the row has no 'answer' (exact_answer scores problem rows)")
    expected = row["answer"]
    if isinstance(expected, str):  # a row read without problems.load_problems
        from ..problems import _answer_value

        expected = _answer_value(expected, "row")
    return 1.0 if extract_answer(completion) == expected else 0.0


_ANSWER_LINE = re.compile(r"Answer\s*:\s*\$?\s*-?\d", re.IGNORECASE)


def format_reward(prompt: object, completion: str, row: dict) -> float:
    """1.0 when the completion states its answer as "Answer: N" (the canonical solution format)."""
    return 1.0 if _ANSWER_LINE.search(completion) else 0.0


# ------------------------------------------------------------------------ reward functions
def load_reward_function(spec: str) -> RewardFunction:
    """`package.module:function` or `path/to/file.py:function` -> the function; InvalidArgument
    (one line) when it cannot be imported or is not callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InvalidArgument(f"--reward takes package.module:function (or file.py:function), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InvalidArgument(f"cannot import the reward function {spec!r}: no file {path}")
            name = f"_emergence_reward_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except InvalidArgument:
        raise
    except BaseException as e:  # noqa: BLE001 - any failure to import is bad input, said in one line
        if isinstance(e, KeyboardInterrupt):
            raise
        detail = " ".join(str(e).split()) or type(e).__name__
        raise InvalidArgument(f"cannot import the reward function {spec!r}: {type(e).__name__}: {detail}") from None
    function = getattr(module, attr, None)
    if function is None:
        raise InvalidArgument(f"cannot import the reward function {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(function):
        raise InvalidArgument(f"the reward function {spec!r} is a {type(function).__name__}, not a function")
    return function


@dataclass
class FunctionRewards:
    """Reward functions, summed; a completion on which any of them fails gets NaN."""

    specs: list[str]
    functions: list[RewardFunction] = field(default_factory=list)
    failures: int = 0  # over the whole run
    warned: set = field(default_factory=set)

    @classmethod
    def load(cls, specs: Sequence[str]) -> FunctionRewards:
        return cls(list(specs), [load_reward_function(s) for s in specs])

    def __call__(self, prompts: Sequence[object], completions: Sequence[str], rows: Sequence[dict]
                 ) -> tuple[torch.Tensor, int]:
        """(B,) float32 rewards (NaN where a function failed) and the number of failed completions."""
        rewards, failed = [], 0
        for prompt, completion, row in zip(prompts, completions, rows):
            total = 0.0
            for spec, function in zip(self.specs, self.functions):
                value = self._call(spec, function, prompt, completion, row)
                total += value
                if math.isnan(value):
                    break
            failed += math.isnan(total)
            rewards.append(total)
        self.failures += failed
        return torch.tensor(rewards, dtype=torch.float32), failed

    def _call(self, spec: str, function: RewardFunction, prompt, completion: str, row: dict) -> float:
        try:
            value = function(prompt, completion, row)
        except Exception as e:  # noqa: BLE001 - counted; the run goes on
            self._warn(spec, f"raised {type(e).__name__}: {' '.join(str(e).split())[:120]}")
            return math.nan
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._warn(spec, f"returned {value!r:.60}, not a finite number")
            return math.nan
        return float(value)

    def _warn(self, spec: str, what: str) -> None:
        """The first failure of each kind is reported on stderr (the rest are only counted)."""
        key = (spec, what.split(":")[0])
        if key not in self.warned:
            self.warned.add(key)
            print(f"emergence: warning: reward function {spec} {what} (the completion gets no reward; further "
                  "failures like it are counted in the metrics)", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- reward models
class ModelRewards:
    """A reward model's score of prompt + completion (at the last token). `same_tokens`: it reads
    the policy's ids; otherwise the texts are encoded with its own tokenizer."""

    def __init__(self, reward_model, tokenizer: Tokenizer | None, policy_tokenizer: Tokenizer, policy_vocab: int,
                 folder: str) -> None:
        self.model, self.folder = reward_model.eval(), folder
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.failures = 0
        vocab = reward_model.config.vocab_size
        if tokenizer is None:
            if vocab != policy_vocab:
                raise InvalidArgument(
                    f"the reward model {folder} has a vocabulary of {vocab} tokens and the policy {policy_vocab}: "
                    "different tokenizers, and the reward model brings none of its own to re-encode the texts with "
                    "(put its tokenizer files in its folder)")
            self.tokenizer, self.same_tokens = policy_tokenizer, True
        else:
            self.tokenizer = tokenizer
            self.same_tokens = tokenizer.fingerprint() == policy_tokenizer.fingerprint()

    @classmethod
    def load(cls, folder: str, policy_tokenizer: Tokenizer, policy_vocab: int) -> ModelRewards:
        from .reward import load_reward_model

        model = load_reward_model(folder, dtype=torch.float32)
        return cls(model, reward_tokenizer(folder), policy_tokenizer, policy_vocab, folder)

    @torch.no_grad()
    def __call__(self, sequences: Sequence[list[int]], texts: Sequence[str], batch: int = 16) -> torch.Tensor:
        """(B,) scores: of the policy's id sequences, or (another tokenizer) of the texts re-encoded."""
        if self.same_tokens:
            rows = [list(s) for s in sequences]
        else:
            context = self.model.config.block_size
            rows = [(self.tokenizer.encode(t) or [self.model.pad_token_id])[-context:] for t in texts]
        device = self.model.score.weight.device
        out = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), self.model.pad_token_id, dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, :len(r)] = torch.tensor(r)
            last = torch.tensor([len(r) - 1 for r in chunk])
            scores = self.model.token_scores(ids.to(device))
            out.append(scores[torch.arange(len(chunk)), last.to(device)].float().cpu())
        return torch.cat(out)


def reward_tokenizer(folder: str) -> Tokenizer | None:
    """The reward model folder's own tokenizer, or None when it brings none."""
    path = Path(folder)
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        return None
    return Tokenizer.load(path)
