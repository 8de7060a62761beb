"""Pretraining end to end on a tiny byte-level BPE + TinyStories slice: exact resume after a
SIGKILL (between checkpoints and in the middle of one), a full disk during a checkpoint, DDP
and FSDP2 matching a single process, real learning (below the unigram entropy) with a saved
model transformers can read, bad input refused in one line, and the span-corruption objective.

Runs go through the real command line (`python -m emergence pretrain`, `torchrun`) where a
process has to die or several have to cooperate, and through `train()` in this process
otherwise. Every subprocess gets OMP_NUM_THREADS=1: the machine is small and shared.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from emergence.config import Config
from emergence.data.shards import TokenShards, prepare_corpus
from emergence.errors import CheckpointError
from emergence.tokenizer import Tokenizer
from emergence.train import TrainConfig, objectives, train
from emergence.train import checkpoint as ckpt
from emergence.train.checkpoint import INTERRUPT_DURING_CHECKPOINT_ENV, KILL_DURING_CHECKPOINT_ENV, load_checkpoint

from conftest import SHARED_DATA, assert_one_line_error, bounded, cli_main

STORIES = SHARED_DATA / "tinystories" / "train" / "TinyStories-train.head2MiB.txt"

ENV = {k: v for k, v in os.environ.items()
       if k not in (KILL_DURING_CHECKPOINT_ENV, INTERRUPT_DURING_CHECKPOINT_ENV, "WORLD_SIZE", "RANK")}
ENV.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", EMERGENCE_NO_KERNELS="1", TRANSFORMERS_VERBOSITY="error")

# The resume runs: 60 steps, a checkpoint every 10, an evaluation every 20.
STEPS = 60
RUN_ARGS = ("--config", "tiny-llama", "--max-steps", str(STEPS), "--batch-size", "8", "--context", "128",
            "--eval-every", "20", "--checkpoint-every", "10", "--warmup-steps", "10", "--lr", "3e-3", "--no-progress")


# ------------------------------------------------------------------------------- helpers
def pretrain_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emergence", "pretrain", "--data", str(data), "--out", str(out), *extra]


def run(cmd: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def complete_rows(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_after_rows(cmd: list[str], metrics_file: Path, rows: int) -> int:
    """Start a run, SIGKILL it once `rows` steps are logged (polled every 2 ms: a step takes
    tens of ms); returns the run's exit status."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while complete_rows(metrics_file) < rows:
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, f"the run never reached step {rows}"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    return proc.returncode


def compare_losses(reference: list[dict], rows: list[dict], tol: float) -> float:
    """Same steps, same train (and validation) losses within tol; returns the largest difference."""
    assert [r["step"] for r in rows] == [r["step"] for r in reference]
    worst = 0.0
    for ref, row in zip(reference, rows):
        assert ("val_loss" in ref) == ("val_loss" in row), (ref, row)
        for key in ("train_loss", "val_loss"):
            if key in ref:
                diff = abs(ref[key] - row[key])
                assert diff <= tol, f"step {ref['step']}: {key} {row[key]} vs reference {ref[key]}"
                worst = max(worst, diff)
    return worst


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------ fixtures
def _make_shards(folder: Path, text_bytes: int, vocab_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = STORIES.read_bytes()[:text_bytes].decode("utf-8", errors="ignore")
    corpus = folder / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    tokenizer = Tokenizer.train_bpe([corpus], vocab_size)
    prepare_corpus([str(corpus)], tokenizer, folder / "shards", val_fraction=0.1, show_progress=False)
    return folder / "shards"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE trained on the first 300 KB of TinyStories, and its shards."""
    return _make_shards(tmp_path_factory.mktemp("stories"), 300_000, 512)


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory) -> Path:
    """The same kind of corpus prepared with another tokenizer (a 400-token BPE)."""
    return _make_shards(tmp_path_factory.mktemp("other"), 60_000, 400)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted 60-step run every resumed run must repeat."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(pretrain_cmd(shards, out, *RUN_ARGS))
    assert proc.returncode == 0, proc.stderr
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40, 60]
    assert load_checkpoint(out)["step"] == STEPS
    return out


def test_shards_are_what_training_reads(shards):
    data = TokenShards(shards)
    train_ids = np.concatenate([np.asarray(a) for a in data.split("train")])
    val_ids = np.concatenate([np.asarray(a) for a in data.split("val")])
    assert data.vocab_size == 512 and data.dtype == np.uint16
    assert len(train_ids) == data.tokens("train") > 100_000
    assert 0.08 < len(val_ids) / (len(train_ids) + len(val_ids)) < 0.12
    tok = data.tokenizer()
    assert tok.fingerprint() == data.tokenizer_hash
    assert int(train_ids.max()) < 512
    # the stream starts with the corpus' first story, then the EOS that ends it
    first_story = (shards.parent / "corpus.txt").read_text().split(tok.eos_token)[0].strip()
    end = int(np.flatnonzero(train_ids == tok.eos_id)[0])
    assert tok.decode([int(t) for t in train_ids[:end]]) == first_story


# --------------------------------------------------------------------- 1. exact resume
def test_resume_after_sigkill_repeats_the_uninterrupted_run(shards, reference, tmp_path):
    out = tmp_path / "run"
    assert kill_after_rows(pretrain_cmd(shards, out, *RUN_ARGS), out / "metrics.jsonl", 35) == -signal.SIGKILL
    rows_at_kill = complete_rows(out / "metrics.jsonl")
    assert 35 <= rows_at_kill < STEPS

    state = load_checkpoint(out)
    assert state["step"] in (30, 40, 50) and state["step"] <= rows_at_kill
    assert state["cursor"] == state["step"] * 8
    print(f"\nkilled after {rows_at_kill} logged steps; checkpoint at step {state['step']}")

    resumed = run(pretrain_cmd(shards, out, *RUN_ARGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at step {state['step']}" in resumed.stdout
    worst = compare_losses(metrics(reference), metrics(out), tol=1e-6)
    csv_steps = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert csv_steps == [str(s) for s in range(1, STEPS + 1)]  # the csv dropped the lost steps too
    final_diff = max_weight_diff(load_checkpoint(reference)["model"], load_checkpoint(out)["model"])
    print(f"resume after SIGKILL: max loss diff {worst:.3g}, max final weight diff {final_diff:.3g}")
    assert final_diff <= 1e-6


def test_sigkill_in_the_middle_of_a_checkpoint_write(shards, reference, tmp_path):
    out = tmp_path / "run"
    # the 3rd save (step 30) dies after 4 KB of checkpoint.pt.tmp
    killed = run(pretrain_cmd(shards, out, *RUN_ARGS), env={**ENV, KILL_DURING_CHECKPOINT_ENV: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    tmp = out / "checkpoint.pt.tmp"
    assert tmp.is_file() and 4096 <= tmp.stat().st_size < (out / "checkpoint.pt").stat().st_size
    state = load_checkpoint(out)
    assert state["step"] == 20 and state["cursor"] == 160
    assert [r["step"] for r in metrics(out)] == list(range(1, 31))  # step 30 logged before its save
    with pytest.raises(Exception):  # the partial file really is unreadable
        torch.load(tmp, weights_only=True)

    resumed = run(pretrain_cmd(shards, out, *RUN_ARGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 20" in resumed.stdout
    worst = compare_losses(metrics(reference), metrics(out), tol=1e-6)
    print(f"\nresume after a kill mid-checkpoint: max loss diff {worst:.3g}")
    assert not tmp.exists()
    assert load_checkpoint(out)["step"] == STEPS


# ------------------------------------------------------------------- 3. disk full
class _FullDisk:
    """A file whose every write fails like a full disk does."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_ctrl_c_in_the_middle_of_a_checkpoint_write_lets_it_finish(shards, reference, tmp_path):
    # SIGINT after 4 KB of the 3rd save (step 30): the write completes, then the run stops with
    # exit status 130 and one line, its step-30 checkpoint whole; resuming gives the same losses.
    out = tmp_path / "run"
    interrupted = run(pretrain_cmd(shards, out, *RUN_ARGS), env={**ENV, INTERRUPT_DURING_CHECKPOINT_ENV: "3"})
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Traceback" not in interrupted.stderr and "cannot write checkpoint" not in interrupted.stderr
    assert not (out / "checkpoint.pt.tmp").exists()
    state = load_checkpoint(out)
    assert state["step"] == 30 and state["cursor"] == 240
    resumed = run(pretrain_cmd(shards, out, *RUN_ARGS, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 30" in resumed.stdout
    compare_losses(metrics(reference), metrics(out), tol=1e-6)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(shards, tmp_path, monkeypatch, one_thread):
    monkeypatch.delenv(KILL_DURING_CHECKPOINT_ENV, raising=False)
    opened: list[Path] = []
    real_open = ckpt._open_for_write

    def open_for_write(path):
        opened.append(Path(path))
        f = real_open(path)
        return _FullDisk(f) if len(opened) == 2 else f

    monkeypatch.setattr(ckpt, "_open_for_write", open_for_write)
    out = tmp_path / "run"
    tc = TrainConfig(data=str(shards), out=str(out), context=64, batch_size=4, max_steps=30, checkpoint_every=10,
                     eval_every=0, warmup_steps=5, lr=3e-3, progress=False)
    with pytest.raises(CheckpointError) as info:
        train("tiny-llama", tc)
    message = str(info.value)
    assert len(opened) == 2 and opened[1] == out / "checkpoint.pt.tmp"
    assert "No space left on device" in message, message
    assert "previous checkpoint (step 10) is intact" in message, message
    assert "\n" not in message
    assert load_checkpoint(out)["step"] == 10
    assert not (out / "checkpoint.pt.tmp").exists()
    assert [r["step"] for r in metrics(out)] == list(range(1, 21))


# ----------------------------------------------------------------------- 4. DDP, FSDP2
DP_ARGS = ("--config", "tiny-llama", "--max-steps", "8", "--context", "128", "--eval-every", "4",
           "--checkpoint-every", "8", "--warmup-steps", "3", "--lr", "3e-3", "--no-progress")


def torchrun_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
            "-m", "emergence", "pretrain", "--data", str(data), "--out", str(out), *extra]


def test_ddp_and_fsdp_match_one_process(shards, tmp_path):
    """2 ranks x batch 2 against one process x batch 2 with 2 accumulation steps, every process
    on one thread: the same micro-batches (rank r reads the samples micro-batch r reads) and the
    same arithmetic. Each rank's gradient is halved before the all-reduce sums them (DDP's and
    FSDP2's averaging); accumulation halves each micro-batch's loss before backward: halving is
    exact in floating point, so the gradients, hence the weights, are bit-identical. The logged
    losses are means over the ranks, (l1 + l2) / 2, against l1 / 2 + l2 / 2 over micro-batches:
    one rounding apart, within one fp32 ulp of the loss. (Against one process x batch 4 the sum
    over 4 rows runs in another order: 2e-5 apart in the weights after 8 Adam steps.)"""
    single = tmp_path / "single"
    # the validation windows: eval_batches x batch x ranks of them, the same count on both sides
    proc = run(pretrain_cmd(shards, single, *DP_ARGS, "--batch-size", "2", "--grad-accum", "2",
                            "--eval-batches", "20"))
    assert proc.returncode == 0, proc.stderr
    reference = metrics(single)
    assert [r["step"] for r in reference] == list(range(1, 9))
    reference_weights = load_checkpoint(single)["model"]

    figures = []
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        out = tmp_path / name
        proc = run(torchrun_cmd(shards, out, *DP_ARGS, "--batch-size", "2", "--eval-batches", "10", *extra),
                   timeout=180)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "x 2 ranks" in proc.stdout
        rows = metrics(out)
        worst = compare_losses(reference, rows, tol=1.0)
        for ref, row in zip(reference, rows):  # one rounding of a mean apart: one ulp
            for key in ("train_loss", "val_loss"):
                if key in ref:
                    assert abs(ref[key] - row[key]) <= np.spacing(np.float32(ref[key])), (ref, row)
        state = load_checkpoint(out)
        assert state["step"] == 8 and state["cursor"] == 8 * 4
        weights = max_weight_diff(reference_weights, state["model"])
        assert weights == 0.0
        figures.append(f"{name}: max loss diff {worst:.3g}, final weights {weights:.3g}")
    print("\n" + "; ".join(figures))


# --------------------------------------------------------------------------- 5. learning
def unigram_entropy(data: TokenShards) -> float:
    counts = np.zeros(data.vocab_size, dtype=np.int64)
    for array in data.split("train"):
        counts += np.bincount(np.asarray(array, dtype=np.int64), minlength=data.vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_tiny_model_learns_and_saves_a_transformers_model(shards, tmp_path, one_thread):
    import transformers

    import emergence

    data = TokenShards(shards)
    entropy = unigram_entropy(data)
    assert 4.5 < entropy < 6.0  # nats; a uniform 512-token distribution would be 6.24

    out = tmp_path / "run"
    tc = TrainConfig(data=str(shards), out=str(out), context=64, batch_size=8, max_steps=300, lr=3e-3,
                     warmup_steps=20, eval_every=100, checkpoint_every=0, progress=False)
    result = train("tiny-llama", tc)
    rows = metrics(out)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert [r["step"] for r in rows if "val_loss" in r] == [100, 200, 300]
    assert result.val_loss == vals[-1]
    assert vals[0] > vals[-1]
    print(f"\nunigram entropy {entropy:.3f} nats; val loss {vals} after 300 steps")
    assert result.val_loss < entropy - 1.0

    lm = emergence.load(out / "model", device="cpu", backend="eager")
    assert lm.tokenizer.fingerprint() == data.tokenizer_hash
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    val = np.asarray(data.split("val")[0][:65], dtype=np.int64)
    ids = torch.from_numpy(val).unsqueeze(0)
    with torch.no_grad():
        ours = lm.model(ids[:, :-1])
        theirs = hf(ids[:, :-1]).logits
    diff = float((ours - theirs).abs().max())
    print(f"saved model: max |logits - transformers logits| = {diff:.3g}")
    assert ours.shape == theirs.shape == (1, 64, 512)
    assert diff < 1e-4
    # the model transformers loaded predicts validation text better than the unigram distribution
    hf_loss = float(torch.nn.functional.cross_entropy(theirs[0], ids[0, 1:]))
    assert hf_loss < entropy - 0.5


# -------------------------------------------------------------------------- 6. bad input
def test_resume_without_a_checkpoint_exits_1_in_one_line(shards, tmp_path):
    proc = run(pretrain_cmd(shards, tmp_path / "nothing", *RUN_ARGS, "--resume"), timeout=60)
    assert_one_line_error(proc.returncode, proc.stderr, "no checkpoint to resume from", "checkpoint.pt missing")
    assert not (tmp_path / "nothing").exists()


def test_refusals_leave_the_run_untouched(shards, other_shards, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    code, _, err = cli_main(capsys, "pretrain", "--data", shards, "--out", out, *RUN_ARGS)
    assert_one_line_error(code, err, "already holds a run", "--resume")

    changed = [a if a != "3e-3" else "1e-3" for a in RUN_ARGS]
    code, _, err = cli_main(capsys, "pretrain", "--data", shards, "--out", out, *changed, "--resume")
    assert_one_line_error(code, err, "cannot resume with different settings", r"lr was 0\.003, now 0\.001")

    mine, theirs = TokenShards(shards).tokenizer_hash, TokenShards(other_shards).tokenizer_hash
    assert mine != theirs
    code, _, err = cli_main(capsys, "pretrain", "--data", other_shards, "--out", out, *RUN_ARGS, "--resume")
    assert_one_line_error(code, err, f"tokenizer {mine}", f"tokenizer {theirs}")

    code, _, err = cli_main(capsys, "pretrain", "--out", out, "--resume")  # all 60 steps are done
    assert_one_line_error(code, err, f"the run in {re.escape(str(out))} is finished: it reached step 60 of 60",
                          "--max-steps")
    code, _, err = cli_main(capsys, "pretrain", "--out", out, "--resume", "--max-steps", "70", "--config", "tiny-gpt2")
    assert_one_line_error(code, err, "--config tiny-gpt2 is not the model of the run")

    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_resume_takes_the_runs_own_settings(shards, reference, tmp_path, capsys):
    # `pretrain --out run/ --resume --max-steps 70`: the data, model and every other setting come
    # from the run; only what may change is taken from the flags, and a change that would make the
    # run compute something else is refused, naming it.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    code, _, err = cli_main(capsys, "pretrain", "--out", out, "--resume", "--max-steps", "70", "--lr", "1e-3")
    assert_one_line_error(code, err, "cannot resume with different settings", r"lr was 0\.003, now 0\.001")
    code, out_text, err = cli_main(capsys, "pretrain", "--out", out, "--resume", "--max-steps", "70",
                                   "--eval-every", "5", "--no-progress")
    assert code == 0, err
    assert "resuming at step 60" in out_text
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 71))
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40, 60, 65, 70]  # the new cadence from 60 on
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["max_steps"] == 70 and saved["lr"] == 3e-3 and saved["data"] == str(shards)


def test_a_run_too_large_for_memory_is_refused_before_allocating(shards, tmp_path, capsys):
    out = tmp_path / "big"
    with bounded(seconds=20, max_new_rss_mb=300):
        code, _, err = cli_main(capsys, "pretrain", "--config", "llama-2-7b", "--data", shards, "--out", out,
                                "--batch-size", "64", "--context", "4096", "--no-progress")
    line = assert_one_line_error(code, err, r"needs about [\d.]+ GiB", r"\d+\.\dM parameters",
                                 r"only [\d.]+ GiB is available")
    params = float(re.search(r"([\d.]+)M parameters", line).group(1))
    # llama-2-7b's shapes with the vocabulary sized to the data's 512 tokens (6.48B, not 6.74B)
    assert params == round(Config.from_name("llama-2-7b", vocab_size=512).num_parameters() / 1e6, 1)
    need = float(re.search(r"needs about ([\d.]+) GiB", line).group(1))
    assert need > 1000  # 7B parameters x 16 bytes alone is ~100 GiB; batch 64 x 4096 activations dwarf it
    assert not out.exists()


def test_corrupt_checkpoint_is_one_line(shards, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as info:
        load_checkpoint(out)
    assert "\n" not in str(info.value)
    code, _, err = cli_main(capsys, "pretrain", "--data", shards, "--out", out, *RUN_ARGS, "--resume")
    assert_one_line_error(code, err, "cannot read checkpoint", re.escape(str(out / "checkpoint.pt")))


# ----------------------------------------------------------------- 7. span corruption
def check_span_row(window: list[int], inputs: list[int], targets: list[int], sentinels: list[int], eos: int,
                   noise_density: float) -> None:
    """The row is [window's kept tokens with sentinels, EOS, sentinels + hidden spans, EOS, pad...]
    and only the part after the first EOS is scored."""
    scored = [p for p, t in enumerate(targets) if t != objectives.IGNORE_INDEX]
    s0, last = scored[0], scored[-1]
    assert scored == list(range(s0, last + 1))  # one contiguous block: nothing before it, no holes
    corrupted = inputs[:s0]  # the input half
    assert inputs[s0] == eos  # the separator predicts the first target token
    answer = targets[s0:last + 1]
    assert answer[0] == sentinels[0] and answer[-1] == eos
    assert inputs[s0 + 1:last + 1] == answer[:-1]  # teacher forcing: the target half is shifted by one
    # put the hidden spans back: the window comes out
    spans, current = {}, None
    for t in answer[:-1]:
        if t in sentinels:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    rebuilt = []
    for t in corrupted:
        rebuilt += spans.pop(t) if t in sentinels else [t]
    assert not spans and rebuilt == window
    noise = len(answer) - 1 - sum(t in sentinels for t in answer)
    assert noise == round(len(window) * noise_density)


def test_span_corruption_trains_and_scores_only_the_targets(shards, tmp_path, monkeypatch, one_thread):
    seen = []
    real = objectives.span_corruption_batch

    def spy(windows, sentinel_ids, eos_id, **kwargs):
        batch = real(windows, sentinel_ids, eos_id, **kwargs)
        seen.append((windows.clone(), batch, list(sentinel_ids), eos_id, kwargs["noise_density"]))
        return batch

    monkeypatch.setattr(objectives, "span_corruption_batch", spy)
    out = tmp_path / "run"
    tc = TrainConfig(data=str(shards), out=str(out), objective="span-corruption", context=64, batch_size=8,
                     max_steps=20, lr=3e-3, warmup_steps=5, eval_every=0, checkpoint_every=0, progress=False)
    result = train("tiny-llama", tc)
    assert load_checkpoint(out)["model_config"]["vocab_size"] == 640  # 512 + 100 sentinels, rounded to 64

    losses = result.losses
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    print(f"\nspan corruption: first-5 mean loss {first:.3f}, last-5 {last:.3f}")
    assert first > last + 0.3

    assert len(seen) >= 20  # 20 training batches (+ the final evaluation's)
    for windows, batch, sentinels, eos, density in seen:
        assert sentinels[0] == 639 and min(sentinels) >= 512
        assert batch.inputs.shape[1] <= 64
        for r in range(len(windows)):
            check_span_row(windows[r].tolist(), batch.inputs[r].tolist(), batch.targets[r].tolist(),
                           sentinels, eos, density)


def test_a_context_shorter_than_the_sample_prompt_still_samples(shards, tmp_path, one_thread):
    # The end-of-run sample takes 8 prompt tokens: with a context of 6 and 4 sample tokens the
    # prompt shrinks to 2 tokens, so prompt + continuation fit (the run used to fail at the end).
    from emergence.data.shards import TokenShards

    out = tmp_path / "run"
    tc = TrainConfig(data=str(shards), out=str(out), context=6, batch_size=2, max_steps=2, eval_every=0,
                     sample_tokens=4, checkpoint_every=0, warmup_steps=0, progress=False)
    result = train("tiny-llama", tc)
    assert result.step == 2
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    data = TokenShards(shards)
    prompt = data.tokenizer().decode([int(t) for t in data.split("val")[0][:2]])
    assert samples[-1]["text"].startswith(prompt) and len(samples[-1]["text"]) > len(prompt)


def test_activation_checkpointing_gives_the_same_gradients_from_a_fraction_of_the_saved_activations():
    # checkpoint_activations keeps each block's input for the backward pass and recomputes the
    # block there: the same gradients, bit for bit on the CPU, from far fewer saved tensors.
    from emergence import Config
    from emergence.model import Transformer

    config = Config(name="ckpt", vocab_size=256, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
                    intermediate_size=128)
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, 256, (2, 48))

    def grads_and_saved(checkpointing: bool):
        model.zero_grad()
        model.checkpoint_activations = checkpointing
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved)

    loss, grads, saved = grads_and_saved(False)
    loss_c, grads_c, saved_c = grads_and_saved(True)
    assert loss == loss_c and grads.keys() == grads_c.keys()
    assert all(torch.equal(grads[n], grads_c[n]) for n in grads)
    # the four blocks' insides (attention, MLP, norms) are no longer saved: under a third here
    assert 0 < saved_c < saved / 3, (saved_c, saved)


def test_checkpointed_training_hands_freed_memory_back_every_few_blocks(monkeypatch):
    # allocator.py: after every RELEASE_EVERY_BLOCKS checkpointed blocks the C heap's free pages go
    # back to the OS, in the forward and again when the backward reaches those blocks; never when
    # the blocks are not checkpointed (plain training, evaluation, no_grad).
    import emergence.model
    from emergence import Config
    from emergence.allocator import RELEASE_EVERY_BLOCKS, release_freed_memory
    from emergence.model import Transformer

    assert release_freed_memory()  # glibc's malloc_trim, on this Linux
    calls = []
    monkeypatch.setattr(emergence.model, "release_freed_memory", lambda: calls.append(torch.is_grad_enabled()))
    monkeypatch.setattr(emergence.allocator, "release_freed_memory", lambda: calls.append("backward"))
    n = 2 * RELEASE_EVERY_BLOCKS + 1
    config = Config(name="trim", vocab_size=64, block_size=16, n_layer=n, n_head=2, n_kv_head=2, n_embd=16,
                    intermediate_size=32)
    model = Transformer(config)
    ids = torch.randint(0, 64, (1, 8))
    model.checkpoint_activations = True
    loss = model(ids).sum()
    assert calls == [True, True]  # after blocks 5 and 10 of 11
    loss.backward()
    assert calls == [True, True, "backward", "backward"]
    calls.clear()
    with torch.no_grad():
        model(ids)
    model.eval()
    model(ids).sum().backward()
    model.train()
    model.checkpoint_activations = False
    model(ids).sum().backward()
    assert calls == []


@pytest.mark.parametrize("case", ["tied", "untied+bias", "untied+softcap", "lora-head"])
def test_the_sliced_head_loss_is_the_whole_logits_cross_entropy_without_the_logits(case, monkeypatch):
    # model(ids, targets=...) (what the trainer calls) scores the hidden states a few rows at a
    # time: PyTorch's cross-entropy of the whole logits, value and every gradient, with rows
    # scored nothing skipped, and no tensor of the logits' size ever saved for the backward. A
    # plain linear head (tied, untied with a bias, or frozen under adapters) takes the written-out
    # gradients (_LinearCrossEntropy), a soft-capped one autograd's per slice.
    import emergence.model
    from emergence import Config
    from emergence.adapters import LoraSpec, add_adapter, mark_only_adapters_trainable
    from emergence.model import Transformer

    V = 500
    family = {"untied+softcap": "gemma2", "untied+bias": "phi"}.get(case, "llama")
    config = Config(name="sliced", family=family, vocab_size=V,
                    block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                    tie_embeddings=not case.startswith("untied"), head_bias=case == "untied+bias",
                    final_softcap=4.0 if case == "untied+softcap" else None)
    torch.manual_seed(0)
    model = Transformer(config)
    for p in model.parameters():  # logits spread well beyond the soft cap
        torch.nn.init.normal_(p, std=0.3)
    if case == "lora-head":
        add_adapter(model, LoraSpec(r=4, alpha=8, targets=["q", "v", "lm_head"]),
                    generator=torch.Generator().manual_seed(1))
        for name, p in model.named_parameters():  # B is zero at the start: give the head's adapter a value
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.3)
        mark_only_adapters_trainable(model)
    monkeypatch.setattr(emergence.model, "LOSS_SLICE_ELEMENTS", 7 * V)  # slices of 7 rows: 14 of them here
    written_out = []
    plain_apply = emergence.model._LinearCrossEntropy.apply
    monkeypatch.setattr(emergence.model._LinearCrossEntropy, "apply",
                        lambda *a: written_out.append(1) or plain_apply(*a))
    ids, targets = torch.randint(0, V, (2, 48)), torch.randint(0, V, (2, 48))
    targets[0, :20] = emergence.model.IGNORE_INDEX  # a prompt: nothing scored
    targets[1, 40:] = emergence.model.IGNORE_INDEX
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss_and_grads(sliced: bool):
        model.zero_grad()
        saved, weights = [0], {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:  # activations only
                saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if sliced:
                loss = model(ids, targets=targets)
            else:
                loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in trainable.items()}, max(saved)

    loss, grads, biggest = loss_and_grads(False)
    loss_s, grads_s, biggest_s = loss_and_grads(True)
    assert len(written_out) == (case != "untied+softcap")
    assert abs(loss - loss_s) < 1e-5 * loss and loss > 1
    for name in grads:
        scale = grads[name].abs().max()
        assert scale > 0 and (grads[name] - grads_s[name]).abs().max() <= 1e-5 * scale, name
    # the logits; then nothing bigger than the MLP's hidden states or the head weight's gradient
    assert biggest == 2 * 48 * V and biggest_s == (V * 32 if case != "lora-head" else 2 * 48 * 64)
    with torch.no_grad():  # evaluation: the same value, no gradient work
        assert abs(model(ids, targets=targets).item() - loss) < 1e-5 * loss
        nothing = torch.full_like(targets, emergence.model.IGNORE_INDEX)
        assert math.isnan(model(ids, targets=nothing).item())  # as cross_entropy's mean over no rows


def test_a_run_with_checkpointed_activations_repeats_the_plain_run(shards, tmp_path, one_thread, monkeypatch):
    # The trainer's TrainConfig.checkpoint_activations (`--checkpoint-activations`) sets the model's
    # switch (every block of every training forward pass goes through torch's checkpoint, none of
    # the evaluation's or sampling's): the same losses step for step.
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    losses = []
    for flag in (False, True):
        out = tmp_path / f"run-{flag}"
        tc = TrainConfig(data=str(shards), out=str(out), context=32, batch_size=4, max_steps=4, eval_every=0,
                         sample_tokens=0, checkpoint_every=0, warmup_steps=0, progress=False, log_every=1,
                         checkpoint_activations=flag)
        train("tiny-llama", tc)
        losses.append([r["train_loss"] for r in metrics(out)])
        assert len(calls) == (4 * 2 if flag else 0)  # 4 steps x tiny-llama's 2 blocks
    assert len(losses[0]) == 4 and losses[0] == losses[1]


def test_activation_checkpointing_on_an_encoder_decoder_is_refused(shards, tmp_path):
    # The switch lives on the decoder-only Transformer; a T5 run asking for it is told so in one
    # line instead of training without it.
    from emergence.errors import InvalidArgument

    tc = TrainConfig(data=str(shards), out=str(tmp_path / "run"), objective="span-corruption", context=32,
                     batch_size=2, max_steps=1, eval_every=0, checkpoint_every=0, progress=False,
                     checkpoint_activations=True)
    with pytest.raises(InvalidArgument, match="decoder-only models, not T5"):
        train("tiny-t5", tc)


def test_weights_move_to_huge_pages_unchanged(tmp_path):
    """allocator.huge_page_weights: the large anonymous CPU tensors move (same tensor objects, same
    values, a tied weight moved once) into a mapping the kernel marks eligible for transparent huge
    pages; small tensors and a tensor mapped from a file stay; a second call moves nothing."""
    import numpy as np

    from emergence.allocator import HUGE_PAGE, huge_page_weights, huge_pages_enabled

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(2048, 512), torch.nn.Linear(512, 2048, bias=True))
    model[1].weight = model[0].weight  # tied: (2048, 512) fp32 = 4 MiB, one tensor
    mapped = np.memmap(tmp_path / "w.bin", dtype=np.float32, mode="w+", shape=(1024, 1024))  # 4 MiB from a file
    mapped[:] = 1.5
    model.register_buffer("from_file", torch.from_numpy(mapped))
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    weight, bias, from_file = model[0].weight, model[1].bias, model.from_file
    file_address = from_file.data_ptr()
    moved = huge_page_weights(model)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model[0].weight is weight and model[1].weight is weight and model[1].bias is bias
    assert model.from_file.data_ptr() == file_address  # a file's pages stay the file's
    x = torch.randint(0, 2048, (3,))
    assert torch.equal(model[1](model[0](x)), torch.nn.functional.linear(before["0.weight"][x], before["0.weight"],
                                                                         before["1.bias"]))
    if not huge_pages_enabled():  # THP off (or not Linux): nothing to gain, nothing moved
        assert moved == 0
        return
    assert moved == 2048 * 512 * 4  # the tied weight once; the 8 KiB bias stays
    address = weight.data_ptr()
    assert address % HUGE_PAGE == 0
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
        lines = smaps.read().splitlines()
    for i, line in enumerate(lines):  # the mapping holding the weight, and its THPeligible flag
        if "-" in line.split()[0] and not line.split()[0].endswith(":"):
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if start <= address < end:
                eligible = next(v for v in lines[i + 1:] if v.startswith("THPeligible:"))
                assert eligible.split()[1] == "1"
                break
    else:
        raise AssertionError("the weight's mapping is not in /proc/self/smaps")
    assert huge_page_weights(model) == 0  # nothing left to move
    model.to(torch.float64)  # new tensors (the file's buffer too, now a copy): a mapping of their own
    assert huge_page_weights(model) == (2048 * 512 + 1024 * 1024) * 8 and model[0].weight.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(model[0].weight, before["0.weight"].double())
