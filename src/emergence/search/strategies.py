"""Test-time search strategies, one interface over any policy and verifier.

Every strategy is `solve(question, policy, verifier, config, answer=None) -> Outcome`: it asks
the policy for samples (policy.py), the verifier for scores (verifier.py), and returns the
chosen answer and solution with the candidates it weighed. What it cost is read from the
policy's and the verifier's `usage` (search/run.py). The conventions follow Hugging Face's
search-and-learn and Snell et al. (2024), "Scaling LLM Test-Time Compute Optimally":

- majority: N whole solutions, the most frequent final answer (a tie: the answer met first).
- best_of_n: N whole solutions, the one the verifier scores highest (ORM score, or the PRM's
  step scores aggregated last / min / prod).
- weighted_best_of_n: N whole solutions, scores summed per distinct final answer; the answer
  with the largest sum (a tie: the one met first), its best-scored solution.
- beam_search: N beams of width M. The first step is sampled N times from the prompt; then
  each round keeps the N / M best unfinished beams (by aggregated PRM score) and expands each
  by M next steps (a step is one line, stop="\\n"), so N candidates per round, until no beam is
  left unfinished or max_steps rounds (the last round writes to the end). A beam is finished
  when its step holds "Answer:" or is blank, the policy ends the text, or the tokens run out
  (max_tokens for the solution; a step longer than step_tokens ends it too). With
  lookahead k, each new step is scored at the end of a greedy rollout of k more steps (the
  rollout is not kept). The answer: the best-scored finished beam.
- dvts (diverse verifier tree search): N / M independent subtrees; each expands its beam by M
  next steps and keeps the best one (greedy by PRM), until finished. The answer: the
  best-scored subtree.
- revisions: N attempts in sequence, attempt k prompted with the previous ones
  (prompt.REVISION_TEMPLATE); the answer: the verifier's best attempt, else a majority vote
  over the chain. The policy should be a revision model (search-train's revision stages,
  revise.py): a policy trained only on first attempts has never seen the revision prompt.
- self_correct: a reasoning loop. One whole solution is sampled and the PRM scores every step;
  when every score is >= threshold and the solution has an "Answer:" line it is accepted and
  the loop stops. Otherwise the solution is cut before the first step scored below threshold
  (all of it when no step is, but no answer was given) and a fresh sample continues the
  accepted steps (prompt + steps; up to max_tokens new tokens a round), up to `budget`
  regenerations. The answer: the accepted attempt's; when none is accepted, the best-scored
  (aggregated) attempt among those with an answer. With an ORM (one score) a rejection
  regenerates from scratch. info["answers_by_round"][b] is the answer the loop gives with
  budget b (info["flops_by_round"][b], what it spent): one run at the largest budget gives
  accuracy and compute at every smaller one.
- compute_optimal: estimate the problem's difficulty with a few probe samples (the verifier's
  mean score; or, as an oracle, their pass rate against the known answer), find its bin, and
  run the strategy and N that a table fitted on a held-out split names for that bin
  (`fit_table`: per bin, the candidate with the best accuracy, ties to the cheaper).

Beam search and DVTS need N divisible by M, self_correct an integer budget >= 0 and a threshold
in [0, 1] (one clear error otherwise). Strategies are compared at equal compute by what run.py
reports per problem: tokens and FLOPs of the policy (probes, rollouts, revisions and
regenerations included) and of the verifier.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from ..problems import extract_answer
from .policy import Generation, Policy, Usage
from .prompt import STEP_STOP, format_prompt, is_answer_line, revision_prompt, steps_of, trim_solution
from .verifier import AGGREGATIONS, Verifier, aggregate

ESTIMATORS = ("verifier", "oracle")


@dataclass
class SearchConfig:
    n: int = 4  # samples (beams) per problem
    width: int = 4  # M: beam search's expansion per beam, DVTS's subtree width
    aggregation: str = "last"  # PRM step scores -> one score
    lookahead: int = 0  # beam search: greedy steps rolled out before scoring a step
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 256  # per solution
    step_tokens: int = 64  # per step (step-wise search)
    max_steps: int = 10  # rounds of step-wise search
    window: int = 4  # revisions: previous attempts kept in the prompt
    budget: int = 4  # self_correct: regenerations after the first sample (0: the sample as it is)
    threshold: float = 0.5  # self_correct: a PRM step score below it rejects the step
    table: "Table | None" = None  # compute_optimal's lookup table

    def check(self) -> None:
        for name in ("n", "width", "max_tokens", "step_tokens", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
        if self.lookahead < 0 or self.window < 0:
            raise InvalidArgument("lookahead and window must be >= 0")
        if self.aggregation not in AGGREGATIONS:
            raise InvalidArgument(f"unknown aggregation {self.aggregation!r} (use {', '.join(AGGREGATIONS)})")
        _check_loop(self)


@dataclass
class Candidate:
    text: str  # the solution (steps and answer), without the prompt
    answer: Any = None  # extract_answer(text)
    step_scores: list[float] | None = None
    score: float | None = None  # aggregated
    finished: bool = True
    tokens: int = 0  # generated tokens of this solution


@dataclass
class Outcome:
    answer: Any
    text: str
    candidates: list[Candidate] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _candidate(text: str, tokens: int = 0) -> Candidate:
    text = trim_solution(text)
    return Candidate(text, extract_answer(text) if text.strip() else None, tokens=tokens)


def _need_verifier(verifier: Verifier | None, strategy: str) -> Verifier:
    if verifier is None:
        raise InvalidArgument(f"{strategy} needs a verifier (--verifier: a reward model folder)")
    return verifier


def _score(verifier: Verifier, prompt: str, candidates: Sequence[Candidate], how: str,
           texts: Sequence[str] | None = None) -> None:
    """Score the candidates (or `texts`, one per candidate: lookahead rollouts) in one call."""
    if not candidates:
        return
    scores = verifier.score(prompt, list(texts) if texts is not None else [c.text for c in candidates])
    for c, s in zip(candidates, scores):
        c.step_scores, c.score = list(s), aggregate(s, how)


def _argmax(values: Sequence[float]) -> int:
    """The first index of the largest value."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def majority_answer(answers: Sequence[Any]) -> Any:
    """The most frequent answer that is not None; a tie goes to the one met first."""
    counts: dict = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in counts if counts[a] == top)  # dicts keep first-met order


def weighted_answer(answers: Sequence[Any], scores: Sequence[float]) -> Any:
    """The answer (not None) whose candidates' scores sum highest; a tie goes to the one met first."""
    sums: dict = {}
    for a, s in zip(answers, scores):
        if a is not None:
            sums[a] = sums.get(a, 0.0) + s
    if not sums:
        return None
    top = max(sums.values())
    return next(a for a in sums if sums[a] == top)


def _unanswered(gen: Generation, info: dict | None = None) -> Outcome | None:
    if gen.error is not None or not gen.samples:
        return Outcome(None, "", [], {"unanswered": True, **(info or {})})
    return None


def _sample_whole(question: str, policy: Policy, cfg: SearchConfig, n: int) -> Generation:
    return policy.generate([format_prompt(question)], n, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_tokens=cfg.max_tokens)[0]


# ------------------------------------------------------------------------ parallel sampling
def majority(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig, answer=None) -> Outcome:
    gen = _sample_whole(question, policy, cfg, cfg.n)
    if (out := _unanswered(gen)) is not None:
        return out
    cands = [_candidate(s.text, s.tokens) for s in gen.samples]
    chosen = majority_answer([c.answer for c in cands])
    text = next((c.text for c in cands if c.answer == chosen), cands[0].text)
    return Outcome(chosen, text, cands)


def best_of_n(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig, answer=None) -> Outcome:
    verifier = _need_verifier(verifier, "best_of_n")
    gen = _sample_whole(question, policy, cfg, cfg.n)
    if (out := _unanswered(gen)) is not None:
        return out
    cands = [_candidate(s.text, s.tokens) for s in gen.samples]
    _score(verifier, gen.prompt, cands, cfg.aggregation)
    best = cands[_argmax([c.score for c in cands])]
    return Outcome(best.answer, best.text, cands)


def weighted_best_of_n(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig,
                       answer=None) -> Outcome:
    verifier = _need_verifier(verifier, "weighted_best_of_n")
    gen = _sample_whole(question, policy, cfg, cfg.n)
    if (out := _unanswered(gen)) is not None:
        return out
    cands = [_candidate(s.text, s.tokens) for s in gen.samples]
    _score(verifier, gen.prompt, cands, cfg.aggregation)
    chosen = weighted_answer([c.answer for c in cands], [c.score for c in cands])
    group = [c for c in cands if c.answer == chosen] or cands
    best = group[_argmax([c.score for c in group])]
    return Outcome(chosen, best.text, cands)


# ------------------------------------------------------------------------ step-wise search
def _check_width(cfg: SearchConfig, strategy: str) -> None:
    if cfg.n % cfg.width == 0:
        return
    if strategy == "dvts":
        raise InvalidArgument(f"dvts splits N = {cfg.n} samples into subtrees of width M = {cfg.width}: N must be "
                              "a multiple of M (--n, --width)")
    raise InvalidArgument(f"{strategy} keeps N / M beams and expands each by M: N = {cfg.n} is not a multiple of "
                          f"M = {cfg.width} (--n, --width)")


def _extend(parent: Candidate, text: str, tokens: int, finish: str, cfg: SearchConfig, last: bool) -> Candidate:
    """A parent's partial solution continued by one step (or, on the last round, to the end)."""
    lines = [line for line in text.split("\n")]
    answered = any(is_answer_line(line) for line in lines)
    used = parent.tokens + tokens
    finished = (last or answered or finish in ("eos", "length") or not text.strip() or used >= cfg.max_tokens)
    new = parent.text + text + (STEP_STOP if finish == "stop" and not last and not answered else "")
    child = Candidate(trim_solution(new) if answered else new, finished=finished, tokens=used)
    child.answer = extract_answer(child.text) if finished and child.text.strip() else None
    return child


def _steps(policy: Policy, prompt: str, beams: Sequence[Candidate], counts: Sequence[int], cfg: SearchConfig,
           last: bool, first_round: bool) -> list[list[Candidate]] | None:
    """Each beam's children (counts[i] of them); None when the policy did not answer."""
    stop = () if last else (STEP_STOP,)
    max_tokens = [max(1, min(cfg.max_tokens - b.tokens, cfg.max_tokens if last else cfg.step_tokens)) for b in beams]
    if first_round and len({b.text for b in beams}) == 1:  # the same root: one prompt, all samples share it
        gen = policy.generate([prompt + beams[0].text], sum(counts), temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=max_tokens[0], stop=stop)[0]
        if gen.error is not None:
            return None
        out, at = [], 0
        for b, k in zip(beams, counts):
            out.append([_extend(b, s.text, s.tokens, s.finish_reason, cfg, last) for s in gen.samples[at:at + k]])
            at += k
        return out
    # beams in groups of the same step budget (one decode batch each, usually one)
    out: list = [None] * len(beams)
    for budget in sorted(set(max_tokens)):
        idx = [i for i, m in enumerate(max_tokens) if m == budget]
        gens = policy.generate([prompt + beams[i].text for i in idx], [counts[i] for i in idx],
                               temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=budget, stop=stop)
        for i, gen in zip(idx, gens):
            if gen.error is not None:
                return None
            out[i] = [_extend(beams[i], s.text, s.tokens, s.finish_reason, cfg, last) for s in gen.samples]
    return out


def _lookahead_texts(policy: Policy, prompt: str, children: Sequence[Candidate], cfg: SearchConfig) -> list[str]:
    """Each child's text followed by a greedy rollout of cfg.lookahead steps (finished children: as they are)."""
    texts = [c.text for c in children]
    live = [i for i, c in enumerate(children) if not c.finished]
    tokens = {i: children[i].tokens for i in live}
    for _ in range(cfg.lookahead):
        if not live:
            break
        gens = policy.generate([prompt + texts[i] for i in live], 1, temperature=0.0, max_tokens=cfg.step_tokens,
                               stop=(STEP_STOP,))
        still = []
        for i, gen in zip(live, gens):
            if gen.error is not None or not gen.samples:
                continue
            s = gen.samples[0]
            step = _extend(Candidate(texts[i], tokens=tokens[i], finished=False), s.text, s.tokens, s.finish_reason,
                           cfg, False)
            texts[i], tokens[i] = step.text, step.tokens
            if not step.finished:
                still.append(i)
        live = still
    return texts


def _score_children(policy, verifier, prompt, children, cfg) -> None:
    texts = _lookahead_texts(policy, prompt, children, cfg) if cfg.lookahead else None
    _score(verifier, prompt, children, cfg.aggregation, texts)


def beam_search(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig, answer=None) -> Outcome:
    verifier = _need_verifier(verifier, "beam_search")
    _check_width(cfg, "beam_search")
    keep = cfg.n // cfg.width
    prompt = format_prompt(question)
    active = [Candidate("", finished=False)]
    completed: list[Candidate] = []
    trace = []  # per round: the beams kept (their texts), best first
    for rnd in range(cfg.max_steps):
        # the N samples of a round spread over the active beams (M each once N / M are kept)
        counts = [cfg.n // len(active) + (1 if i < cfg.n % len(active) else 0) for i in range(len(active))]
        found = _steps(policy, prompt, active, counts, cfg, rnd == cfg.max_steps - 1, rnd == 0)
        if found is None:
            return Outcome(None, "", completed, {"unanswered": True, "trace": trace})
        children = [c for group in found for c in group]
        _score_children(policy, verifier, prompt, children, cfg)
        completed += [c for c in children if c.finished]
        live = [c for c in children if not c.finished]
        order = sorted(range(len(live)), key=lambda i: -live[i].score)  # stable: ties keep their order
        active = [live[i] for i in order[:keep]]
        trace.append([c.text for c in active])
        if not active:
            break
    pool = completed or active
    best = pool[_argmax([c.score for c in pool])]
    if best.answer is None and best.text.strip():
        best.answer = extract_answer(best.text)
    return Outcome(best.answer, best.text, pool, {"trace": trace, "rounds": len(trace)})


def dvts(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig, answer=None) -> Outcome:
    verifier = _need_verifier(verifier, "dvts")
    _check_width(cfg, "dvts")
    subtrees = cfg.n // cfg.width
    prompt = format_prompt(question)
    beams = [Candidate("", finished=False) for _ in range(subtrees)]
    trace = []
    for rnd in range(cfg.max_steps):
        live = [i for i, b in enumerate(beams) if not b.finished]
        if not live:
            break
        found = _steps(policy, prompt, [beams[i] for i in live], [cfg.width] * len(live), cfg,
                       rnd == cfg.max_steps - 1, rnd == 0)
        if found is None:
            return Outcome(None, "", beams, {"unanswered": True, "trace": trace})
        children = [c for group in found for c in group]
        _score_children(policy, verifier, prompt, children, cfg)
        for i, group in zip(live, found):
            beams[i] = group[_argmax([c.score for c in group])]
        trace.append([b.text for b in beams])
    for b in beams:
        if b.answer is None and b.text.strip():
            b.answer = extract_answer(b.text)
    best = beams[_argmax([b.score if b.score is not None else -1.0 for b in beams])]
    return Outcome(best.answer, best.text, beams, {"trace": trace, "subtrees": subtrees})


# ---------------------------------------------------------------------------- revisions
def revisions(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig, answer=None) -> Outcome:
    """N attempts in sequence, each prompted with the previous ones (the last cfg.window); the
    verifier scores each attempt as it comes (one text a call, as self_correct does). The answer:
    the best-scored attempt (a tie: the earliest), else the majority vote. info's answers_by_round
    and flops_by_round give the answer and the FLOPs spent after 1, 2, ..., N attempts (a run with
    N = k draws the same first k attempts from a policy seeded alike, so one run gives every N);
    attempt_answers: each attempt's own answer."""
    prompt = format_prompt(question)
    start = (policy.usage.copy(), verifier.usage.copy() if verifier is not None else Usage())
    attempts: list[Candidate] = []
    answers, flops = [], []  # after each attempt: the answer so far, the FLOPs spent so far
    for k in range(cfg.n):
        ask = prompt if k == 0 else revision_prompt(question, [a.text for a in attempts], cfg.window)
        gen = policy.generate([ask], 1, temperature=cfg.temperature, top_p=cfg.top_p,
                              max_tokens=cfg.max_tokens)[0]
        if gen.error is not None or not gen.samples:
            if not attempts:
                return Outcome(None, "", [], {"unanswered": True})
            break
        attempt = _candidate(gen.samples[0].text, gen.samples[0].tokens)
        if verifier is not None:
            _score(verifier, prompt, [attempt], cfg.aggregation)
        attempts.append(attempt)
        answers.append(_revision_pick(attempts, verifier is not None)[0])
        p, v = policy.usage.minus(start[0]), (verifier.usage.minus(start[1]) if verifier is not None else Usage())
        flops.append(p.flops + v.flops if p.flops_known and v.flops_known else None)
    pad = cfg.n - len(answers)  # stopped early (an error): every larger N stops there too
    chosen, text = _revision_pick(attempts, verifier is not None)
    return Outcome(chosen, text, attempts, {"select": "verifier" if verifier is not None else "majority",
                                            "attempt_answers": [a.answer for a in attempts],
                                            "answers_by_round": answers + [answers[-1]] * pad,
                                            "flops_by_round": flops + [flops[-1]] * pad})


def _revision_pick(attempts: Sequence[Candidate], by_score: bool) -> tuple[Any, str]:
    """(answer, text) chosen among the attempts: the best score, or the majority answer."""
    if by_score:
        best = attempts[_argmax([c.score for c in attempts])]
        return best.answer, best.text
    chosen = majority_answer([c.answer for c in attempts])
    return chosen, next((c.text for c in attempts if c.answer == chosen), attempts[-1].text)


# ------------------------------------------------------------------------ self-correction
def _check_loop(cfg: SearchConfig) -> None:
    budget, threshold = cfg.budget, cfg.threshold
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise InvalidArgument(f"budget must be an integer >= 0 (self_correct's regenerations), got {budget!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise InvalidArgument(f"threshold must be a number in [0, 1] (a PRM step score), got {threshold!r}")


def _rejected_step(c: Candidate, steps: Sequence[str], threshold: float, per_step: bool) -> int | None:
    """The index in `steps` of the first step scored below threshold; None when none is. A text
    longer than the verifier's context keeps only its last steps' scores (verifier.py), so the
    scores are read as the last ones; an ORM's one score judges the whole solution (step 0)."""
    scores = c.step_scores or []
    for i, s in enumerate(scores):
        if s < threshold:
            return max(0, len(steps) - len(scores)) + i if per_step else 0
    return None


def _best_attempt(attempts: Sequence[Candidate]) -> Candidate:
    """None accepted: the best aggregated score (a tie: the earliest), an attempt without an
    answer only when no attempt has one (it cannot be right)."""
    pool = [a for a in attempts if a.answer is not None] or list(attempts)
    return pool[_argmax([a.score for a in pool])]


def _spent(policy: Policy, verifier: Verifier, start: tuple) -> float | None:
    """Policy and verifier FLOPs since `start` (their usage then); None when the policy's are unknown."""
    p, v = policy.usage.minus(start[0]), verifier.usage.minus(start[1])
    return p.flops + v.flops if p.flops_known and v.flops_known else None


def self_correct(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig,
                 answer=None) -> Outcome:
    verifier = _need_verifier(verifier, "self_correct")
    _check_loop(cfg)
    prompt = format_prompt(question)
    per_step = getattr(verifier, "kind", "prm") == "prm"
    start = (policy.usage.copy(), verifier.usage.copy())
    attempts: list[Candidate] = []
    answers, flops, rejected = [], [], []  # per round: the loop's answer so far, FLOPs so far, the cut
    prefix, accepted = "", False
    for _ in range(cfg.budget + 1):
        # a whole continuation of the accepted steps (last=True: no stop string, up to max_tokens);
        # the prefix is prompt to the policy, so each round writes at most max_tokens new tokens
        found = _steps(policy, prompt, [Candidate(prefix, finished=False)], [1], cfg, last=True,
                       first_round=False)
        if found is None:  # no answer from the policy: the attempts so far decide
            break
        attempt = found[0][0]
        _score(verifier, prompt, [attempt], cfg.aggregation)  # kept steps too: a verifier reads whole texts
        attempts.append(attempt)
        steps = steps_of(attempt.text)
        cut = _rejected_step(attempt, steps, cfg.threshold, per_step)
        accepted = cut is None and any(is_answer_line(line) for line in steps)
        rejected.append(cut)
        answers.append(attempt.answer if accepted else _best_attempt(attempts).answer)
        flops.append(_spent(policy, verifier, start))
        if accepted:
            break
        prefix = "".join(line + "\n" for line in steps[:cut])  # cut None: every step kept, no answer yet
    # stopped before the budget (accepted, or no answer): every larger budget stops there too
    pad = cfg.budget + 1 - len(answers)
    info = {"rounds": max(0, len(attempts) - 1), "accepted": accepted, "attempts": [a.answer for a in attempts],
            "rejected_steps": rejected,
            "answers_by_round": answers + [answers[-1] if answers else None] * pad,
            "flops_by_round": flops + [_spent(policy, verifier, start)] * pad}
    if not attempts:
        return Outcome(None, "", [], {"unanswered": True, **info})
    chosen = attempts[-1] if accepted else _best_attempt(attempts)
    return Outcome(chosen.answer, chosen.text, attempts, info)


# ------------------------------------------------------------------------ compute-optimal
@dataclass
class Table:
    """compute_optimal's lookup: difficulty bins and the (strategy, n, width) each one runs.

    The metric is higher for easier problems (a pass rate, a mean verifier score); `edges`
    (ascending, bins - 1 of them) cut it into bins; bin 0 holds the lowest metric (the hardest
    problems). `levels` reports them as Snell et al. do: level 1 the easiest."""

    estimator: str
    probe_n: int
    edges: list[float]
    choices: list[dict]  # per bin: {"strategy", "n", "width", "accuracy", "flops"}

    def bin(self, metric: float) -> int:
        return sum(1 for e in self.edges if metric >= e)

    def level(self, b: int) -> int:
        return len(self.choices) - b

    def to_json(self) -> dict:
        return {"estimator": self.estimator, "probe_n": self.probe_n, "edges": self.edges,
                "bins": [{"level": self.level(b), **c} for b, c in enumerate(self.choices)]}

    @classmethod
    def from_json(cls, data: dict) -> Table:
        try:
            return cls(data["estimator"], int(data["probe_n"]), [float(e) for e in data["edges"]],
                       [{k: v for k, v in b.items() if k != "level"} for b in data["bins"]])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(f"not a compute-optimal table: {e}") from None


def difficulty(question: str, policy: Policy, verifier: Verifier | None, estimator: str, probe_n: int,
               cfg: SearchConfig, answer=None) -> float | None:
    """The probe's metric: the verifier's mean aggregated score over probe_n samples, or (oracle)
    the share of them whose answer is right. None when the policy did not answer."""
    if estimator not in ESTIMATORS:
        raise InvalidArgument(f"unknown difficulty estimator {estimator!r} (use {', '.join(ESTIMATORS)})")
    gen = _sample_whole(question, policy, cfg, probe_n)
    if gen.error is not None or not gen.samples:
        return None
    cands = [_candidate(s.text, s.tokens) for s in gen.samples]
    if estimator == "oracle":
        if answer is None:
            raise InvalidArgument("the oracle difficulty estimator needs each problem's answer")
        return sum(c.answer == answer for c in cands) / len(cands)
    _score(_need_verifier(verifier, "the verifier difficulty estimator"), gen.prompt, cands, cfg.aggregation)
    return sum(c.score for c in cands) / len(cands)


def quantile_edges(metrics: Sequence[float], bins: int) -> list[float]:
    """bins - 1 ascending cut points at the metric's quantiles (equal-count bins, as Snell's five)."""
    values = sorted(metrics)
    if bins < 1 or not values:
        raise InvalidArgument("bins must be >= 1 and there must be metrics to cut")
    return [values[min(len(values) - 1, math.ceil(len(values) * k / bins))] for k in range(1, bins)]


def fit_table(metrics: Sequence[float], results: dict, bins: int, estimator: str, probe_n: int) -> Table:
    """The table from a held-out split: metrics[i] the probe metric of problem i; results maps a
    candidate (strategy, n, width) to per-problem (correct, flops). Per bin the candidate with
    the best accuracy is chosen, a tie going to the one with fewer FLOPs per problem."""
    edges = quantile_edges(metrics, bins)
    probe = Table(estimator, probe_n, edges, [{}] * bins)
    members = [[i for i, m in enumerate(metrics) if probe.bin(m) == b] for b in range(bins)]
    choices = []
    for b in range(bins):
        best = None
        for (strategy, n, width), rows in results.items():
            idx = members[b] or range(len(metrics))  # an empty bin takes the whole split's best
            acc = sum(rows[i][0] for i in idx) / len(idx)
            flops = sum(rows[i][1] for i in idx) / len(idx)
            key = (-acc, flops)
            if best is None or key < best[0]:
                best = (key, {"strategy": strategy, "n": n, "width": width, "accuracy": acc, "flops": flops,
                              "problems": len(members[b])})
        choices.append(best[1])
    return Table(estimator, probe_n, edges, choices)


def compute_optimal(question: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig,
                    answer=None) -> Outcome:
    table = cfg.table
    if table is None:
        raise InvalidArgument("compute_optimal needs a table fitted on a held-out split (--heldout FILE.jsonl)")
    metric = difficulty(question, policy, verifier, table.estimator, table.probe_n, cfg, answer)
    if metric is None:
        return Outcome(None, "", [], {"unanswered": True})
    b = table.bin(metric)
    choice = table.choices[b]
    sub = SearchConfig(**{**cfg.__dict__, "n": int(choice["n"]), "width": int(choice.get("width") or cfg.width),
                          "table": None})
    out = STRATEGIES[choice["strategy"]](question, policy, verifier, sub, answer)
    out.info.update(metric=metric, bin=b, level=table.level(b), chosen=f"{choice['strategy']}@{choice['n']}")
    return out


STRATEGIES: dict[str, Callable[..., Outcome]] = {
    "majority": majority,
    "best_of_n": best_of_n,
    "weighted_best_of_n": weighted_best_of_n,
    "beam_search": beam_search,
    "dvts": dvts,
    "revisions": revisions,
    "self_correct": self_correct,
    "compute_optimal": compute_optimal,
}
NEEDS_VERIFIER = {"best_of_n", "weighted_best_of_n", "beam_search", "dvts", "self_correct"}


def get_strategy(name: str) -> Callable[..., Outcome]:
    if name not in STRATEGIES:
        raise InvalidArgument(f"unknown search strategy {name!r} (use {', '.join(STRATEGIES)})")
    return STRATEGIES[name]
