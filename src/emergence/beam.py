"""Beam search over the one decode batch, with transformers' scoring and stopping rules.

Each prompt keeps `num_beams` running hypotheses, the rows of a `DecodeBatch`; every step
scores all their continuations at once and continues the best ones, as transformers'
`generate(num_beams=...)` does (its vectorised beam search, 4.50 and later):

1. Every running beam's next-token log-probabilities (log-softmax of the logits, then the
   `no_repeat_ngram_size` ban) are added to its running score; the best
   K = max(2, 1 + number of end ids) * num_beams of all (beam, token) pairs are kept, best first.
2. A candidate "hits a stop" when its token is an end id, its text reaches a stop string, or
   it fills the token budget. Among the first num_beams candidates, those that hit a stop are
   finished hypotheses, scored `sum of log-probs / generated length ** length_penalty`
   (the end token counts in the length and stays in the hypothesis); the best num_beams
   finished ones are kept.
3. The best num_beams candidates that did not hit a stop are the next running beams: the
   batch is reordered (`DecodeBatch.reorder`), so a beam continuing its own parent's
   sequence keeps its KV blocks and a parent with several children shares its blocks with
   them; only a shared, partly filled last block is copied, when a child first writes to it.
4. A prompt is done when it cannot improve (`early_stopping`): True, as soon as num_beams
   hypotheses are finished; False, when they are and the best running score, divided by the
   current length ** length_penalty, is no better than the worst finished one; "never", the
   same with the longest possible length when length_penalty > 0 (the canonical rule).

The first step expands the prompt's only row (transformers gives its copies -1e9). The
result per prompt is the best `num_return_sequences` finished hypotheses, best first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .decode import DecodeBatch, Row
from .errors import InvalidArgument
from .sampling import SamplingParams, banned_ngram_tokens

# SamplingParams fields that change how a token is drawn or penalised: a beam search ranks
# raw log-probabilities, so these do not combine with num_beams > 1.
SAMPLING_ONLY = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "repetition_penalty": 1.0,
                 "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": None}


def check_beam_params(params: SamplingParams) -> None:
    """One clear line for beam settings that cannot run."""
    if params.num_beams == 1:
        return
    for name, default in SAMPLING_ONLY.items():
        if getattr(params, name) != default:
            raise InvalidArgument(f"{name} does not combine with beam search (num_beams={params.num_beams}): "
                                  "beams rank the model's log-probabilities")
    if params.temperature not in (0, 1):
        raise InvalidArgument(f"temperature {params.temperature} does not combine with beam search: beams rank the "
                              "model's log-probabilities (use temperature 0 or 1)")
    if params.logit_bias:
        raise InvalidArgument("logit_bias does not combine with beam search")


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens, without the end token
    score: float  # sum of log-probs / length ** length_penalty (the end token counted)
    finish_reason: str  # "stop" (end id or stop string) or "length"


@dataclass(eq=False)
class BeamGroup:
    """One prompt's search: its running beams (rows of the batch) and finished hypotheses."""

    params: SamplingParams
    beams: list[Row]  # running, best first
    scores: list[float]  # their summed log-probabilities
    finished: list[Hypothesis] = field(default_factory=list)  # best first, at most num_beams
    improvable: bool = True  # transformers' is_early_stop_heuristic_unsatisfied
    done: bool = False

    @property
    def full(self) -> bool:
        return len(self.finished) == self.params.num_beams


def beam_search(batch: DecodeBatch, groups: list[BeamGroup], tokenizer) -> None:
    """Run every group's search to its end on `batch`, whose rows are the groups' first beams
    (admitted, with their next-token logits); each group's `finished` holds the result."""
    while batch.rows:
        logits = batch.logits
        if batch.unused is not None:
            logits[:, batch.unused] = float("-inf")
        logprobs = logits.log_softmax(dim=-1)  # (R, V), rows in the order of the groups' beams
        parents, children, tokens = [], [], []
        first = 0
        for group in groups:
            if group.done:
                continue
            n = len(group.beams)
            pending = _step(group, logprobs[first:first + n], tokenizer)
            first += n
            # A child is its parent's row with one more token and no blocks yet (reorder shares
            # the parent's); beam rows never emit, so their detokenizers are never used.
            group.beams = [dataclasses.replace(parent, token_ids=parent.token_ids + [token], blocks=[], length=0)
                           for parent, token in pending]
            parents += [parent for parent, _ in pending]
            children += group.beams
            tokens += [token for _, token in pending]
        batch.reorder(parents, children)
        batch.advance(tokens)


def _step(group: BeamGroup, logprobs: torch.Tensor, tokenizer) -> list[tuple[Row, int]]:
    """One step of one prompt: logprobs (n beams, V). Returns the (parent row, token) pairs
    that continue, best first (none when the group is done)."""
    p = group.params
    nb, V = p.num_beams, logprobs.shape[-1]
    first_beam = group.beams[0]
    stop_ids = first_beam.stop_ids
    if p.no_repeat_ngram_size:
        for b, row in enumerate(group.beams):
            banned = banned_ngram_tokens(row.history, p.no_repeat_ngram_size)
            if banned:
                logprobs[b, banned] = float("-inf")
    total = logprobs + torch.tensor(group.scores, device=logprobs.device)[:, None]  # (n, V)
    keep = min(max(2, 1 + len(stop_ids)) * nb, total.numel())
    # the best `keep` of all (beam, token) pairs: each beam's best `keep`, then the best of
    # those (the same pairs as one top-k over the flattened (n * V,) scores, at half its cost)
    row_values, row_tokens = torch.topk(total, min(keep, V), dim=-1)  # (n, k)
    values, pick = torch.topk(row_values.flatten(), keep)
    flat = torch.div(pick, row_values.shape[1], rounding_mode="floor") * V + row_tokens.flatten()[pick]
    generated = len(first_beam.token_ids) + 1  # every beam has the same length; the candidate's token included
    running, finished = [], []
    for rank, (score, index) in enumerate(zip(values.tolist(), flat.tolist())):
        if score == float("-inf"):
            break
        parent, token = group.beams[index // V], index % V
        reason = _hits_stop(parent, token, generated, stop_ids, p, tokenizer)
        if reason is None:
            if len(running) < nb:
                running.append((parent, token, score))
        elif rank < nb and group.improvable and not (p.early_stopping is True and group.full):
            end = token in stop_ids
            ids = parent.token_ids + ([] if end else [token])
            finished.append(Hypothesis(ids, score / generated ** p.length_penalty, reason))
    if finished:
        group.finished = sorted(group.finished + finished, key=lambda h: -h.score)[:nb]
    group.scores = [score for _, _, score in running]
    # Can a running beam still beat the worst finished hypothesis?
    if running and group.full:
        length = first_beam.max_new if p.early_stopping == "never" and p.length_penalty > 0 else generated
        best = running[0][2] / length ** p.length_penalty
        group.improvable = group.improvable and best > group.finished[-1].score
    group.done = (not running or not group.improvable or (p.early_stopping is True and group.full)
                  or generated >= first_beam.max_new)
    return [] if group.done else [(parent, token) for parent, token, _ in running]


def _hits_stop(parent: Row, token: int, generated: int, stop_ids: set[int], p: SamplingParams,
               tokenizer) -> str | None:
    if token in stop_ids:
        return "stop"
    if p.stop and any(s in tokenizer.decode(parent.token_ids + [token]) for s in p.stop):
        return "stop"
    if generated >= parent.max_new:
        return "length"
    return None
