"""Verifiers: scores for candidate solutions, from a reward model (align/reward.py).

`score(prompt, solutions)` gives, for every solution, a list of scores in (0, 1): the
probability that the solution so far is right, sigmoid of the reward head's logit.

- ORM (outcome reward model): one score, the head at the last token of prompt + solution
  (RewardModel.forward's token).
- PRM (process reward model): one score per step. The scored text is the prompt, then each
  non-blank line of the solution followed by "\\n" (the "Answer:" line is the last step); a
  step's score is the head's value (RewardModel.token_scores) at the token holding the newline
  that ends its line. A PRM trained for search sees its training texts the same way.

`aggregate(step_scores, how)` makes one number of a PRM's step scores, as search-and-learn's
aggregate_scores: "last" (the last step's), "min" (the weakest step's) or "prod" (all steps
right); a solution with no step scores 0.

The verifier reads text, so a policy with another tokenizer is served by re-encoding the
solution text with the verifier's own tokenizer (`check_tokenizers` says so, or refuses when
asked to); text the verifier's tokenizer cannot encode losslessly is refused.
FLOPs: each scored text is one forward pass of its length (flops.FlopsModel).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from ..errors import InvalidArgument
from .flops import FlopsModel
from .policy import Usage
from .prompt import steps_of

AGGREGATIONS = ("last", "min", "prod")
KINDS = ("prm", "orm")


def aggregate(step_scores: Sequence[float], how: str = "last") -> float:
    """One score from a solution's step scores: last, min or prod; 0.0 for no steps."""
    if how not in AGGREGATIONS:
        raise InvalidArgument(f"unknown aggregation {how!r} (use {', '.join(AGGREGATIONS)})")
    if not step_scores:
        return 0.0
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    return float(math.prod(step_scores))


@runtime_checkable
class Verifier(Protocol):
    name: str
    kind: str  # "prm" (a score per step) or "orm" (one score)
    usage: Usage

    def score(self, prompt: str, solutions: Sequence[str]) -> list[list[float]]:
        ...


def check_tokenizers(policy_tokenizer, verifier_tokenizer, policy_name: str, verifier_name: str,
                     mismatch: str = "reencode") -> str | None:
    """None when the policy and the verifier share a tokenizer (or the policy's is unknown);
    else a one-line notice that solutions are re-encoded, or (mismatch="refuse") an error."""
    if mismatch not in ("reencode", "refuse"):
        raise InvalidArgument(f"unknown tokenizer-mismatch policy {mismatch!r} (use reencode or refuse)")
    if policy_tokenizer is None or verifier_tokenizer is None:
        return None
    mine, theirs = policy_tokenizer.fingerprint(), verifier_tokenizer.fingerprint()
    if mine == theirs:
        return None
    what = (f"the verifier {verifier_name}'s tokenizer ({verifier_tokenizer.vocab_size} tokens, {theirs}) differs "
            f"from the policy {policy_name}'s ({policy_tokenizer.vocab_size} tokens, {mine})")
    if mismatch == "refuse":
        raise InvalidArgument(f"{what}; refusing (--tokenizer-mismatch reencode scores the solution text "
                              "re-encoded with the verifier's tokenizer)")
    return f"{what}: solutions are re-encoded as text with the verifier's tokenizer"


class RewardVerifier:
    """A RewardModel and its tokenizer as an ORM or a PRM."""

    def __init__(self, model, tokenizer, *, kind: str = "prm", name: str = "verifier", batch_size: int = 16,
                 check_roundtrip: bool = False) -> None:
        if kind not in KINDS:
            raise InvalidArgument(f"unknown verifier kind {kind!r} (use prm or orm)")
        self.model, self.tokenizer, self.kind, self.name = model.eval(), tokenizer, kind, name
        self.batch_size = batch_size
        self.check_roundtrip = check_roundtrip  # set when the policy's tokenizer differs
        self.flops_model = FlopsModel.of(model)
        self.usage = Usage()

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        if self.tokenizer.add_bos and self.tokenizer.bos_id is not None:
            ids, offsets = [self.tokenizer.bos_id, *ids], [(0, 0), *offsets]
        if self.check_roundtrip and self.tokenizer.decode(ids) != text:
            raise InvalidArgument(f"the verifier {self.name}'s tokenizer cannot encode the policy's text losslessly "
                                  f"(e.g. {text[-40:]!r}): use a verifier trained with the policy's tokenizer")
        return ids, offsets

    def _texts(self, prompt: str, solution: str) -> tuple[str, list[int]]:
        """The scored text and the character positions whose tokens are scored."""
        if self.kind == "orm":
            return prompt + solution.rstrip("\n"), []
        text, ends = prompt, []
        for line in steps_of(solution):
            text += line
            ends.append(len(text))  # the newline's index
            text += "\n"
        return text, ends

    def score(self, prompt: str, solutions: Sequence[str]) -> list[list[float]]:
        items = []  # (ids, token positions to read)
        for solution in solutions:
            text, ends = self._texts(prompt, solution)
            ids, offsets = self._encode(text)
            if not ids:
                ids, offsets = [self.tokenizer.bos_id or 0], [(0, 0)]
            if self.kind == "orm":
                positions = [len(ids) - 1]
            else:
                starts = [start for start, _ in offsets]
                positions = []
                for end in ends:  # the token whose span holds the newline (else the last one starting before it)
                    k = bisect.bisect_right(starts, end) - 1
                    positions.append(max(k, 0))
            items.append((ids, positions))
        self.usage.calls += 1
        block = self.model.config.block_size
        results: list[list[float]] = []
        device = next(self.model.parameters()).device
        pad = self.model.pad_token_id
        for b in range(0, len(items), self.batch_size):
            chunk = items[b:b + self.batch_size]
            cut = [max(0, len(ids) - block) for ids, _ in chunk]  # a text longer than the context keeps its end
            rows = [ids[c:] for (ids, _), c in zip(chunk, cut)]
            width = max(len(r) for r in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            for r, row in enumerate(rows):
                batch[r, :len(row)] = torch.tensor(row)
            with torch.inference_mode():
                logits = self.model.token_scores(batch.to(device)).float().cpu()
            for r, ((_, positions), c) in enumerate(zip(chunk, cut)):
                results.append([torch.sigmoid(logits[r, p - c]).item() for p in positions if p >= c])
                self.usage.generated_tokens += len(rows[r])
                self.usage.flops += self.flops_model.forward_flops(0, len(rows[r]))
        return results


def load_verifier(spec: str, *, kind: str = "prm", device: str = "auto", dtype=None) -> RewardVerifier:
    """A reward model folder (align/reward.py's layout, with its tokenizer files) as a verifier."""
    from ..align.reward import load_reward_model
    from ..api import resolve_device, resolve_dtype
    from ..errors import CheckpointError
    from ..store import resolve_model
    from ..tokenizer import Tokenizer

    if spec.startswith(("http://", "https://")):
        raise InvalidArgument(f"--verifier {spec}: a verifier over HTTP is not supported yet (OpenAI's API has no "
                              "reward endpoint); give a reward model folder")
    path = resolve_model(spec).path
    model = load_reward_model(path, dtype=resolve_dtype(dtype)).to(resolve_device(device))
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in the verifier folder {path}: save the reward model's tokenizer "
                              "beside it (Tokenizer.save)")
    return RewardVerifier(model, Tokenizer.load(path), kind=kind, name=str(spec))
