"""self_correct (search/strategies.py), the PRM-checked reasoning loop, on a scripted policy and a
table verifier with known outputs: it stops at once when every step passes, cuts before the first
rejected step and continues exactly the kept steps, stops at the budget, its answer at every
budget (answers_by_round) equals a run at that budget, and its tokens and FLOPs equal hand-counted
values; bad budgets and thresholds are one clear line, from the API and from `emergence search`."""

from __future__ import annotations

import pytest

from emergence.cli import main
from emergence.errors import InvalidArgument
from emergence.search import Generation, Sample, SearchConfig, Usage, format_prompt, run_search
from emergence.search.strategies import STRATEGIES, self_correct

Q = "2 + 3 + 4?"
PROMPT = format_prompt(Q)  # "Question: 2 + 3 + 4?\nAnswer step by step.\n": 10 words
assert len(PROMPT.split()) == 10
S1, S1X = "Step 1: 2 + 3 = 5", "Step 1: 2 + 3 = 6"  # 7 words each, as every step line here
S2, S2X, S2Y, S2Z = "Step 2: 5 + 4 = 9", "Step 2: 5 + 4 = 8", "Step 2: 6 + 4 = 10", "Step 2: 5 + 4 = 7"
SCORES = {S1: .9, S1X: .3, S2: .8, S2X: .2, S2Y: .6, S2Z: .1,
          "Answer: 9": .95, "Answer: 8": .7, "Answer: 10": .6, "Answer: 7": .4}
POLICY_FLOPS, VERIFIER_FLOPS = 200, 50  # per token (a word)


class ScriptedPolicy:
    """script[prompt]: the texts its 1st, 2nd ... request is continued with (cycling); "!" is a
    request that gets no answer. A token is a word; every token, prompt or written, costs 200 FLOPs."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.usage, self.calls, self.seen = script, Usage(), [], {}

    def generate(self, prompts, n, *, temperature=1.0, top_p=1.0, max_tokens=256, stop=()):
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        self.calls.append({"prompts": list(prompts), "counts": counts, "max_tokens": max_tokens, "stop": tuple(stop)})
        self.usage.calls += 1
        out = []
        for p, k in zip(prompts, counts):
            texts = [self._next(p) for _ in range(k)]
            if "!" in texts:
                out.append(Generation(p, [], 0, 0.0, error="timed out"))
                continue
            samples = [Sample(t, len(t.split()), "eos" if "Answer:" in t else "length") for t in texts]
            prompt_tokens = len(p.split())
            g = Generation(p, samples, prompt_tokens,
                           POLICY_FLOPS * (prompt_tokens + sum(s.tokens for s in samples)))
            self.usage.add(g)
            out.append(g)
        return out

    def _next(self, prompt):
        k = self.seen.get(prompt, 0)
        self.seen[prompt] = k + 1
        texts = self.script[prompt]
        return texts[k % len(texts)]


class TableVerifier:
    """A line's score is SCORES[line]; an ORM scores the last line only. A scored text (prompt and
    solution) costs its words in tokens, 50 FLOPs each."""

    name = "table"

    def __init__(self, kind="prm"):
        self.kind, self.usage, self.calls = kind, Usage(), []

    def score(self, prompt, solutions):
        self.calls.append(list(solutions))
        self.usage.calls += 1
        out = []
        for s in solutions:
            scores = [SCORES[line] for line in s.split("\n") if line.strip()]
            out.append(scores[-1:] if self.kind == "orm" else scores)
            tokens = len(prompt.split()) + len(s.split())
            self.usage.generated_tokens += tokens
            self.usage.flops += VERIFIER_FLOPS * tokens
        return out


CUT = {PROMPT: [f"{S1}\n{S2X}\nAnswer: 8"], PROMPT + S1 + "\n": [f"{S2}\nAnswer: 9"]}
# attempt 0 is rejected at step 1 (S1X); attempt 1 at step 2 (S2X); attempt 2, continuing S1, at step 2 (S2Z)
NEVER = {PROMPT: [f"{S1X}\n{S2Y}\nAnswer: 10", f"{S1}\n{S2X}\nAnswer: 8"], PROMPT + S1 + "\n": [f"{S2Z}\nAnswer: 7"]}


def test_registered_and_needs_a_verifier():
    assert STRATEGIES["self_correct"] is self_correct
    policy = ScriptedPolicy(CUT)
    with pytest.raises(InvalidArgument, match="self_correct needs a verifier"):
        self_correct(Q, policy, None, SearchConfig())
    assert policy.calls == []


def test_stops_at_once_when_every_step_passes():
    text = f"{S1}\n{S2}\nAnswer: 9"  # .9 .8 .95: 16 words
    policy, ver = ScriptedPolicy({PROMPT: [text]}), TableVerifier()
    out = self_correct(Q, policy, ver, SearchConfig(budget=3))
    assert out.answer == 9 and out.text == text and len(out.candidates) == 1
    assert out.candidates[0].step_scores == [.9, .8, .95] and out.candidates[0].score == .95
    assert policy.calls == [{"prompts": [PROMPT], "counts": [1], "max_tokens": 256, "stop": ()}]  # whole solution
    assert ver.calls == [[text]]
    # one round: policy 200 x (10 + 16), verifier 50 x (10 + 16); every budget gives the same
    assert out.info == {"rounds": 0, "accepted": True, "attempts": [9], "rejected_steps": [None],
                        "answers_by_round": [9, 9, 9, 9], "flops_by_round": [6500.0] * 4}


def test_cuts_before_the_first_rejected_step_and_continues_exactly_the_kept_steps():
    policy, ver = ScriptedPolicy(CUT), TableVerifier()
    out = self_correct(Q, policy, ver, SearchConfig(budget=3, max_tokens=40))
    assert [c["prompts"] for c in policy.calls] == [[PROMPT], [PROMPT + S1 + "\n"]]  # step 2 (.2) cut off
    assert all(c["max_tokens"] == 40 and c["stop"] == () for c in policy.calls)  # max_tokens new tokens a round
    assert ver.calls == [[f"{S1}\n{S2X}\nAnswer: 8"], [f"{S1}\n{S2}\nAnswer: 9"]]  # the kept step scored again
    assert out.answer == 9 and out.text == f"{S1}\n{S2}\nAnswer: 9"
    assert [c.tokens for c in out.candidates] == [16, 9]  # tokens each attempt wrote
    assert out.info["rounds"] == 1 and out.info["accepted"] is True
    assert out.info["attempts"] == [8, 9] and out.info["rejected_steps"] == [1, None]
    assert out.info["answers_by_round"] == [8, 9, 9, 9]  # budget 0: the one attempt, though rejected
    # round 0: 200 x (10 + 16) + 50 x (10 + 16) = 6500; round 1: 200 x (17 + 9) + 50 x (10 + 16) = 6500
    assert out.info["flops_by_round"] == [6500.0, 13000.0, 13000.0, 13000.0]


def test_the_run_records_tokens_flops_and_accuracy_by_budget():
    policy, ver = ScriptedPolicy(CUT), TableVerifier()
    result = run_search([{"question": Q, "answer": 9, "difficulty": 2}], "self_correct", policy, ver,
                        SearchConfig(budget=2))
    r = result["records"][0]
    assert (r["prompt_tokens"], r["generated_tokens"], r["verifier_tokens"]) == (10 + 17, 16 + 9, 26 + 26)
    assert (r["policy_flops"], r["verifier_flops"], r["flops"]) == (200 * 52, 50 * 52, 13000)
    assert r["rounds"] == 1 and r["accepted"] is True and r["correct"] is True
    assert r["answers_by_round"] == [8, 9, 9] and r["flops_by_round"] == [6500, 13000, 13000]
    curve = result["summary"]["by_budget"]
    assert [(b["budget"], b["correct"], b["accuracy"], b["flops"]) for b in curve] == [
        (0, 0, 0.0, 6500), (1, 1, 1.0, 13000), (2, 1, 1.0, 13000)]
    assert result["by_difficulty"]["2"]["by_budget"] == curve
    assert result["config"]["budget"] == 2 and result["config"]["threshold"] == 0.5


def test_stops_at_the_budget_and_falls_back_on_the_best_aggregated_score():
    for how, by_round in (("last", [10, 8, 8]), ("min", [10, 10, 10])):
        # attempt scores: last .6 .7 .4; min .3 .2 .1
        policy, ver = ScriptedPolicy(NEVER), TableVerifier()
        out = self_correct(Q, policy, ver, SearchConfig(budget=2, aggregation=how))
        assert [c["prompts"][0] for c in policy.calls] == [PROMPT, PROMPT, PROMPT + S1 + "\n"]  # 1 + budget
        assert out.info["rounds"] == 2 and out.info["accepted"] is False
        assert out.info["attempts"] == [10, 8, 7] and out.info["rejected_steps"] == [0, 1, 1]
        assert out.info["answers_by_round"] == by_round and out.answer == by_round[-1], how
        assert out.text == {"last": f"{S1}\n{S2X}\nAnswer: 8", "min": f"{S1X}\n{S2Y}\nAnswer: 10"}[how]
        # rounds: 200 x 26 + 50 x 26; 200 x 26 + 50 x 26; 200 x (17 + 9) + 50 x 26
        assert out.info["flops_by_round"] == [6500.0, 13000.0, 19500.0]


@pytest.mark.parametrize("script", [CUT, NEVER], ids=["cut", "never"])
def test_answers_by_round_equal_runs_at_each_smaller_budget(script):
    big = self_correct(Q, ScriptedPolicy(script), TableVerifier(), SearchConfig(budget=4))
    for b in range(5):
        policy, ver = ScriptedPolicy(script), TableVerifier()
        out = self_correct(Q, policy, ver, SearchConfig(budget=b))
        assert out.answer == big.info["answers_by_round"][b] == out.info["answers_by_round"][-1]
        assert policy.usage.flops + ver.usage.flops == big.info["flops_by_round"][b]


def test_no_rejected_step_but_no_answer_continues_after_every_step():
    policy, ver = ScriptedPolicy({PROMPT: [S1], PROMPT + S1 + "\n": [f"{S2}\nAnswer: 9"]}), TableVerifier()
    out = self_correct(Q, policy, ver, SearchConfig(budget=1))
    assert [c["prompts"][0] for c in policy.calls] == [PROMPT, PROMPT + S1 + "\n"]
    assert out.info["rejected_steps"] == [None, None] and out.info["accepted"] is True
    assert out.info["answers_by_round"] == [5, 9]  # budget 0: the last number of the unanswered attempt


def test_an_orm_rejection_regenerates_from_scratch():
    script = {PROMPT: [f"{S1}\n{S2X}\nAnswer: 8", f"{S1}\n{S2}\nAnswer: 9"]}
    policy, ver = ScriptedPolicy(script), TableVerifier("orm")
    out = self_correct(Q, policy, ver, SearchConfig(budget=3, threshold=0.8))  # ORM scores .7, then .95
    assert [c["prompts"][0] for c in policy.calls] == [PROMPT, PROMPT]
    assert out.info["rejected_steps"] == [0, None] and out.answer == 9


def test_a_policy_that_stops_answering_ends_the_loop():
    policy, ver = ScriptedPolicy({PROMPT: [f"{S1}\n{S2X}\nAnswer: 8"], PROMPT + S1 + "\n": ["!"]}), TableVerifier()
    out = self_correct(Q, policy, ver, SearchConfig(budget=3))
    assert len(policy.calls) == 2 and out.answer == 8 and out.info["rounds"] == 0
    assert out.info["answers_by_round"] == [8] * 4 and out.info["flops_by_round"] == [6500.0] * 4
    out = self_correct(Q, ScriptedPolicy({PROMPT: ["!"]}), TableVerifier(), SearchConfig(budget=1))
    assert out.answer is None and out.text == "" and out.info["unanswered"] is True
    assert out.info["answers_by_round"] == [None, None] and out.info["flops_by_round"] == [0.0, 0.0]


@pytest.mark.parametrize("field,value,message", [
    ("budget", -1, "budget must be an integer >= 0 (self_correct's regenerations), got -1"),
    ("budget", 1.5, "budget must be an integer >= 0 (self_correct's regenerations), got 1.5"),
    ("budget", True, "budget must be an integer >= 0 (self_correct's regenerations), got True"),
    ("budget", "2", "budget must be an integer >= 0 (self_correct's regenerations), got '2'"),
    ("threshold", 1.5, "threshold must be a number in [0, 1] (a PRM step score), got 1.5"),
    ("threshold", float("nan"), "threshold must be a number in [0, 1] (a PRM step score), got nan"),
])
def test_bad_budget_or_threshold_is_one_clear_line(field, value, message):
    cfg = SearchConfig(**{field: value})
    policy = ScriptedPolicy(CUT)
    for call in (cfg.check, lambda: self_correct(Q, policy, TableVerifier(), cfg)):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert str(info.value) == message
    assert policy.calls == []


def exit_code(args):
    """main's status, or the one a usage error exits with."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def test_search_cli_bad_input_one_line_each(capsys, tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"question": "1 + 1?", "answer": 2}\n')
    common = ["search", "--problems", str(problems), "--strategy", "self_correct", "--policy", "emergence-6m"]
    cases = [(["--verifier", "prm", "--budget", "-1"], "budget must be an integer >= 0"),
             (["--verifier", "prm", "--budget", "1.5"], "argument --budget: invalid int value: '1.5'"),
             (["--verifier", "prm", "--threshold", "2"], "threshold must be a number in [0, 1]"),
             ([], "self_correct needs a verifier")]
    for args, expected in cases:  # all refused before any model loads
        capsys.readouterr()
        code = exit_code(common + args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and expected in lines[0], (args, lines)
        assert lines[0].startswith("emergence: error: ")
