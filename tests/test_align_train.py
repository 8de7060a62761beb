"""Reward-model and DPO training (align/train.py) end to end on the packaged emergence-6m: the
first DPO step is log 2 with the gradient align.losses gives; DPO learns a toy preference; LoRA
DPO's reference is the base with its adapters off (no second copy) and is cached once; an
interrupted run resumes exactly; the reward model learns a toy rule and transformers loads it with
the same scores; bad input is refused in one line.

The toy rule: every chosen completion ends "<name> was happy.", every rejected one "<name> was
sad." (or angry, tired, scared), the sentences before it drawn at random for each, so a model
has to tell the last word apart.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import emergence
from emergence.adapters.lora import LoraLinear, adapters_disabled, routing
from emergence.align import train as align_train
from emergence.align.data import collate, load_pairs
from emergence.align.losses import dpo_loss, sequence_logps
from emergence.align.reward import load_reward_model
from emergence.align.train import (REFERENCE_FILE, DPORun, PairBatches, PreferenceConfig, read_reference,
                                   reference_key, reference_logps, train_preferences)
from emergence.chat import ChatTemplate
from emergence.finetune.data import split_held_out
from emergence.train import trainer
from emergence.train.checkpoint import load_checkpoint
from emergence.train.trainer import TrainConfig, _Dist
from emergence.weights.safetensors_io import SafetensorsFile

from conftest import assert_one_line_error, cli_main

MODEL = "emergence-6m"
CPU = torch.device("cpu")
LOG2 = math.log(2)
NAMES = ["Tom", "Lily", "Ben", "Sue", "Max", "Mia", "Sam", "Anna"]
THINGS = ["a ball", "a cat", "a kite", "a box", "a car", "a cake", "a hat", "a dog"]
BODIES = ["{n} played with {t}.", "{n} ran to the park.", "{n} found {t}.", "{n} saw a big bird.", "{n} went home."]
BAD = ["sad", "angry", "tired", "scared"]


# ------------------------------------------------------------------------------- helpers
def toy_rows(count: int, seed: int = 0, chat: bool = False) -> list[dict]:
    g = random.Random(seed)
    rows = []
    for _ in range(count):
        n, t = g.choice(NAMES), g.choice(THINGS)
        first, second = (g.choice(BODIES).format(n=n, t=t) for _ in range(2))
        prompt = f"{n} had {t}."
        rows.append({"prompt": [{"role": "user", "content": prompt}] if chat else prompt,
                     "chosen": f" {first} {n} was happy.", "rejected": f" {second} {n} was {g.choice(BAD)}."})
    return rows


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def configs(data: Path, out: Path, *, steps: int, **pc_settings) -> tuple[PreferenceConfig, TrainConfig]:
    pc = PreferenceConfig(model=MODEL, data=[str(data)], val_fraction=0.25,
                          **{"r": 4, "alpha": 8.0, "targets": ["q", "v", "down"], **pc_settings})
    tc = TrainConfig(data=str(data), out=str(out), init=MODEL, max_steps=steps, batch_size=4, lr=2e-4, min_lr=0.0,
                     warmup_steps=0, weight_decay=0.0, eval_every=3, checkpoint_every=steps, sample_tokens=2,
                     seed=7, device="cpu", dtype="fp32", progress=False)
    return pc, tc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def held_out(data: Path, lm, seed: int = 7, fraction: float = 0.25, template: str = "plain"):
    """The run's held-out pairs, as the run splits them."""
    pairs, _ = load_pairs([str(data)], lm.tokenizer, ChatTemplate.builtin(template), max_length=lm.config.block_size)
    return split_held_out(pairs, fraction, seed)


class Killed(BaseException):
    pass


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """torch on one thread: a 6M model trains fastest so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    return emergence.load(MODEL, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("pairs") / "prefs.jsonl", toy_rows(40))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("chat") / "prefs.jsonl", toy_rows(24, seed=1, chat=True))


# ---------------------------------------------------------------- (a) the first DPO step
def test_first_dpo_step_is_log2_with_the_gradient_of_the_losses(pairs_file, tmp_path, base):
    pc, tc = configs(pairs_file, tmp_path / "run", steps=1, method="full")
    run = DPORun(pc, tc, _Dist(), resume=False)
    model = run.build_model(CPU, bf16=False)
    batch = run.batches.train_batch(0)
    loss, stats = run.loss(model, batch)
    assert abs(loss.item() - LOG2) <= 1e-6, loss.item()
    # Every pair a tie, up to float rounding (the reference was computed in other batches: other shapes).
    assert abs(stats["rewards/margins"].item()) <= 1e-6
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # Directly: the packaged model as the reference, the policy's forward, align.losses on top.
    ids, mask = batch.input_ids, batch.completion_mask
    n = len(ids) // 2
    with torch.no_grad():
        ref = sequence_logps(base.model(ids), ids, mask).total
    assert (batch.ref_chosen - ref[:n]).abs().max() <= 1e-4 and (batch.ref_rejected - ref[n:]).abs().max() <= 1e-4
    policy = sequence_logps(model(ids), ids, mask)
    direct, _ = dpo_loss(policy.total[:n], policy.total[n:], ref[:n], ref[n:], beta=pc.beta)
    assert abs(direct.item() - LOG2) <= 1e-6
    direct.backward()
    scale = max(g.abs().max().item() for g in ours.values())
    assert scale > 1e-4  # a real gradient
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ours[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


# -------------------------------------------------------------- (b) DPO learns the rule
def test_dpo_learns_a_toy_preference(pairs_file, tmp_path, base, capsys):
    pc, tc = configs(pairs_file, tmp_path / "run", steps=9, method="full")
    result = train_preferences("dpo", pc, tc)
    out = Path(tc.out)
    rows = metrics(out)
    assert abs(rows[0]["train_loss"] - LOG2) <= 1e-6  # the policy starts as its reference
    assert abs(rows[0]["rewards/margins"]) <= 1e-6
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 9]
    margins = [r["val_rewards/margins"] for r in evals]
    assert 0 < margins[0] < margins[1] < margins[2], margins
    assert evals[-1]["val_rewards/accuracies"] > 0.8
    assert evals[-1]["val_loss"] < 0.5 * LOG2
    assert result.val_stats["rewards/accuracies"] == evals[-1]["val_rewards/accuracies"]
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"rewards/accuracies", "rewards/margins", "val_rewards/accuracies"} <= set(header)
    assert "val rewards/accuracies" in capsys.readouterr().out

    # The saved model (a whole one) gives the run's held-out margin against the cached reference.
    assert result.model_dir == out / "model" and (out / "model" / "preference_data.json").is_file()
    tuned = emergence.load(result.model_dir, device="cpu", dtype="fp32")
    train, val = held_out(pairs_file, base)
    cache = SafetensorsFile(out / REFERENCE_FILE)
    ref_c, ref_r = (cache.tensor(k, copy=True)[len(train):] for k in ("chosen", "rejected"))
    batch = collate(val, base.tokenizer.eos_id)
    with torch.no_grad():
        logps = sequence_logps(tuned.model.eval()(batch.input_ids), batch.input_ids, batch.completion_mask).total
    _, stats = dpo_loss(logps[:len(val)], logps[len(val):], ref_c, ref_r, beta=pc.beta)
    assert stats["rewards/margins"].item() == pytest.approx(evals[-1]["val_rewards/margins"], abs=1e-4)


# ---------------------------------------- (c) LoRA: the reference is the base, cached once
def test_lora_dpo_reference_is_the_base_with_its_adapters_off(chat_file, tmp_path, base):
    pc, tc = configs(chat_file, tmp_path / "run", steps=2, method="lora", chat_template="chatml")
    run = DPORun(pc, tc, _Dist(), resume=False)
    model = run.build_model(CPU, bf16=False)

    # One set of weights: the run's one model is the policy, the packaged weights under adapters.
    held = [v for v in vars(run).values() if isinstance(v, torch.nn.Module)] + [run.lm.model]
    assert all(m is model for m in held)
    plain = base.model.state_dict()
    under = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert under.keys() == plain.keys() and all(torch.equal(under[k], plain[k]) for k in plain)
    assert sum(isinstance(m, LoraLinear) for m in model.modules()) == 2 * base.config.n_layer  # qkv and down

    # The cached reference log-probs are the packaged model's, bit for bit.
    pairs = run.batches.pairs
    chosen, rejected = reference_logps(base.model, pairs, run.pad_id, tc.batch_size, CPU)
    assert torch.equal(run.batches.reference[0], chosen) and torch.equal(run.batches.reference[1], rejected)
    key = reference_key(base.model, pairs, bf16=False)
    on_disk = read_reference(Path(tc.out) / REFERENCE_FILE, key, len(pairs))
    assert on_disk is not None and torch.equal(on_disk[0], chosen) and torch.equal(on_disk[1], rejected)
    # Another input (one pair fewer, or another precision) is another key: the file is not reused.
    assert read_reference(Path(tc.out) / REFERENCE_FILE, reference_key(base.model, pairs[1:], False), len(pairs) - 1) is None
    assert reference_key(base.model, pairs, bf16=True) != key

    # Adapters that have moved: off, the base again exactly; and they are back on afterwards.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                for b in m.adapters["default"].lora_B.values():
                    b.normal_(0, 0.05)
    ids = pairs[0].chosen.ids
    x = torch.tensor([ids])
    with torch.no_grad():
        expected = base.model(x)
        with adapters_disabled(model):
            assert torch.equal(model(x), expected)
        assert routing(model).active == "default"
        assert (model(x) - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------- (d) exact resume
def test_an_interrupted_lora_dpo_run_resumes_exactly_and_reuses_its_cache(chat_file, tmp_path, monkeypatch,
                                                                          capsys):
    """Through the command line: killed right after its step-3 checkpoint, then `--resume`."""
    def args(out, *extra, verb="dpo"):
        return [verb, MODEL, "--data", chat_file, "--out", out, "--chat-template", "chatml", "--lora", "--r", "4",
                "--alpha", "8", "--target", "q,v", "--lora-dropout", "0.1", "--val-fraction", "0.25", "--max-steps",
                "6", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "3",
                "--eval-every", "3", "--sample-tokens", "2", "--seed", "3", "--device", "cpu", "--no-progress", *extra]

    computed = []
    real_reference = align_train.reference_logps

    def counting(*a, **k):
        computed.append(1)
        return real_reference(*a, **k)

    monkeypatch.setattr(align_train, "reference_logps", counting)
    torch.manual_seed(0)  # the global RNG as another caller left it: a run must not depend on it
    code, stdout, err = cli_main(capsys, *args(tmp_path / "reference"))
    assert code == 0, err
    assert "reference log-probs computed for 24 pairs" in stdout.splitlines()[0]
    assert stdout.splitlines()[-1] == f"adapter: {tmp_path / 'reference' / 'adapter'}"
    reference = metrics(tmp_path / "reference")
    assert [r["step"] for r in reference if "val_loss" in r] == [3, 6]
    assert len(computed) == 1

    out = tmp_path / "interrupted"
    real_save = trainer.save_checkpoint

    def save_then_die(state, folder):
        real_save(state, folder)
        if state["step"] == 3:
            raise Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    torch.manual_seed(12345)
    with pytest.raises(Killed):
        cli_main(capsys, *args(out))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert load_checkpoint(out)["step"] == 3 and not (out / "adapter").exists()
    assert len(computed) == 2
    cache = (out / REFERENCE_FILE).stat()

    # Resuming with other settings, or as another kind of run, is refused, naming what differs.
    code, _, err = cli_main(capsys, *args(out, "--resume", "--beta", "0.2"))
    assert_one_line_error(code, err, r"different dpo settings: beta was 0\.1, now 0\.2")
    code, _, err = cli_main(capsys, *args(out, "--resume", verb="reward-model"))
    assert_one_line_error(code, err, r"holds a dpo run, not a reward-model one")

    torch.manual_seed(999)
    code, stdout, err = cli_main(capsys, *args(out, "--resume"))
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert "resuming at step 3" in first and "reference log-probs of 24 pairs read from" in first, first
    assert len(computed) == 2  # not computed again
    again = (out / REFERENCE_FILE).stat()
    assert (again.st_ino, again.st_mtime_ns) == (cache.st_ino, cache.st_mtime_ns)  # nor rewritten
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for ref, row in zip(reference, resumed):
        for k in ("train_loss", "val_loss", "rewards/margins", "val_rewards/margins", "val_rewards/accuracies"):
            assert row.get(k) == ref.get(k), (k, ref, row)
    a, b = (SafetensorsFile(folder / "adapter" / "adapter_model.safetensors") for folder in (tmp_path / "reference", out))
    assert a.keys() == b.keys() and len(a.keys()) == 2 * 2 * 6  # q and v: an A and a B each, 6 layers
    assert all(torch.equal(a.tensor(k, copy=True), b.tensor(k, copy=True)) for k in a.keys())
    assert (out / "adapter" / "chat_template.jinja").read_text() == ChatTemplate.builtin("chatml").source


# -------------------------------------------------------------------- (e) the reward model
@pytest.mark.parametrize("method", ["lora", "full"])
def test_reward_model_learns_the_rule_and_loads_in_transformers(method, pairs_file, tmp_path, base, capsys):
    import transformers as tf

    out = tmp_path / "rm"
    how = ["--lora", "--r", "4", "--alpha", "8", "--lr", "1e-3"] if method == "lora" else ["--lr", "1e-4"]
    code, stdout, err = cli_main(capsys, "reward-model", MODEL, "--data", pairs_file, "--out", out, *how,
                                 "--max-steps", "8", "--batch-size", "4", "--warmup-steps", "0", "--eval-every", "4",
                                 "--val-fraction", "0.25", "--seed", "7", "--device", "cpu", "--no-progress")
    assert code == 0, err
    assert stdout.splitlines()[-1] == f"reward model: {out / 'model'}"
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["val_accuracy"] > 0.8 and evals[-1]["val_margin"] > evals[0]["val_margin"] > 0, evals
    if method == "lora":  # the checkpoint keeps the adapters and the head, not the base
        state = load_checkpoint(out)["model"]
        assert "score.weight" in state and all(".adapters." in k or k == "score.weight" for k in state)

    # transformers reads the folder (adapters merged) and scores the held-out pairs as we do.
    folder = out / "model"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    hf = tf.LlamaForSequenceClassification.from_pretrained(folder).eval()
    ours = load_reward_model(folder)
    _, val = held_out(pairs_file, base)
    batch = collate(val, ours.pad_token_id)
    with torch.no_grad():
        theirs, mine = hf(batch.input_ids).logits[:, 0], ours(batch.input_ids)
    assert (theirs - mine).abs().max().item() <= 1e-5
    chosen, rejected = theirs.chunk(2)
    assert (chosen > rejected).float().mean().item() == pytest.approx(evals[-1]["val_accuracy"])
    assert (folder / "tokenizer.json").is_file()


# ---------------------------------------------------------------------- (f) bad input
def _args(verb: str, data: Path, out: Path, *extra) -> list:
    return [verb, MODEL, "--data", data, "--out", out, "--max-steps", "1", "--batch-size", "2", "--device", "cpu",
            "--no-progress", *extra]


GOOD = {"prompt": "Tom had a cat.", "chosen": " Tom was happy.", "rejected": " Tom was sad."}
SAME = {"prompt": "Sue had a hat.", "chosen": " Sue was happy.", "rejected": " Sue was happy."}


@pytest.mark.parametrize("verb", ["dpo", "reward-model"])
@pytest.mark.parametrize("lines, extra, patterns", [
    ([GOOD, {"prompt": "p", "chosen": "c"}], (), [r"prefs\.jsonl:2", r"missing 'rejected'"]),
    ([GOOD, "{not json"], (), [r"prefs\.jsonl:2"]),
    ([SAME, SAME], (), [r"no preference pairs in", r"2 have chosen == rejected"]),
    ([{**GOOD, "margin": 1.0}, GOOD], (), [r"prefs\.jsonl:2: this row has no 'margin' but others have one"]),
    ([{**GOOD, "margin": "big"}], (), [r"prefs\.jsonl:1: 'margin' must be a finite number"]),
    ([{**GOOD, "chosen": [{"role": "assistant", "content": "Yes."}]}], (), [r"this model has no chat template"]),
    ([GOOD, {**GOOD, "rejected": [{"role": "user", "content": "x"}]}], ("--chat-template", "chatml"),
     [r"prefs\.jsonl:2: 'rejected' has no assistant message"]),
    ([GOOD] * 4, ("--lora", "--r", "0"), [r"rank r must be a positive integer, got 0"]),
], ids=["missing-field", "bad-json", "all-identical", "some-margins", "bad-margin", "chat-no-template",
        "no-assistant", "rank-0"])
def test_bad_preference_input_is_refused_in_one_line(verb, lines, extra, patterns, tmp_path, capsys):
    data = write(tmp_path / "prefs.jsonl", lines)
    out = tmp_path / "out"
    code, _, err = cli_main(capsys, *_args(verb, data, out, *extra))
    assert_one_line_error(code, err, *patterns)
    assert not out.exists()


@pytest.mark.parametrize("extra, patterns", [
    (("--beta", "0"), [r"--beta must be positive, got 0"]),
    (("--loss", "ipo", "--label-smoothing", "0.1"), [r"the ipo loss takes no --label-smoothing"]),
    (("--label-smoothing", "0.5"), [r"--label-smoothing must be in \[0, 0\.5\)"]),
    (("--loss", "hinge"), [r"argument --loss: invalid choice: 'hinge'"]),
], ids=["beta-0", "ipo-smoothing", "smoothing-0.5", "unknown-loss"])
def test_bad_dpo_settings_are_refused_in_one_line(extra, patterns, tmp_path, capsys):
    data = write(tmp_path / "prefs.jsonl", [GOOD] * 4)
    code, _, err = cli_main(capsys, *_args("dpo", data, tmp_path / "out", *extra))
    assert_one_line_error(code, err, *patterns)
    assert not (tmp_path / "out").exists()


def test_identical_pairs_are_counted_and_skipped(tmp_path, capsys):
    rows = toy_rows(6) + [SAME, SAME]
    data = write(tmp_path / "prefs.jsonl", rows)
    code, stdout, err = cli_main(capsys, *_args("dpo", data, tmp_path / "out", "--lora", "--val-fraction", "0"))
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert "8 rows, 2 with chosen == rejected skipped: 6 pairs to train on, 0 held out" in first, first
    report = json.loads((tmp_path / "out" / "adapter" / "preference_data.json").read_text())
    assert (report["rows"], report["pairs"], report["identical"]) == (8, 6, 2)
