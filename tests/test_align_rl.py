"""emergence.align.rl: GRPO and PPO with rollouts through the batched decode path (forks), rewards
from Python functions or a reward model, LoRA with the adapter-disabled base as the reference,
exact resume, --kl-stop, and the command line's bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import assert_one_line_error, cli_main, word_level_tokenizer
from emergence.adapters.lora import adapters_disabled
from emergence.align import losses
from emergence.align.reward import RewardModel, save_reward_model
from emergence.align.rewards import FunctionRewards, exact_answer, format_reward, load_reward_function
from emergence.align.rl import RLConfig, RLRun, completion_logps, load_prompts, sample_groups
from emergence.config import Config
from emergence.errors import InvalidArgument
from emergence.model import Transformer
from emergence.sampling import SamplingParams
from emergence.weights.hf import save_hf

REWARDS = '''
def t7(prompt, completion, row):
    words = completion.split()
    return sum(w == "t7" for w in words) / max(len(words), 1)

def flaky(prompt, completion, row):
    if row["i"] % 4 == 0:
        raise ValueError("no reward for this one")
    if row["i"] % 4 == 1:
        return float("nan")
    if row["i"] % 4 == 2:
        return None
    return 1.0
'''


def tiny_config(**overrides) -> Config:
    settings = dict(vocab_size=96, block_size=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Config.from_name("tiny-llama", **{**settings, **overrides})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny random llama (HF layout, word-level tokenizer), 8 prompts and a rewards module."""
    root = tmp_path_factory.mktemp("rl")
    torch.manual_seed(0)
    save_hf(Transformer(tiny_config()), root / "model")
    word_level_tokenizer().save(root / "model")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": " ".join(f"t{5 + i + j}" for j in range(3)), "i": i}) + "\n")
    (root / "rewards.py").write_text(REWARDS)
    return root


def config(files, out, **overrides) -> RLConfig:
    settings = dict(method="grpo", model=str(files / "model"), prompts=str(files / "prompts.jsonl"), out=str(out),
                    reward=[f"{files / 'rewards.py'}:t7"], max_new_tokens=8, group=8, prompts_per_step=4, lr=1e-2,
                    max_steps=15, progress=False, checkpoint_every=100)
    return RLConfig(**{**settings, **overrides})


# ------------------------------------------------------------------------------ rollouts
def test_groups_share_the_prompt_and_stop_with_their_end_token(files, one_thread):
    run = RLRun(config(files, files / "unused"))
    prompts = [run.prompts[0].ids, run.prompts[1].ids]
    samples = sample_groups(run.model, run.tokenizer, prompts, 4, SamplingParams(max_new_tokens=8), seed=3)
    again = sample_groups(run.model, run.tokenizer, prompts, 4, SamplingParams(max_new_tokens=8), seed=3)
    assert [s.token_ids for s in samples] == [s.token_ids for s in again]  # seeded
    assert len({tuple(s.token_ids) for s in samples}) > 4  # the forks draw their own tokens
    for s in samples:
        assert 1 <= len(s.token_ids) <= 8
        assert (s.finish_reason == "stop") == (s.token_ids[-1] == 2)  # the end token is kept (trained on)
        assert s.text == run.tokenizer.decode(s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids)


def test_a_stop_string_of_several_tokens_ends_a_completion(files, one_thread):
    """A template stop string longer than one token (chatml's <|im_end|> in a small vocabulary)
    ends the completion as generate() does: its tokens are kept (trained on), the text stops before it."""
    run = RLRun(config(files, files / "unused"))
    prompt = [run.prompts[0].ids]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    free = sample_groups(run.model, run.tokenizer, prompt, 1, params, seed=5)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    cut = 10  # a stop string made of the free run's tokens 10 and 11
    stop = run.tokenizer.decode(free.token_ids[cut:cut + 2]).strip()
    first = run.tokenizer.decode(free.token_ids).find(stop)
    stopped = sample_groups(run.model, run.tokenizer, prompt, 1, params, seed=5, stop_strings=[stop])[0]
    assert stopped.finish_reason == "stop"
    end = len(stopped.token_ids)
    assert stopped.token_ids == free.token_ids[:end]  # one row: the same draws up to the stop
    assert run.tokenizer.decode(stopped.token_ids).endswith(stop)  # its tokens are kept
    assert stop not in run.tokenizer.decode(stopped.token_ids[:-1])  # it stops at the first occurrence
    assert stopped.text == run.tokenizer.decode(free.token_ids)[:first]
    assert end <= cut + 2


def test_rollouts_use_the_current_weights(files, one_thread):
    """The decode step's own log-probs equal a teacher-forced forward of the current model, before
    and after an optimizer step; after it they differ from the old weights' (no stale plan)."""
    run = RLRun(config(files, files / "unused", beta=0.0))
    index, seed = [0, 1, 2, 3], 11

    def check(batch, model):
        fresh = completion_logps(model, batch.input_ids, batch.completion_mask, batch.start)
        assert torch.allclose(batch.old_logprobs, fresh, atol=1e-5)
        for b, s in enumerate(batch.samples):  # the sampler's log-probs, token by token
            row = fresh[b][batch.mask[b]]
            assert torch.allclose(torch.tensor(s.sampler_logprobs), row, atol=1e-4), b
        return fresh

    before = run.rollout(index, seed, sampler_logprobs=True)
    check(before, run.model)
    old_model = copy.deepcopy(run.model)
    run.grpo_update(before)
    after = run.rollout(index, seed, sampler_logprobs=True)
    now = check(after, run.model)
    stale = completion_logps(old_model, after.input_ids, after.completion_mask, after.start)
    assert (now - stale)[after.mask].abs().max() > 1e-3


def test_first_grpo_loss_equals_the_losses_module(files, one_thread):
    run = RLRun(config(files, files / "unused", beta=0.04, loss_type="grpo"))
    row = run.step()
    batch = run.last
    advantages, _ = losses.grpo_advantages(batch.rewards, 8, "group")
    expected, stats = losses.grpo_loss(batch.old_logprobs, batch.old_logprobs, advantages, batch.mask,
                                       ref_logprobs=batch.ref_logprobs, beta=0.04, loss_type="grpo")
    assert run.first_loss == pytest.approx(expected.item(), abs=1e-6)
    assert row["loss"] == pytest.approx(expected.item(), abs=1e-6)  # one pass, one minibatch: the same
    assert row["reward"] == pytest.approx(float(batch.rewards.mean()), abs=1e-7)
    kl = losses.masked_mean(losses.kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k3"), batch.mask)
    assert row["kl"] == pytest.approx(float(kl), abs=1e-9) and abs(row["kl"]) < 1e-6  # policy == reference


def test_grpo_raises_the_reward(files, tmp_path, one_thread):
    """reward = share of the completion's words that are "t7" (about 1 in 96 at the start)."""
    result = RLRun(config(files, tmp_path / "run")).train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows]
    assert len(rows) == 15 and result["step"] == 15
    assert sum(rewards[:3]) / 3 < 0.05, rewards
    assert sum(rewards[-3:]) / 3 > 0.5, rewards
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"reward", "reward_std", "kl", "loss", "completion_length", "clip_ratio/region_mean",
            "reward_failures"} <= set(header)


def test_reward_function_failures_are_counted_and_the_run_goes_on(files, tmp_path, one_thread, capsys):
    run = RLRun(config(files, tmp_path / "run", reward=[f"{files / 'rewards.py'}:flaky"], max_steps=2))
    run.train()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    total = 0
    for k, row in enumerate(rows):  # 4 prompts a step, 8 samples each; rows with i % 4 != 3 fail
        failing = sum(run.prompts[run.order[i]].row["i"] % 4 != 3 for i in range(4 * k, 4 * k + 4))
        assert row["reward_failures"] == 8 * failing
        total += 8 * failing
        assert row["reward"] == 1.0 if failing < 4 else math.isnan(row["reward"])
    assert run.function_rewards.failures == total > 0
    batch = run.last
    ok = torch.tensor([run.prompts[i].row["i"] % 4 == 3 for i in batch.prompt_index])
    assert torch.isnan(batch.rewards[~ok]).all() and (batch.rewards[ok] == 1.0).all()
    warnings = capsys.readouterr().err.splitlines()
    assert sum("raised ValueError" in w for w in warnings) == 1  # each kind reported once
    assert sum("not a finite number" in w for w in warnings) == 2  # nan and None


def test_exact_resume(files, tmp_path, one_thread):
    straight = RLRun(config(files, tmp_path / "a", max_steps=4, checkpoint_every=2))
    straight.train()
    RLRun(config(files, tmp_path / "b", max_steps=2, checkpoint_every=2)).train()
    resumed = RLRun(config(files, tmp_path / "b", max_steps=4, checkpoint_every=2), resume=True)
    assert resumed.step_count == 2
    resumed.train()

    def rows(folder):
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
                for line in (folder / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(InvalidArgument, match="different settings: lr"):
        RLRun(config(files, tmp_path / "b", max_steps=6, lr=1e-3), resume=True)


def test_lora_reference_is_the_base_with_adapters_disabled(files, tmp_path, one_thread):
    run = RLRun(config(files, tmp_path / "run", lora=True, beta=0.1, lr=5e-2, max_steps=3))
    assert run.ref_model is None  # no second copy of the weights
    run.train()
    from emergence.weights.hf import load_hf

    base, _ = load_hf(files / "model", dtype=torch.float32)
    batch = run.last
    with torch.no_grad():
        with adapters_disabled(run.model):
            ref = completion_logps(run.model, batch.input_ids, batch.completion_mask, batch.start)
        plain = completion_logps(base, batch.input_ids, batch.completion_mask, batch.start)
        adapted = completion_logps(run.model, batch.input_ids, batch.completion_mask, batch.start)
    assert torch.equal(ref, plain)  # bit for bit
    assert torch.equal(batch.ref_logprobs, plain)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter is back on after the block, and it learned
    # rollouts decode a merged plain model (the native step runs it), restored bit for bit afterwards
    from emergence.adapters.lora import lora_modules
    from emergence.align.rl import merged_for_decoding
    from emergence.kernels.fused_decode import unsupported

    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with torch.no_grad(), merged_for_decoding(run.model):
        assert not lora_modules(run.model) and unsupported(run.model) in (None, "the native kernels are not "
                                                                                "available on this machine")
        merged = completion_logps(run.model, batch.input_ids, batch.completion_mask, batch.start)
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert lora_modules(run.model) and all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------------------ PPO
def _cli(*args, ranks: int = 1, expect: int = 0) -> str:
    """`python -m emergence ARGS`, or under torchrun on `ranks` gloo ranks; its stderr."""
    import os
    import subprocess
    import sys

    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone"] if ranks > 1 else []
    proc = subprocess.run([sys.executable, *launch, "-m", "emergence", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == expect, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stderr


def _metrics(folder) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("_s")}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_grpo_on_two_ranks_trains_what_one_process_trains(files, tmp_path):
    # torchrun, 2 gloo ranks, each rolling out 2 of a step's 4 prompts: each row draws its own
    # number of the step's, so the ranks sample what one process samples; the gradients are the
    # ranks' mean and dapo's normaliser the global minibatch's tokens, so the rewards and lengths
    # are the same step for step and the adapter the same up to the order of the sums. LoRA with
    # a KL term: the reference (the adapter disabled) and the logged KL over both ranks' tokens.
    from emergence.weights.safetensors_io import SafetensorsFile

    args = ["grpo", files / "model", "--prompts", files / "prompts.jsonl", "--reward", f"{files / 'rewards.py'}:t7",
            "--max-new-tokens", 8, "--group", 4, "--prompts-per-step", 4, "--lr", 1e-2, "--max-steps", 3,
            "--lora", "--beta", 0.04, "--no-progress"]
    _cli(*args, "--out", tmp_path / "one")
    _cli(*args, "--out", tmp_path / "two", ranks=2)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == 3 and one[0]["rollout_tokens"] > 4 * 4 * 4  # (every sample, both ranks')
    for a, b in zip(one, two):
        assert {k: a[k] for k in ("reward", "completion_length", "rollout_tokens")} == \
               {k: b[k] for k in ("reward", "completion_length", "rollout_tokens")}
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
    assert sum(r["reward"] > 0 for r in one) >= 2  # (some samples score: the rewards say which rows were drawn)
    assert one[-1]["kl"] > 0  # (the adapter has moved away from the reference)
    a, b = (SafetensorsFile(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in ("one", "two"))
    # (Adam at lr 1e-2 turns the sums' last-bit differences into steps of up to ~1e-5)
    assert max(float((a.tensor(k) - b.tensor(k)).abs().max()) for k in a.keys()) < 1e-4


def test_ppo_on_two_ranks_resumes_exactly(files, tmp_path):
    # PPO with a reward model on 2 ranks: a run stopped after its first step and resumed on 2
    # ranks (every rank's RNG state restored) repeats the uninterrupted run; resuming it in one
    # process is refused in one line.
    reward_model_folder(tmp_path / "rm", tokenizer=False)
    args = ["ppo", files / "model", "--prompts", files / "prompts.jsonl", "--reward-model", tmp_path / "rm",
            "--max-new-tokens", 8, "--group", 2, "--lr", 1e-3, "--checkpoint-every", 1, "--no-progress"]
    _cli(*args, "--out", tmp_path / "straight", "--max-steps", 2, ranks=2)
    _cli(*args, "--out", tmp_path / "resumed", "--max-steps", 1, ranks=2)
    err = _cli(*args, "--out", tmp_path / "resumed", "--max-steps", 2, "--resume", expect=1)
    assert "was trained on 2 rank(s); resume it on as many (now 1)" in err
    _cli(*args, "--out", tmp_path / "resumed", "--max-steps", 2, "--resume", ranks=2)
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert len(straight) == 2 and straight == resumed
    assert all(math.isfinite(r["loss/value"]) for r in straight)


def test_prompts_per_step_must_split_evenly_over_the_ranks(files, tmp_path, capsys, monkeypatch):
    # Under torchrun each rank rolls out an equal share of a step's prompts: 4 prompts on 3 ranks
    # is refused in one line before any rank waits for the others.
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, out, err = cli_main(capsys, "grpo", files / "model", "--prompts", files / "prompts.jsonl", "--reward",
                              f"{files / 'rewards.py'}:t7", "--out", tmp_path / "run", "--prompts-per-step", 4)
    assert_one_line_error(code, err, "--prompts-per-step 4 must be a multiple of the 3 ranks")
    assert not (tmp_path / "run").exists()


def reward_model_folder(folder, vocab: int = 96, tokenizer=True) -> None:
    torch.manual_seed(5)
    decoder = Transformer(tiny_config(vocab_size=vocab))
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    save_reward_model(RewardModel(decoder, pad_token_id=0), folder)
    if tokenizer:
        word_level_tokenizer().save(folder)


def test_ppo_runs_with_a_reward_model_and_its_value_loss_falls(files, tmp_path, one_thread, capsys):
    reward_model_folder(tmp_path / "rm", tokenizer=False)  # same vocabulary, no tokenizer: the policy's ids
    code, out, err = cli_main(capsys, "ppo", files / "model", "--prompts", files / "prompts.jsonl", "--reward-model",
                              tmp_path / "rm", "--out", tmp_path / "run", "--max-steps", 2, "--max-new-tokens", 8,
                              "--group", 2, "--lr", 1e-3, "--no-progress")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss/value"]) and "objective/kl" in r for r in rows)
    assert (tmp_path / "run" / "value_model" / "config.json").is_file()

    run = RLRun(RLConfig("ppo", str(files / "model"), str(files / "prompts.jsonl"), str(tmp_path / "fixed"),
                         reward_model=str(tmp_path / "rm"), max_new_tokens=8, group=2, lr=1e-3, progress=False))
    assert run.model_rewards.same_tokens
    batch = run.rollout([0, 1, 2, 3], seed=1)
    by_epoch = run.ppo_update(batch, run.ppo_rollout(batch), epochs=6)["value_loss_by_epoch"]
    # (it levels off where the clipped value loss takes over: cliprange_value bounds the move from the
    # rollout's values)
    assert by_epoch[-1] < 0.85 * by_epoch[0] and max(by_epoch[1:]) < by_epoch[0], by_epoch


# ------------------------------------------------------------------------------ rewards, prompts
def test_built_in_problem_rewards_and_problem_prompts(files, tmp_path):
    row = {"question": "A car drives 50 miles per hour for 3 hours. How far did it travel?", "answer": 150}
    assert exact_answer(row["question"], "Step 1: 50 × 3 = 150\nAnswer: 150", row) == 1.0
    assert exact_answer(row["question"], "Answer: 140", row) == 0.0
    assert format_reward(row["question"], "so Answer: 150", row) == 1.0
    assert format_reward(row["question"], "it is 150", row) == 0.0
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(row) + "\n")
    prompts, report = load_prompts(str(path), word_level_tokenizer(), None, 64)
    assert prompts[0].prompt == row["question"] and prompts[0].row["answer"] == 150 and report["kept"] == 1
    # without a chat template: the step-by-step prompt of `emergence search` (search-train's policies)
    assert prompts[0].text == f"Question: {row['question']}\nAnswer step by step.\n"
    assert load_reward_function("emergence.align.rewards:exact_answer") is exact_answer
    rewards = FunctionRewards.load(["emergence.align.rewards:exact_answer"])
    scores, failed = rewards([row["question"]] * 2, ["Answer: 150", "Answer: 7"], [row, row])
    assert scores.tolist() == [1.0, 0.0] and failed == 0


def test_chat_prompts_are_rendered_with_the_template(tmp_path):
    from emergence.chat import ChatTemplate, encode_prompt

    template = ChatTemplate("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}t9{% endif %}")
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "t5 t6"}]}) + "\n")
    tok = word_level_tokenizer()
    prompts, _ = load_prompts(str(path), tok, template, 64)
    assert prompts[0].ids == encode_prompt(tok, "t5 t6 t9")
    with pytest.raises(InvalidArgument, match="chat template"):
        load_prompts(str(path), tok, None, 64)


# ------------------------------------------------------------------------------ bad input
def test_a_reward_function_that_cannot_be_imported(files, tmp_path, capsys):
    for spec, pattern in (("no_such_module_xyz:fn", "cannot import the reward function.*ModuleNotFoundError"),
                          ("emergence.align.rewards:missing", "has no 'missing'"),
                          ("nocolon", "package.module:function")):
        code, _, err = cli_main(capsys, "grpo", files / "model", "--prompts", files / "prompts.jsonl", "--reward", spec,
                                "--out", tmp_path / "run", "--no-progress")
        assert_one_line_error(code, err, pattern)


def test_a_reward_model_with_another_tokenizer(files, tmp_path, capsys, one_thread):
    reward_model_folder(tmp_path / "other", vocab=128, tokenizer=False)
    code, _, err = cli_main(capsys, "grpo", files / "model", "--prompts", files / "prompts.jsonl", "--reward-model",
                            tmp_path / "other", "--out", tmp_path / "run", "--no-progress")
    assert_one_line_error(code, err, "different tokenizers", "brings none")
    # with a tokenizer of its own (another one), the texts are re-encoded and the run goes on
    reward_model_folder(tmp_path / "own", vocab=128, tokenizer=False)
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from emergence.tokenizer import Tokenizer

    backend = HFTokenizer(models.WordLevel({f"t{i}": 127 - i for i in range(96)}, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    Tokenizer(backend, bos_token="t1", eos_token="t2", pad_token="t0").save(tmp_path / "own")
    code, _, err = cli_main(capsys, "grpo", files / "model", "--prompts", files / "prompts.jsonl", "--reward-model",
                            tmp_path / "own", "--out", tmp_path / "run2", "--max-steps", 1, "--max-new-tokens", 4,
                            "--no-progress")
    assert code == 0, err


def test_kl_stop_keeps_the_last_good_checkpoint(files, tmp_path, capsys, one_thread):
    code, _, err = cli_main(capsys, "grpo", files / "model", "--prompts", files / "prompts.jsonl", "--reward",
                            f"{files / 'rewards.py'}:t7", "--out", tmp_path / "run", "--max-new-tokens", 8,
                            "--lr", 1e-2, "--max-steps", 15, "--checkpoint-every", 1, "--kl-stop", 0.05,
                            "--no-progress")
    line = assert_one_line_error(code, err, r"KL [0-9.e-]+ exceeds --kl-stop 0.05 at step (\d+)",
                                 r"last good checkpoint \(step (\d+)\)")
    import re

    stopped, good = (int(x) for x in re.search(r"at step (\d+).*step (\d+)", line).groups())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert good == stopped - 2  # the weights measured at step `stopped` came from step stopped - 1
    assert all(r["kl"] <= 0.05 for r in rows) and len(rows) == stopped - 1
    from emergence.train.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run")["step"] == good
    assert not (tmp_path / "run" / "model").exists()
