"""Test-time search (emergence.search): every strategy on a fake policy and verifier with known
outputs (exact choices), the FLOPs formula on known shapes, the local policy on emergence-6m
with a tiny random reward model (mechanics with real values: completions, token counts,
FLOPs, the N samples sharing the prompt's KV blocks), the bad-input lines of
`emergence search`, and the HTTP policy against emergence's own server."""

from __future__ import annotations

import json
import itertools
import math
import socket

import pytest
import torch

import emergence
from emergence.align.reward import RewardModel, save_reward_model
from emergence.cli import main
from emergence.config import Config
from emergence.errors import InvalidArgument
from emergence.model import Transformer
from emergence.problems import generate_problems, write_problems
from emergence.search import (PROMPT_TEMPLATE, FlopsModel, Generation, HTTPPolicy, LocalPolicy, RewardVerifier,
                              Sample, SearchConfig, Usage, aggregate, format_prompt, revision_prompt, run_search,
                              wilson_interval)
from emergence.search.flops import attention_context
from emergence.search.strategies import (Table, beam_search, best_of_n, compute_optimal, dvts, fit_table, majority,
                                         majority_answer, revisions, weighted_answer, weighted_best_of_n)
from emergence.search.verifier import check_tokenizers

Q = "A car drives 50 miles per hour for 3 hours. How far does it travel?"
PROMPT = format_prompt(Q)


# ------------------------------------------------------------------ fakes with known outputs
class FakePolicy:
    """respond(prompt, j, temperature, stop) -> (text, finish): sample j of a prompt in a call.
    Every call is logged as (prompts, counts, stop)."""

    name = "fake"

    def __init__(self, respond):
        self.respond, self.usage, self.calls = respond, Usage(), []

    def generate(self, prompts, n, *, temperature=1.0, top_p=1.0, max_tokens=256, stop=()):
        counts = [n] * len(prompts) if isinstance(n, int) else list(n)
        self.calls.append((list(prompts), counts, tuple(stop)))
        self.usage.calls += 1
        out = []
        for p, k in zip(prompts, counts):
            samples = []
            for j in range(k):
                text, finish = self.respond(p, j, temperature, stop)
                samples.append(Sample(text, len(text.split()), finish))
            g = Generation(p, samples, len(p.split()), 0.0)
            self.usage.add(g)
            out.append(g)
        return out


def whole(texts):
    """A policy whose j-th whole sample is texts[j]."""
    return FakePolicy(lambda p, j, t, stop: (texts[j % len(texts)], "eos"))


class FakeVerifier:
    """Step scores from a table: the score of a line is lines[line] (default 0.5); an ORM scores
    the last line only."""

    name = "fake-verifier"

    def __init__(self, lines, kind="prm"):
        self.lines, self.kind, self.usage, self.calls = lines, kind, Usage(), []

    def score(self, prompt, solutions):
        self.calls.append(list(solutions))
        out = []
        for s in solutions:
            scores = [self.lines.get(line, 0.5) for line in s.split("\n") if line.strip()]
            out.append(scores[-1:] if self.kind == "orm" else scores)
        return out


# ------------------------------------------------------------------------ parallel sampling
def test_majority_vote_ties_go_to_the_answer_met_first():
    assert majority_answer([3, 5, 5, 3, 7]) == 3
    assert majority_answer([None, None, 4]) == 4 and majority_answer([None]) is None
    texts = ["Step 1: 1 + 2 = 3\nAnswer: 3", "Answer: 5", "Answer: 5\nmore text", "Answer: 3", "Answer: 7", "nothing"]
    out = majority(Q, whole(texts), None, SearchConfig(n=6))
    assert out.answer == 3 and out.text == texts[0] and len(out.candidates) == 6
    assert out.candidates[2].text == "Answer: 5"  # what follows the answer line is not the solution
    assert out.candidates[5].answer is None


def test_best_of_n_by_orm_and_by_prm_with_each_aggregation():
    a = "Step 1: a\nStep 2: a\nAnswer: 1"  # steps 0.9 0.9 0.5: last .5, min .5, prod .405
    b = "Step 1: b\nStep 2: b\nAnswer: 2"  # steps 0.6 0.6 0.95: last .95, min .6, prod .342
    c = "Step 1: c\nStep 2: c\nAnswer: 3"  # steps 0.7 0.7 0.7: last .7, min .7, prod .343
    lines = {"Step 1: a": .9, "Step 2: a": .9, "Answer: 1": .5, "Step 1: b": .6, "Step 2: b": .6, "Answer: 2": .95,
             "Step 1: c": .7, "Step 2: c": .7, "Answer: 3": .7}
    assert aggregate([.9, .9, .5], "last") == .5 and aggregate([.6, .6, .95], "min") == .6
    assert math.isclose(aggregate([.9, .9, .5], "prod"), .405) and aggregate([], "min") == 0.0
    picks = {how: best_of_n(Q, whole([a, b, c]), FakeVerifier(lines), SearchConfig(n=3, aggregation=how)).answer
             for how in ("last", "min", "prod")}
    assert picks == {"last": 2, "min": 3, "prod": 1}
    orm = best_of_n(Q, whole([a, b, c]), FakeVerifier(lines, "orm"), SearchConfig(n=3))
    assert orm.answer == 2 and [c.step_scores for c in orm.candidates] == [[.5], [.95], [.7]]
    # a tie in score: the first candidate
    assert best_of_n(Q, whole([c, "Answer: 9"]), FakeVerifier({"Answer: 3": .7, "Answer: 9": .7}, "orm"),
                     SearchConfig(n=2)).answer == 3
    with pytest.raises(InvalidArgument, match="best_of_n needs a verifier"):
        best_of_n(Q, whole([a]), None, SearchConfig(n=1))


def test_weighted_best_of_n_sums_scores_per_distinct_answer():
    texts = ["x\nAnswer: 10", "y\nAnswer: 20", "z\nAnswer: 20", "w\nAnswer: 30"]
    lines = {"Answer: 10": .9, "Answer: 20": .5, "Answer: 30": .3, "y": .1, "z": .2}
    ver = FakeVerifier(lines)
    assert best_of_n(Q, whole(texts), ver, SearchConfig(n=4)).answer == 10
    out = weighted_best_of_n(Q, whole(texts), ver, SearchConfig(n=4))
    assert out.answer == 20  # 0.5 + 0.5 > 0.9
    assert out.text == texts[1]  # the answer's best-scored solution (a tie: the first)
    out = weighted_best_of_n(Q, whole(texts), ver, SearchConfig(n=4, aggregation="min"))
    assert out.answer == 10 and out.text == texts[0]  # min: 10 -> .9; 20 -> .1 + .2; 30 -> .3
    assert weighted_answer([1, 2, 2, None], [.5, .25, .25, 9]) == 1  # a tie: the first met; None never wins


# ------------------------------------------------------------------------ step-wise search
STEPS = {  # the last line of the partial solution -> its children, sample j
    "": ["a0", "a1", "a2", "a3"],
    "a1": ["a1-0", "a1-1"], "a3": ["a3-0", "a3-1"],
    "a3-0": ["Answer: 30", "Answer: 31"], "a1-1": ["Answer: 10", "Answer: 11"],
}
STEP_SCORES = {"a0": .1, "a1": .9, "a2": .5, "a3": .7, "a1-0": .2, "a1-1": .6, "a3-0": .8, "a3-1": .4,
               "Answer: 30": .3, "Answer: 31": .95, "Answer: 10": .5, "Answer: 11": .6}


def stepper(steps=STEPS):
    def respond(prompt, j, temperature, stop):
        partial = prompt[len(PROMPT):]
        last = partial.rstrip("\n").split("\n")[-1] if partial else ""
        choices = steps.get(last, ["Answer: 0"])
        return choices[j % len(choices)], "stop"
    return FakePolicy(respond)


def test_beam_search_keeps_the_best_n_over_m_beams_step_by_step():
    policy, ver = stepper(), FakeVerifier(STEP_SCORES)
    out = beam_search(Q, policy, ver, SearchConfig(n=4, width=2))
    trace = out.info["trace"]
    assert trace[0] == ["a1\n", "a3\n"]  # .9 and .7 of a0..a3
    assert trace[1] == ["a3\na3-0\n", "a1\na1-1\n"]  # .8 and .6 of the four children
    assert trace[2] == []  # every beam answered
    assert out.answer == 31 and out.text == "a3\na3-0\nAnswer: 31"
    # the policy was asked for N samples of the prompt, then M of each kept beam, one step each
    assert [c[1] for c in policy.calls] == [[4], [2, 2], [2, 2]]
    assert all(c[2] == ("\n",) for c in policy.calls)
    assert policy.calls[1][0] == [PROMPT + "a1\n", PROMPT + "a3\n"]
    assert sorted(c.text for c in out.candidates) == sorted(["a3\na3-0\nAnswer: 30", "a3\na3-0\nAnswer: 31",
                                                             "a1\na1-1\nAnswer: 10", "a1\na1-1\nAnswer: 11"])
    with pytest.raises(InvalidArgument, match="N = 6 is not a multiple of M = 4"):
        beam_search(Q, policy, ver, SearchConfig(n=6, width=4))


def test_beam_search_lookahead_scores_a_step_at_the_end_of_its_greedy_rollout():
    steps = {"": ["a0", "a1"], "a0": ["good"], "a1": ["bad"], "good": ["Answer: 1"], "bad": ["Answer: 2"]}
    scores = {"a0": .1, "a1": .9, "good": .8, "bad": .2, "Answer: 1": .9, "Answer: 2": .1}
    plain = beam_search(Q, stepper(steps), FakeVerifier(scores), SearchConfig(n=2, width=2))
    assert plain.info["trace"][0] == ["a1\n"]
    policy, ver = stepper(steps), FakeVerifier(scores)
    ahead = beam_search(Q, policy, ver, SearchConfig(n=2, width=2, lookahead=1))
    assert ahead.info["trace"][0] == ["a0\n"] and ahead.answer == 1
    assert ver.calls[0] == ["a0\ngood\n", "a1\nbad\n"]  # scored after the rollout, which is not kept
    assert policy.calls[1][1:] == ([1, 1], ("\n",))  # the rollouts: one greedy step per child


def test_dvts_splits_n_into_n_over_m_subtrees_each_greedy_by_prm():
    steps = {"": ["s0", "s1", "s2", "s3", "s4", "s5"],
             "s1": ["t1a", "t1b"], "s2": ["t2a", "t2b"], "s5": ["t5a", "t5b"],
             "t1b": ["Answer: 1"], "t2a": ["Answer: 2"], "t5a": ["Answer: 5"]}
    scores = {"s0": .1, "s1": .8, "s2": .9, "s3": .2, "s4": .3, "s5": .6,
              "t1a": .1, "t1b": .7, "t2a": .6, "t2b": .5, "t5a": .9, "t5b": .8,
              "Answer: 1": .4, "Answer: 2": .5, "Answer: 5": .99}
    policy = stepper(steps)

    def respond(prompt, j, temperature, stop):  # subtree k's samples of the prompt are j = 2k, 2k + 1
        partial = prompt[len(PROMPT):]
        last = partial.rstrip("\n").split("\n")[-1] if partial else ""
        if last in ("t1b", "t2a", "t5a"):
            return steps[last][0], "stop"
        return steps[last][j % len(steps[last])], "stop"
    policy.respond = respond
    out = dvts(Q, policy, FakeVerifier(scores), SearchConfig(n=6, width=2))
    assert out.info["subtrees"] == 3
    assert out.info["trace"][0] == ["s1\n", "s2\n", "s5\n"]  # the best of (s0 s1), (s2 s3), (s4 s5)
    assert out.info["trace"][1] == ["s1\nt1b\n", "s2\nt2a\n", "s5\nt5a\n"]
    assert [c.text for c in out.candidates] == ["s1\nt1b\nAnswer: 1", "s2\nt2a\nAnswer: 2", "s5\nt5a\nAnswer: 5"]
    assert out.answer == 5
    assert [c[1] for c in policy.calls] == [[6], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(InvalidArgument, match="dvts splits N = 6 samples into subtrees of width M = 4"):
        dvts(Q, policy, FakeVerifier(scores), SearchConfig(n=6, width=4))


def test_revisions_prompt_with_the_previous_attempts_and_vote():
    answers = iter(["Answer: 4", "Answer: 5", "Answer: 5"])
    policy = FakePolicy(lambda p, j, t, stop: (next(answers), "eos"))
    out = revisions(Q, policy, None, SearchConfig(n=3, window=1))
    prompts = [c[0][0] for c in policy.calls]
    assert prompts[0] == PROMPT
    assert prompts[1] == revision_prompt(Q, ["Answer: 4"]) == (f"Question: {Q}\nAttempt 1:\nAnswer: 4\n"
                                                               "Revise: answer step by step.\n")
    assert prompts[2] == f"Question: {Q}\nAttempt 2:\nAnswer: 5\nRevise: answer step by step.\n"  # window 1
    assert out.answer == 5 and out.info["select"] == "majority"
    answers = iter(["Answer: 4", "Answer: 5", "Answer: 5"])
    out = revisions(Q, policy, FakeVerifier({"Answer: 4": .9}), SearchConfig(n=3))
    assert out.answer == 4 and out.info["select"] == "verifier"


class CostlyPolicy(FakePolicy):
    """A FakePolicy whose generation costs 10 FLOPs per word of its prompt."""

    def generate(self, prompts, n, **kw):
        out = super().generate(prompts, n, **kw)
        self.usage.flops += sum(10.0 * len(g.prompt.split()) for g in out)
        return out


def test_revisions_give_the_answer_and_flops_after_every_attempt():
    texts = ["Answer: 4", "Answer: 5", "Answer: 5", "Answer: 6"]

    def policy():
        it = iter(texts)
        return CostlyPolicy(lambda p, j, t, stop: (next(it), "eos"))

    first = policy()
    big = revisions(Q, first, None, SearchConfig(n=4, window=2))
    assert big.info["answers_by_round"] == [4, 4, 5, 5]  # majority so far; a tie: the answer met first
    assert big.info["attempt_answers"] == [4, 5, 5, 6]
    spent = list(itertools.accumulate(10.0 * len(c[0][0].split()) for c in first.calls))
    assert big.info["flops_by_round"] == spent and spent[1] > spent[0] > 0
    for n in range(1, 5):  # a run with N = n: the same first n attempts, the same answer and FLOPs
        out = revisions(Q, policy(), None, SearchConfig(n=n, window=2))
        assert out.answer == big.info["answers_by_round"][n - 1]
        assert out.info["flops_by_round"] == spent[:n]
    # a verifier scores each attempt as it comes; the answer is the best-scored attempt so far
    verifier = FakeVerifier({"Answer: 4": .3, "Answer: 5": .8, "Answer: 6": .9}, "orm")
    out = revisions(Q, policy(), verifier, SearchConfig(n=4))
    assert verifier.calls == [[t] for t in texts]
    assert out.info["answers_by_round"] == [4, 5, 5, 6] and out.answer == 6 and out.info["select"] == "verifier"


def test_compute_optimal_fits_a_table_per_bin_and_follows_it():
    metrics = [0.1, 0.2, 0.8, 0.9]  # two hard problems, two easy ones
    results = {("beam_search", 4, 2): [(1, 10.0), (1, 10.0), (0, 10.0), (1, 10.0)],
               ("majority", 4, 2): [(0, 5.0), (1, 5.0), (1, 5.0), (1, 5.0)],
               ("best_of_n", 4, 2): [(0, 8.0), (1, 8.0), (1, 8.0), (1, 8.0)]}
    table = fit_table(metrics, results, 2, "oracle", 2)
    assert table.edges == [0.8]
    assert [c["strategy"] for c in table.choices] == ["beam_search", "majority"]  # easy: a tie, the cheaper
    assert table.bin(0.5) == 0 and table.bin(0.8) == 1 and table.level(0) == 2 and table.level(1) == 1
    assert Table.from_json(json.loads(json.dumps(table.to_json()))).choices == table.choices

    def respond(prompt, j, temperature, stop):  # "easy" questions are answered right, the others not
        if not stop:
            return ("Answer: 150" if "easy" in prompt else "Answer: 7"), "eos"
        return "Answer: 150", "stop"
    policy, ver = FakePolicy(respond), FakeVerifier({})
    easy = compute_optimal("easy " + Q, policy, ver, SearchConfig(n=4, width=2, table=table), 150)
    assert easy.info["chosen"] == "majority@4" and easy.info["level"] == 1 and easy.info["metric"] == 1.0
    assert policy.calls[0][1] == [2]  # the probe: probe_n samples
    hard = compute_optimal(Q, policy, ver, SearchConfig(n=4, width=2, table=table), 150)
    assert hard.info["chosen"] == "beam_search@4" and hard.info["level"] == 2 and hard.answer == 150
    by_score = Table("verifier", 2, [0.6], table.choices)
    out = compute_optimal(Q, policy, FakeVerifier({"Answer: 7": 0.7}), SearchConfig(n=4, width=2, table=by_score))
    assert out.info["metric"] == 0.7 and out.info["chosen"] == "majority@4"


# ------------------------------------------------------------------------------ FLOPs, CI
def test_flops_formula_on_known_shapes():
    lm = emergence.load("emergence-6m", device="cpu")
    fm = FlopsModel.of(lm.model)
    d, ff, layers, vocab = 256, 704, 6, 4096
    assert fm == FlopsModel(layers * (4 * d * d + 3 * d * ff) + vocab * d, layers, 4 * 64)  # the tied head counts
    assert attention_context(0, 3) == 1 + 2 + 3 and attention_context(5, 2) == 6 + 7
    assert fm.forward_flops(5, 2) == 2 * fm.params * 2 + 2 * layers * 256 * 13
    assert fm.generation_flops(10, [3, 0, 1]) == (fm.forward_flops(0, 10) + fm.forward_flops(10, 3)
                                                  + fm.forward_flops(10, 1))
    config = Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=96, block_size=64)
    rm = RewardModel(Transformer(config), pad_token_id=0)  # GQA: k, v are 64 x 32; no LM head, a 1 x 64 score head
    assert FlopsModel.of(rm) == FlopsModel(2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96) + 64, 2, 64)
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# -------------------------------------------------------------- the local policy, end to end
@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 6M-parameter model: one thread is fastest, and on a busy machine by far
    yield emergence.load("emergence-6m", device="cpu")
    torch.set_num_threads(threads)


def tiny_reward_model(base_config: Config, seed: int = 0) -> RewardModel:
    config = Config(**{**base_config.__dict__, "n_layer": 2, "n_embd": 64, "n_head": 2, "n_kv_head": 2,
                       "head_dim": 32, "intermediate_size": 128})
    torch.manual_seed(seed)
    return RewardModel(Transformer(config), pad_token_id=0).eval()


@pytest.fixture(scope="module")
def verifier(lm):
    return RewardVerifier(tiny_reward_model(lm.config), lm.tokenizer, kind="prm")


def test_the_n_samples_share_the_prompts_kv_blocks(lm):
    policy = LocalPolicy(lm, seed=1)
    prompt = format_prompt(" ".join([Q] * 3))  # more than one 64-token block
    p_tokens = len(lm.tokenizer.encode(prompt))
    assert p_tokens > 64
    gen = policy.generate([prompt], 8, temperature=1.0, max_tokens=6)[0]
    stats = policy.last_stats
    assert stats["forks"] == 7 and stats["prefill_tokens"] == p_tokens  # prefilled once, not 8 times
    assert stats["prompt_block_refs"] == [[8, 8]]  # both prompt blocks held by all 8 samples
    assert stats["blocks_used_after_fork"] == 2  # 8 rows, one copy of the prompt
    # only the shared, partly filled last block is copied, by 7 writers (the last holder writes in place)
    assert stats["block_copies"] == 7 and stats["peak_blocks_used"] == 2 + 7
    assert stats["backend"] == "native"  # the native batched step
    assert len(gen.samples) == 8 and gen.prompt_tokens == p_tokens
    assert len({s.text for s in gen.samples}) > 1  # each sample its own generator
    # greedy: one sample is what emergence.generate writes
    greedy = policy.generate([prompt], 1, temperature=0.0, max_tokens=10)[0].samples[0]
    ref = lm.complete(prompt, temperature=0, max_new_tokens=10)
    assert greedy.text == ref.text and greedy.tokens == len(ref.token_ids)


def test_best_of_n_and_beam_search_on_emergence_6m_with_a_random_prm(lm, verifier):
    row = {"question": Q, "answer": 150, "difficulty": 1}
    fm, vf = FlopsModel.of(lm.model), verifier.flops_model
    prompt_tokens = len(lm.tokenizer.encode(PROMPT))
    policy = LocalPolicy(lm, seed=3)
    cfg = SearchConfig(n=4, width=2, max_tokens=16, step_tokens=8, max_steps=3, temperature=1.0)
    from emergence.search.run import solve_problem

    rec = solve_problem(row, "best_of_n", policy, verifier, cfg)
    assert rec["candidates"] == 4 and rec["prompt_tokens"] == prompt_tokens
    gen_tokens = rec["generated_tokens"]
    assert 4 <= gen_tokens <= 4 * 16
    # FLOPs: the prompt once, each sample's tokens after it; the verifier reads prompt + solution lines
    out = best_of_n(Q, LocalPolicy(lm, seed=3), verifier, cfg)  # the same seed: the same samples
    assert sum(c.tokens for c in out.candidates) == gen_tokens
    assert rec["policy_flops"] == fm.generation_flops(prompt_tokens, [c.tokens for c in out.candidates])
    scored = [PROMPT + "".join(line + "\n" for line in c.text.split("\n") if line.strip()) for c in out.candidates]
    assert rec["verifier_tokens"] == sum(len(lm.tokenizer.encode(t)) for t in scored)
    assert rec["verifier_flops"] == sum(vf.forward_flops(0, len(lm.tokenizer.encode(t))) for t in scored)
    assert rec["flops"] == rec["policy_flops"] + rec["verifier_flops"]
    assert all(0 < s < 1 for c in out.candidates for s in c.step_scores)

    result = run_search([row, {**row, "difficulty": 2}], "beam_search", LocalPolicy(lm, seed=4), verifier, cfg)
    recs = result["records"]
    assert result["summary"]["problems"] == 2 and set(result["by_difficulty"]) == {"1", "2"}
    for r in recs:
        assert 1 <= r["rounds"] <= 3 and r["candidates"] >= 1
        assert r["prompt_tokens"] >= prompt_tokens and r["generated_tokens"] > 0 and r["flops"] > 0
    lo, hi = result["summary"]["ci95"]
    assert 0 <= lo <= result["summary"]["accuracy"] <= hi <= 1


def test_prm_scores_each_step_at_the_token_holding_its_newline(lm, verifier):
    solution = "Step 1: 50 × 3 = 150\nAnswer: 150"
    [scores] = verifier.score(PROMPT, [solution])
    text = PROMPT + solution + "\n"
    ids = lm.tokenizer.encode(text)
    with torch.no_grad():
        head = verifier.model.token_scores(torch.tensor([ids]))[0]
    newlines = [i for i, t in enumerate(ids) if lm.tokenizer.decode([t]) == "\n"][-2:]
    assert scores == pytest.approx([torch.sigmoid(head[i]).item() for i in newlines], abs=1e-6)
    orm = RewardVerifier(verifier.model, lm.tokenizer, kind="orm")
    [[one]] = orm.score(PROMPT, [solution])
    assert one == pytest.approx(torch.sigmoid(verifier.model(torch.tensor([lm.tokenizer.encode(PROMPT + solution)])))
                                .item(), abs=1e-6)


# ------------------------------------------------------------------------------ the CLI
def run_main(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory, lm):
    root = tmp_path_factory.mktemp("search")
    write_problems(generate_problems(3, "1-2", seed=5), root / "p.jsonl")
    save_reward_model(tiny_reward_model(lm.config), root / "prm")
    lm.tokenizer.save(root / "prm")
    stories = emergence.load("stories260K", device="cpu")
    other = RewardModel(Transformer(Config(**{**stories.config.__dict__, "n_layer": 1})), pad_token_id=0)
    save_reward_model(other, root / "other-prm")
    stories.tokenizer.save(root / "other-prm")
    return root


def test_search_cli_bad_input_one_line_each(capsys, files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1 + 1?", "answer": 2}\n{"question": "2 + 2?"}\n')
    common = ["--policy", "emergence-6m", "--n", "6", "--width", "4"]
    cases = [
        (["--problems", str(bad), "--strategy", "majority"], f"{bad}:2: missing 'answer'"),
        (["--problems", str(files / "p.jsonl"), "--strategy", "dvts", "--verifier", str(files / "prm")],
         "dvts splits N = 6 samples into subtrees of width M = 4: N must be a multiple of M"),
        (["--problems", str(files / "p.jsonl"), "--strategy", "beam_search"], "beam_search keeps N / M beams"),
        (["--problems", str(files / "p.jsonl"), "--strategy", "best_of_n", "--width", "2"],
         "best_of_n needs a verifier"),
        (["--problems", str(files / "p.jsonl"), "--strategy", "nope"], "unknown search strategy 'nope'"),
        (["--problems", str(files / "p.jsonl"), "--strategy", "best_of_n", "--width", "2", "--verifier",
          str(files / "other-prm"), "--tokenizer-mismatch", "refuse"],
         "the verifier " + str(files / "other-prm") + "'s tokenizer (512 tokens"),
    ]
    for args, expected in cases:
        code, out, err = run_main(capsys, "search", *common, *args)  # the case's flags come last and win
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and expected in lines[0], (args, err)
        assert lines[0].startswith("emergence: error: ")


def test_search_cli_runs_prints_json_and_plots(capsys, files, tmp_path):
    p = str(files / "p.jsonl")
    code, out, err = run_main(capsys, "search", "--problems", p, "--strategy", "majority,best_of_n", "--n", "2",
                              "--policy", "emergence-6m", "--verifier", str(files / "prm"), "--max-tokens", "8",
                              "--limit", "2", "--plot", str(tmp_path / "plot.png"))
    assert code == 0, err
    assert out.count("accuracy") == 4 and "95% CI" in out and "FLOPs" in out  # N = 1 and 2, both strategies
    assert (tmp_path / "plot.png").stat().st_size > 1000
    code, out, err = run_main(capsys, "search", "--problems", p, "--strategy", "best_of_n", "--n", "2",
                              "--policy", "emergence-6m", "--verifier", str(files / "other-prm"), "--max-tokens", "6",
                              "--limit", "1", "--json")
    assert code == 0, err
    assert "re-encoded as text with the verifier's tokenizer" in err and len(err.strip().splitlines()) == 1
    result = json.loads(out)
    assert result["strategy"] == "best_of_n" and result["summary"]["problems"] == 1
    assert result["records"][0]["verifier_tokens"] > 0 and result["summary"]["flops"] > 0


def test_search_cli_runs_self_correct_with_accuracy_by_budget(capsys, files, tmp_path):
    p = str(files / "p.jsonl")
    code, out, err = run_main(capsys, "search", "--problems", p, "--strategy", "self_correct", "--budget", "2",
                              "--threshold", "0.9", "--policy", "emergence-6m", "--verifier", str(files / "prm"),
                              "--max-tokens", "8", "--limit", "2", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["budget"] == 2 and result["config"]["threshold"] == 0.9
    for r in result["records"]:
        assert len(r["answers_by_round"]) == len(r["flops_by_round"]) == 3 and 0 <= r["rounds"] <= 2
        assert r["answers_by_round"][-1] == r["answer"]
        assert math.isclose(r["flops_by_round"][-1], r["flops"]) and r["verifier_tokens"] > 0
    curve = result["summary"]["by_budget"]
    assert [b["budget"] for b in curve] == [0, 1, 2] and curve[0]["flops"] <= curve[1]["flops"] <= curve[2]["flops"]
    code, out, err = run_main(capsys, "search", "--problems", p, "--strategy", "self_correct", "--budget", "1",
                              "--policy", "emergence-6m", "--verifier", str(files / "prm"), "--max-tokens", "6",
                              "--limit", "1", "--plot", str(tmp_path / "plot.png"))
    assert code == 0, err
    assert "self_correct budget=1 threshold=0.5: accuracy" in out and "  by budget: 0: " in out
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_check_tokenizers_names_both(lm):
    stories = emergence.load("stories260K", device="cpu")
    assert check_tokenizers(lm.tokenizer, lm.tokenizer, "a", "b") is None
    assert "re-encoded" in check_tokenizers(lm.tokenizer, stories.tokenizer, "emergence-6m", "v")
    with pytest.raises(InvalidArgument, match="the verifier v's tokenizer .* differs from the policy emergence-6m's"):
        check_tokenizers(lm.tokenizer, stories.tokenizer, "emergence-6m", "v", "refuse")


# ------------------------------------------------------------------------------- over HTTP
@pytest.fixture(scope="module")
def served(lm):
    from emergence.serve.app import Server, serve_in_thread

    app = Server(lm, "emergence-6m", slots=4)
    server, thread = serve_in_thread(app)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    app.close()


def test_http_policy_takes_the_same_greedy_steps_as_the_local_one(lm, served):
    local = LocalPolicy(lm)
    remote = HTTPPolicy(served + "/v1", flops_model=FlopsModel.of(lm.model), tokenizer=lm.tokenizer)
    partial, steps = "Step 1:", []
    for _ in range(3):  # three greedy steps, each continuing the solution so far
        [mine] = local.generate([PROMPT + partial], 1, temperature=0.0, max_tokens=12, stop=("\n",))
        [theirs] = remote.generate([PROMPT + partial], 1, temperature=0.0, max_tokens=12, stop=("\n",))
        assert theirs.samples[0].text == mine.samples[0].text
        assert theirs.samples[0].tokens == mine.samples[0].tokens
        assert theirs.prompt_tokens == mine.prompt_tokens and theirs.flops == mine.flops
        partial += mine.samples[0].text + "\n"
        steps.append(mine.samples[0].text)
    assert any(steps)
    assert remote.model == "emergence-6m" and remote.usage.timeouts == 0
    two = remote.generate([PROMPT, PROMPT + "Step 1:"], [3, 2], temperature=1.0, max_tokens=4)
    assert [len(g.samples) for g in two] == [3, 2] and remote.usage.timeouts == 0


def test_an_endpoint_that_does_not_answer_is_a_counted_timeout(capsys, files):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there
    policy = HTTPPolicy(f"http://127.0.0.1:{port}", model="m", timeout=2)
    [gen] = policy.generate([PROMPT], 2)
    assert gen.error and gen.samples == [] and policy.usage.timeouts == 1
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        slow = HTTPPolicy(f"http://127.0.0.1:{silent.getsockname()[1]}", model="m", timeout=0.3)
        out = majority(Q, slow, None, SearchConfig(n=2))
        assert out.answer is None and out.info["unanswered"] and slow.usage.timeouts == 1
    finally:
        silent.close()
    code, out, err = run_main(capsys, "search", "--problems", str(files / "p.jsonl"), "--strategy", "majority",
                              "--n", "2", "--policy", f"http://127.0.0.1:{port}", "--policy-model", "m",
                              "--timeout", "1", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["summary"]["timeouts"] == 3 and result["summary"]["accuracy"] == 0.0
    assert result["summary"]["flops"] is None  # an endpoint of unknown shape
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "3 requests to" in lines[0] and "got no answer within 1 s" in lines[0]


def test_prompt_template_is_the_documented_constant():
    assert PROMPT_TEMPLATE == "Question: {question}\nAnswer step by step.\n"
    assert PROMPT == f"Question: {Q}\nAnswer step by step.\n"
