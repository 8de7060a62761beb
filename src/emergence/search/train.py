"""Policies and verifiers for test-time search, trained here: `emergence search-train`.

Everything goes into one folder OUT, stage by stage; a stage that finished left a record in
OUT/stages/NAME.json and is not redone when the command runs again (an interrupted policy
pretraining resumes from its last checkpoint):

    problems     OUT/problems/{train,verifier,heldout}.jsonl: problems.generate_problems, all
                 difficulties 1..8, one seed. `train` teaches the policies, `verifier` (problems
                 no policy saw) gives the samples the ORM and PRM learn from, `heldout` is for
                 evaluation only (greedy accuracy per difficulty, and the verifiers' held-out
                 samples). The three splits are disjoint (generate_problems never repeats a question).
    tokenizer    OUT/tokenizer: a byte-level BPE (Tokenizer.train_bpe_from_texts's trainer) on the
                 training texts, with digits split one by one (a space may lead the first digit:
                 " 150" -> " 1" "5" "0"), so that every number is spelled in the same ten digit
                 tokens and the arithmetic of a step is learnable digit by digit.
    shards       OUT/shards: training_text(row) of every training problem (PROMPT_TEMPLATE, then the
                 canonical solution), EOS after each; the held-out problems' texts are the val split.
    policy-NAME  OUT/policies/NAME/model: pretrain.train() of each size (LLaMA shapes, SwiGLU, tied
                 embeddings) on the shards. No separate SFT stage: every document already is the
                 prompt template followed by the solution, so pretraining is supervised on exactly the
                 format the policies are searched with; an SFT pass (loss on the solution only) over
                 the same rows would cost another pass of the data on two CPU cores for the few
                 prompt tokens it stops predicting.
    samples-*    OUT/samples/{verifier,heldout}.jsonl: `samples_per_problem` completions of each
                 problem by the sampler policy at `temperature` (search.LocalPolicy), trimmed at the
                 first "Answer:" line; each labelled correct iff its final answer is right
                 (extract_answer, as `emergence search` scores).
    labels-*     the same rows with Math-Shepherd step labels (`math_shepherd_labels`): step i of a
                 solution is positive iff some completion continued from steps 1..i reaches the
                 right answer; the completions are `rollouts` fresh samples of the sampler policy,
                 plus the solution's own continuation (itself a sample from that prefix): so every
                 step of a correct solution is positive without new rollouts, and an "Answer:" line
                 is positive iff its answer is right.
    orm, prm     OUT/orm, OUT/prm: align.reward.RewardModel (the decoder of the `rm_init` policy and a
                 scalar head), binary cross-entropy (`orm_loss`: the head at the last token, one
                 label per solution; `prm_loss`: the head at the newline token ending each step line,
                 one label per step, only those positions). The texts and positions are
                 search.verifier's (`verifier_inputs`), so `emergence search --verifier OUT/prm`
                 reads the head where it was trained. Saved with the tokenizer (load_verifier).
    eval         each policy's greedy accuracy per difficulty on the held-out problems; the ORM's and
                 PRM's held-out AUC (the probability that a positive outranks a negative) and
                 best-of-N selection on the held-out samples.

    revision-*   for each policy in `revisers` (the long setting: S and M), the model the
                 `revisions` strategy prompts with its previous attempts: the policy's samples of
                 `revision_problems` training problems (OUT/revisions/NAME/samples.jsonl), revision
                 rows built from them (`revision_attempts`: as sampled, or Snell et al.'s wrong ones
                 only) and as many plain rows (revise.py; KIND/data.jsonl), and the policy fine-tuned
                 on them with a longer context (OUT/revisions/NAME/KIND/run/model).

OUT/summary.json holds the figures; the table is printed at the end. `--quick` is a tiny setting
for tests (seconds); the default is the real run (about 16 minutes on two CPU cores, one torch
thread; docs/test_time_compute.md has its figures).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from .prompt import format_prompt, is_answer_line, steps_of, training_text, trim_solution

STAGES_DIR = "stages"
SUMMARY = "summary.json"


# ------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class PolicySize:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    steps: int  # optimizer steps of batch_size x context tokens
    lr: float


@dataclass(frozen=True)
class Setting:
    train_problems: int = 24000  # problems the policies learn from (multiples of 8 keep difficulties even)
    verifier_problems: int = 192  # fresh problems whose samples teach the ORM and PRM
    heldout_per_difficulty: int = 50  # held-out problems per difficulty (greedy accuracy)
    verifier_heldout: int = 48  # of them, those whose samples test the ORM and PRM
    vocab_size: int = 1024
    split_digits: bool = True
    context: int = 320  # the policies' block size and training window
    batch_size: int = 4  # rows of `context` tokens per step: small steps learn fastest at this scale
    # the same 2400 steps (3.1M tokens, ~1 epoch) for every size; 14.6x in non-embedding parameters
    policies: tuple[PolicySize, ...] = (
        PolicySize("S", 2, 48, 4, 2400, 4e-3),
        PolicySize("M", 3, 80, 4, 2400, 3e-3),
        PolicySize("L", 4, 128, 4, 2400, 2.5e-3),
    )
    sampler: str = "L"  # the policy whose samples and rollouts label the verifiers (the best: most right samples)
    rm_init: str = "L"  # the policy whose decoder the ORM and PRM start from
    samples_per_problem: int = 4
    temperature: float = 0.8
    rollouts: int = 2  # Math-Shepherd completions per step (besides the solution's own)
    max_tokens: int = 160  # tokens per sampled solution or rollout (a difficulty-8 solution is ~150)
    rm_epochs: float = 2.0
    rm_lr: float = 1e-3
    rm_batch: int = 16
    chunk: int = 64  # prompts per decode batch
    seed: int = 0
    # sequential revisions (revise.py): the policies that get a revision model, fine-tuned (full) on
    # revision rows from `revision_problems` training problems (`revision_samples` samples each,
    # up to `revision_window` of them in the prompt) mixed 1:1 with plain rows of as many others
    revisers: tuple[str, ...] = ()
    revision_attempts: str = "sampled"  # revise.ATTEMPTS: the prompt's attempts as sampled, or wrong ones only
    revision_problems: int = 6000
    revision_samples: int = 4
    revision_window: int = 4
    revision_context: int = 1024  # four attempts of a difficulty-8 problem run to ~700 tokens
    revision_lr: float = 1e-3
    revision_batch: int = 8

    def policy(self, name: str) -> PolicySize:
        for p in self.policies:
            if p.name == name:
                return p
        raise InvalidArgument(f"no policy named {name!r} in the setting ({', '.join(p.name for p in self.policies)})")

    def check(self) -> None:
        if self.heldout_per_difficulty * 8 < self.verifier_heldout:
            raise InvalidArgument("verifier_heldout exceeds the held-out problems")
        self.policy(self.sampler), self.policy(self.rm_init)
        for name in self.revisers:
            self.policy(name)
        if self.revisers and 2 * self.revision_problems > self.train_problems:
            raise InvalidArgument("revision_problems: twice of them (revision and plain rows) exceed train_problems")
        from .revise import ATTEMPTS

        if self.revision_attempts not in ATTEMPTS:
            raise InvalidArgument(f"revision_attempts must be one of {', '.join(ATTEMPTS)}")
        if self.revision_context < self.context:
            raise InvalidArgument("revision_context is below the policies' context")
        if len({p.name for p in self.policies}) != len(self.policies):
            raise InvalidArgument("policy names must be distinct")


SETTINGS = {
    # the real run: about 16 minutes on two CPU cores (docs/test_time_compute.md has its figures)
    "default": Setting(),
    # four times the steps on four times the problems (each still seen about once): about an hour on
    # one CPU core; the policies of the default run were still learning fast when it ended
    "long": Setting(train_problems=96_000,
                    policies=(PolicySize("S", 2, 48, 4, 9600, 4e-3), PolicySize("M", 3, 80, 4, 9600, 3e-3),
                              PolicySize("L", 4, 128, 4, 9600, 2.5e-3)),
                    revisers=("S", "M")),
    # tests: tiny models and a few hundred problems, seconds
    "quick": Setting(train_problems=400, verifier_problems=16, heldout_per_difficulty=3, verifier_heldout=8,
                     vocab_size=320, context=256, batch_size=8,
                     policies=(PolicySize("S", 1, 32, 2, 12, 3e-3), PolicySize("M", 1, 48, 2, 12, 3e-3),
                               PolicySize("L", 2, 64, 4, 12, 3e-3)),
                     samples_per_problem=2, rollouts=2, max_tokens=40, rm_epochs=1.0, rm_batch=8, chunk=16,
                     revisers=("S",), revision_problems=64, revision_samples=2, revision_window=2,
                     revision_context=320, revision_batch=8),
}


# -------------------------------------------------------------------------------- helpers
def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_correct(text: str, answer) -> bool:
    """A solution is right when its final answer is (as `emergence search` scores it)."""
    from ..problems import extract_answer

    got = extract_answer(trim_solution(text))
    return got is not None and got == answer


def normalize_solution(completion: str) -> str:
    """A completion as the verifiers see it: up to its first "Answer:" line, blank lines dropped."""
    return "\n".join(steps_of(trim_solution(completion)))


def policy_config(size: PolicySize, context: int, vocab_size: int, eos_id: int):
    from ..config import Config

    ffn = 16 * math.ceil(8 * size.n_embd / 3 / 16)
    return Config(name=f"policy-{size.name}", family="llama", norm="rmsnorm", mlp="swiglu", position="rope",
                  vocab_size=vocab_size, block_size=context, n_layer=size.n_layer, n_head=size.n_head,
                  n_embd=size.n_embd, intermediate_size=ffn, tie_embeddings=True, bos_token_id=None,
                  eos_token_id=eos_id)


def parameter_counts(config) -> dict:
    total = config.num_parameters()
    return {"params": total, "non_embedding_params": total - config.vocab_size * config.n_embd}


def train_tokenizer(texts: Sequence[str], vocab_size: int, *, split_digits: bool = True):
    """A byte-level BPE (GPT-2 style, EOS <|endoftext|>) on `texts`; split_digits: numbers are
    cut into single digits before the byte-level split (an optional space stays with the first)."""
    from tokenizers import Regex, pre_tokenizers

    from ..tokenizer import GPT2_EOT, Tokenizer, _bpe_trainer

    if not split_digits:
        return Tokenizer.train_bpe_from_texts(texts, vocab_size)
    backend, trainer = _bpe_trainer(vocab_size, [GPT2_EOT], show_progress=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, eos_token=GPT2_EOT)


# ------------------------------------------------------------------------- the losses
def orm_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Outcome reward model: binary cross-entropy of sigmoid(score) against each solution's label.
    scores (B,): the head's logit at each row's last token; labels (B,) in [0, 1]. Mean over rows."""
    return F.binary_cross_entropy_with_logits(scores.float(), labels.float())


def prm_loss(token_scores: torch.Tensor, step_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Process reward model: binary cross-entropy of sigmoid(head) against each step's label, at the
    step-ending newline tokens only. token_scores (B, T) logits, step_mask (B, T) bool (True where
    a step ends), labels (B, T) (read where the mask is True). Mean over all the steps of the batch."""
    mask = step_mask.bool()
    if not bool(mask.any()):
        return token_scores.sum() * 0.0
    return F.binary_cross_entropy_with_logits(token_scores[mask].float(), labels[mask].float())


# ------------------------------------------------------------------- verifier inputs
def verifier_inputs(tokenizer, kind: str, prompt: str, solution: str) -> tuple[list[int], list[int]]:
    """(token ids, positions read) of a solution as search.verifier.RewardVerifier scores it: the
    ORM reads the last token of prompt + solution; the PRM reads, for each non-blank line, the
    token holding the newline that ends it (the text being the prompt, then each line and "\\n")."""
    if kind == "orm":
        text, ends = prompt + solution.rstrip("\n"), []
    else:
        text, ends = prompt, []
        for line in steps_of(solution):
            text += line
            ends.append(len(text))
            text += "\n"
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(encoding.ids), list(encoding.offsets)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids, offsets = [tokenizer.bos_id, *ids], [(0, 0), *offsets]
    if kind == "orm":
        return ids, [len(ids) - 1]
    starts = [start for start, _ in offsets]
    return ids, [max(bisect.bisect_right(starts, end) - 1, 0) for end in ends]


# --------------------------------------------------------------- Math-Shepherd labels
def math_shepherd_labels(policy, items: Sequence[dict], *, rollouts: int, temperature: float, max_tokens: int,
                         chunk: int = 64, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Step labels of sampled solutions, Math-Shepherd's hard estimation.

    items: {"prompt", "solution", "answer"} (the solution as the verifiers see it). Returns, for
    each, {"steps": lines, "labels": [0/1 per step], "successes": [k or None], "rollouts": [n]}:
    step i is labelled 1 iff some completion continued from prompt + steps 1..i + "\\n" reaches
    the right answer. The completions are `rollouts` fresh samples of `policy` plus the
    solution's own continuation, so a correct solution's steps are all 1 without any rollout
    (successes None) and an "Answer:" line is 1 iff its answer is right."""
    out, jobs = [], []  # jobs: (item index, step index, the partial solution)
    for n, item in enumerate(items):
        steps = steps_of(item["solution"])
        correct = is_correct(item["solution"], item["answer"])
        labels, successes, counts = [], [], []
        for i, line in enumerate(steps):
            if correct or is_answer_line(line):
                labels.append(int(correct))
                successes.append(None)
                counts.append(0)
            else:
                labels.append(0)
                successes.append(0)
                counts.append(rollouts)
                jobs.append((n, i, "\n".join(steps[:i + 1]) + "\n"))
        out.append({"steps": steps, "labels": labels, "successes": successes, "rollouts": counts})
    for b in range(0, len(jobs), chunk):
        part = jobs[b:b + chunk]
        gens = policy.generate([items[n]["prompt"] + partial for n, _, partial in part], rollouts,
                               temperature=temperature, max_tokens=max_tokens)
        for (n, i, partial), gen in zip(part, gens):
            wins = sum(is_correct(partial + s.text, items[n]["answer"]) for s in gen.samples)
            out[n]["successes"][i] = wins
            out[n]["labels"][i] = int(wins > 0)
        if progress is not None:
            progress(min(b + chunk, len(jobs)), len(jobs))
    return out


# ------------------------------------------------------------------------------ metrics
def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """The probability that a positive scores above a negative (ties count half); None without both."""
    pos = sorted(s for s, y in zip(scores, labels) if y)
    neg = sorted(s for s, y in zip(scores, labels) if not y)
    if not pos or not neg:
        return None
    wins = 0.0
    for s in pos:
        lo, hi = bisect.bisect_left(neg, s), bisect.bisect_right(neg, s)
        wins += lo + 0.5 * (hi - lo)
    return wins / (len(pos) * len(neg))


def _accuracy_at_half(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    if not labels:
        return None
    return sum((s > 0.5) == bool(y) for s, y in zip(scores, labels)) / len(labels)


# -------------------------------------------------------------------------- the stages
class Pipeline:
    def __init__(self, out: str | Path, setting: Setting, *, device: str = "auto", log: Callable[[str], None] = print,
                 setting_name: str = "default") -> None:
        setting.check()
        self.out, self.setting, self.device, self.log = Path(out), setting, device, log
        self.setting_name = setting_name
        self.ran: list[str] = []  # the stages this call ran (the others were done before)

    # stage bookkeeping
    def stage(self, name: str, fn: Callable[[], dict]) -> dict:
        record = self.out / STAGES_DIR / f"{name}.json"
        if record.is_file():
            info = json.loads(record.read_text())
            self.log(f"[{name}] done before ({info.get('seconds', 0):.0f}s), skipped")
            return info
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        info = fn()
        info["seconds"] = info.get("seconds", 0.0) + time.perf_counter() - start
        _write_json(record, info)
        self.ran.append(name)
        self.log(f"[{name}] {info['seconds']:.1f}s")
        return info

    def check_setting(self) -> None:
        path = self.out / "setting.json"
        now = json.loads(json.dumps(asdict(self.setting)))
        if path.is_file():
            before = json.loads(path.read_text())
            if set(before) < set(now):  # a run from before a field existed: the field only adds stages
                before = {**now, **before}
                _write_json(path, before)
            if before != now:
                changed = sorted(k for k in now if before.get(k) != now.get(k))
                raise InvalidArgument(f"{self.out} holds a run with another setting (differs in {', '.join(changed)});"
                                      " choose another --out")
        else:
            _write_json(path, now)

    # 1. problems
    def problems(self) -> dict:
        from ..problems import generate_problems, write_problems

        s = self.setting
        held = 8 * s.heldout_per_difficulty
        rows = generate_problems(s.train_problems + s.verifier_problems + held, (1, 8), seed=s.seed)
        splits = {"train": rows[:s.train_problems],
                  "verifier": rows[s.train_problems:s.train_problems + s.verifier_problems],
                  "heldout": rows[s.train_problems + s.verifier_problems:]}
        for name, part in splits.items():
            write_problems(part, self.out / "problems" / f"{name}.jsonl")
        return {"rows": {k: len(v) for k, v in splits.items()}}

    def rows(self, split: str) -> list[dict]:
        return _read_jsonl(self.out / "problems" / f"{split}.jsonl")

    def heldout_for_verifiers(self) -> list[dict]:
        """`verifier_heldout` held-out problems, spread evenly over the difficulties."""
        rows = self.rows("heldout")
        return rows[:self.setting.verifier_heldout]  # generate_problems cycles the difficulties

    # 2. tokenizer and shards
    def tokenizer_stage(self) -> dict:
        texts = [training_text(r) for r in self.rows("train")]
        tok = train_tokenizer(texts, self.setting.vocab_size, split_digits=self.setting.split_digits)
        tok.save(self.out / "tokenizer")
        return {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint()}

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        return Tokenizer.load(self.out / "tokenizer")

    def shards(self) -> dict:
        import shutil

        import numpy as np

        from ..data.shards import write_token_shards

        tok = self.tokenizer()
        folder = self.out / "shards"
        if folder.exists():  # a partial write
            shutil.rmtree(folder)

        def ids(rows):
            out = []
            for r in rows:
                out += tok.encode(training_text(r)) + [tok.eos_id]
            return np.asarray(out, dtype=np.int64)

        train, val = ids(self.rows("train")), ids(self.rows("heldout"))
        write_token_shards({"train": train, "val": val}, tok, folder, source="emergence problems (search-train)")
        return {"train_tokens": int(len(train)), "val_tokens": int(len(val))}

    # 3. policies
    def policy_dir(self, name: str) -> Path:
        return self.out / "policies" / name

    def train_policy(self, size: PolicySize) -> dict:
        from ..train.checkpoint import CHECKPOINT
        from ..train.trainer import TrainConfig, resolve_model_config, train

        s = self.setting
        tok = self.tokenizer()
        run = self.policy_dir(size.name)
        config = resolve_model_config(policy_config(size, s.context, tok.vocab_size, tok.eos_id), tok.vocab_size,
                                      tok.eos_id, "next-token")
        val_tokens = json.loads((self.out / STAGES_DIR / "shards.json").read_text())["val_tokens"]
        tc = TrainConfig(data=str(self.out / "shards"), out=str(run), context=s.context, batch_size=s.batch_size,
                         max_steps=size.steps, lr=size.lr, min_lr=size.lr / 10, warmup_steps=max(1, size.steps // 20),
                         eval_every=size.steps, eval_batches=max(1, min(20, val_tokens // (s.batch_size * s.context))),
                         checkpoint_every=max(1, size.steps // 4), log_every=max(1, size.steps // 10),
                         sample_tokens=32, seed=s.seed + 1, device=self.device, progress=False)
        resume = (run / CHECKPOINT).is_file()
        if resume and (run / "model" / "config.json").is_file():
            from ..train.checkpoint import load_checkpoint

            if load_checkpoint(run)["step"] >= size.steps:  # trained; only the record is missing
                resume = None
        started = time.perf_counter()
        if resume is not None:
            result = train(config, tc, resume=resume)
            val_loss, train_loss = result.val_loss, result.train_loss
        else:
            val_loss = train_loss = None
        rows = _read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
        evals = [r for r in rows if r.get("val_loss") is not None]
        if evals:
            val_loss = evals[-1]["val_loss"]
        if rows:
            train_loss = rows[-1]["train_loss"]
        return {"name": size.name, "n_layer": size.n_layer, "n_embd": size.n_embd, "n_head": size.n_head,
                "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size, "context": s.context,
                **parameter_counts(config), "steps": size.steps, "lr": size.lr,
                "tokens": size.steps * s.batch_size * s.context, "train_loss": train_loss, "val_loss": val_loss,
                "train_seconds": time.perf_counter() - started, "resumed": bool(resume)}

    def load_policy(self, name: str, seed: int = 0, model: Path | None = None):
        """Policy NAME of the run as a seeded LocalPolicy; `model`: another model folder under that
        name, refused unless its tokenizer is the run's."""
        import emergence

        from .policy import LocalPolicy

        lm = emergence.load(str(model or self.policy_dir(name) / "model"), device=self.device)
        if model is not None and lm.tokenizer.fingerprint() != self.tokenizer().fingerprint():
            raise InvalidArgument(f"{model}: its tokenizer is not the run's; revision rows need the run's tokens")
        return LocalPolicy(lm, seed=seed, name=name)

    def trained_policy(self, name: str) -> dict:
        """The stages policy NAME needs, run now or found done: the problems, tokenizer and shards,
        its pretraining and its greedy evaluation (what a revision model of it starts from); the
        evaluation's record."""
        for stage, fn in (("problems", self.problems), ("tokenizer", self.tokenizer_stage), ("shards", self.shards)):
            self.stage(stage, fn)
        size = self.setting.policy(name)
        self.stage(f"policy-{name}", lambda: self.train_policy(size))
        return self.stage(f"eval-{name}", lambda: self.greedy(name))

    # 4. samples and labels
    def sample(self, split: str) -> dict:
        s = self.setting
        rows = self.rows("verifier") if split == "verifier" else self.heldout_for_verifiers()
        policy = self.load_policy(s.sampler, seed=s.seed + (1 if split == "verifier" else 2))
        out = []
        for b in range(0, len(rows), s.chunk):
            part = rows[b:b + s.chunk]
            gens = policy.generate([format_prompt(r["question"]) for r in part], s.samples_per_problem,
                                   temperature=s.temperature, max_tokens=s.max_tokens)
            for r, gen in zip(part, gens):
                for j, sample in enumerate(gen.samples):
                    solution = normalize_solution(sample.text)
                    out.append({"problem": r["question"], "answer": r["answer"], "difficulty": r["difficulty"],
                                "sample": j, "solution": solution, "correct": is_correct(solution, r["answer"]),
                                "finish": sample.finish_reason})
        _write_jsonl(self.out / "samples" / f"{split}.jsonl", out)
        return {"samples": len(out), "correct": sum(r["correct"] for r in out),
                "generated_tokens": policy.usage.generated_tokens}

    def label(self, split: str) -> dict:
        s = self.setting
        rows = _read_jsonl(self.out / "samples" / f"{split}.jsonl")
        policy = self.load_policy(s.sampler, seed=s.seed + (3 if split == "verifier" else 4))
        items = [{"prompt": format_prompt(r["problem"]), "solution": r["solution"], "answer": r["answer"]}
                 for r in rows]
        every = max(1, 10 * s.chunk)

        def progress(done: int, total: int) -> None:
            if done % every == 0 or done == total:
                self.log(f"  rolled out from {done}/{total} steps")

        labelled = math_shepherd_labels(policy, items, rollouts=s.rollouts, temperature=s.temperature,
                                        max_tokens=s.max_tokens, chunk=s.chunk, progress=progress)
        for r, lab in zip(rows, labelled):
            r.update(step_labels=lab["labels"], step_successes=lab["successes"], step_rollouts=lab["rollouts"])
        _write_jsonl(self.out / "samples" / f"{split}-labelled.jsonl", rows)
        steps = [y for r in rows for y in r["step_labels"]]
        return {"solutions": len(rows), "steps": len(steps), "positive_steps": sum(steps),
                "rollouts": sum(sum(r["step_rollouts"]) for r in rows),
                "generated_tokens": policy.usage.generated_tokens}

    def labelled(self, split: str) -> list[dict]:
        return _read_jsonl(self.out / "samples" / f"{split}-labelled.jsonl")

    # 5. verifiers
    def train_verifier(self, kind: str) -> dict:
        from ..align.reward import RewardModel, save_reward_model
        from ..api import resolve_device
        from ..train.optim import learning_rate
        from ..weights.hf import load_hf

        s = self.setting
        tok = self.tokenizer()
        decoder, config = load_hf(self.policy_dir(s.rm_init) / "model", dtype=torch.float32)
        torch.manual_seed(s.seed + 11)
        model = RewardModel(decoder, pad_token_id=tok.eos_id)
        device = resolve_device(self.device)
        model.to(device).train()
        items = []  # (ids, positions, labels)
        for r in self.labelled("verifier"):
            if not r["solution"].strip():
                continue
            ids, positions = verifier_inputs(tok, kind, format_prompt(r["problem"]), r["solution"])
            labels = [float(r["correct"])] if kind == "orm" else [float(y) for y in r["step_labels"]]
            items.append(_fit(ids, positions, labels, config.block_size))
        if not items:
            raise InvalidArgument("no sampled solutions to train a verifier on")
        steps = max(1, math.ceil(s.rm_epochs * len(items) / s.rm_batch))
        optimizer = torch.optim.AdamW(model.parameters(), lr=s.rm_lr, betas=(0.9, 0.95), weight_decay=0.0)
        order: list[int] = []
        g = torch.Generator().manual_seed(s.seed + 12)
        losses = []
        started = time.perf_counter()
        for step in range(steps):
            lr = learning_rate(step, schedule="cosine", lr=s.rm_lr, min_lr=s.rm_lr / 10,
                               warmup_steps=max(1, steps // 20), max_steps=steps, decay_fraction=0.2)
            for group in optimizer.param_groups:
                group["lr"] = lr
            while len(order) < s.rm_batch:
                order += torch.randperm(len(items), generator=g).tolist()
            batch, order = [items[i] for i in order[:s.rm_batch]], order[s.rm_batch:]
            ids, mask, labels = _collate(batch, model.pad_token_id)
            scores = model.token_scores(ids.to(device))
            mask, labels = mask.to(device), labels.to(device)
            if kind == "orm":
                last = mask.float().argmax(dim=1)  # the one position of each row
                rows = torch.arange(len(batch), device=device)
                loss = orm_loss(scores[rows, last], labels[rows, last])
            else:
                loss = prm_loss(scores, mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
                self.log(f"  {kind} step {step + 1}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
        seconds = time.perf_counter() - started
        model.eval()
        folder = self.out / kind
        save_reward_model(model.cpu(), folder)
        tok.save(folder)
        # the trained head's values on a few held-out solutions, read back by the tests through load_verifier
        checks = []
        for r in self.labelled("heldout")[:4]:
            if not r["solution"].strip():
                continue
            ids, positions = verifier_inputs(tok, kind, format_prompt(r["problem"]), r["solution"])
            with torch.inference_mode():
                head = model.token_scores(torch.tensor([ids]))[0]
            checks.append({"prompt": format_prompt(r["problem"]), "solution": r["solution"],
                           "scores": [torch.sigmoid(head[p]).item() for p in positions]})
        _write_json(folder / "check.json", checks)
        tokens = sum(len(i[0]) for i in items)
        return {"kind": kind, "init": s.rm_init, **parameter_counts(config), "items": len(items),
                "labels": sum(len(i[1]) for i in items), "positive": sum(sum(i[2]) for i in items), "steps": steps,
                "tokens_per_epoch": tokens, "first_loss": losses[0],
                "final_loss": sum(losses[-10:]) / len(losses[-10:]),
                "train_seconds": seconds}

    # 6. evaluation
    def greedy(self, name: str) -> dict:
        s = self.setting
        rows = self.rows("heldout")
        policy = self.load_policy(name)
        records = []
        started = time.perf_counter()
        for b in range(0, len(rows), s.chunk):
            part = rows[b:b + s.chunk]
            gens = policy.generate([format_prompt(r["question"]) for r in part], 1, temperature=0.0,
                                   max_tokens=s.max_tokens)
            for r, gen in zip(part, gens):
                from ..problems import check_solution

                text = normalize_solution(gen.samples[0].text) if gen.samples else ""
                records.append({"difficulty": r["difficulty"], "correct": is_correct(text, r["answer"]),
                                "all_steps_valid": check_solution(r["question"], text, r["answer"]).correct})
        by = {}
        for rec in records:
            by.setdefault(rec["difficulty"], []).append(rec)
        return {"name": name, "problems": len(records), "accuracy": sum(r["correct"] for r in records) / len(records),
                "fully_correct": sum(r["all_steps_valid"] for r in records) / len(records),
                "by_difficulty": {str(d): sum(r["correct"] for r in v) / len(v) for d, v in sorted(by.items())},
                "generated_tokens": policy.usage.generated_tokens, "eval_seconds": time.perf_counter() - started}

    def evaluate_verifiers(self) -> dict:
        from .verifier import aggregate, load_verifier

        rows = [r for r in self.labelled("heldout") if r["solution"].strip()]
        orm = load_verifier(str(self.out / "orm"), kind="orm", device=self.device)
        prm = load_verifier(str(self.out / "prm"), kind="prm", device=self.device)
        by_problem: dict = {}
        for r in rows:
            by_problem.setdefault(r["problem"], []).append(r)
        for problem, group in by_problem.items():
            prompt = format_prompt(problem)
            sols = [r["solution"] for r in group]
            for r, o, p in zip(group, orm.score(prompt, sols), prm.score(prompt, sols)):
                r["orm"], r["prm_steps"] = o[-1] if o else 0.0, p
        correct = [int(r["correct"]) for r in rows]
        out = {"heldout_solutions": len(rows), "heldout_correct": sum(correct),
               "heldout_problems": len(by_problem)}
        orm_scores = [r["orm"] for r in rows]
        out["orm"] = {"auc": auc(orm_scores, correct), "accuracy_at_0.5": _accuracy_at_half(orm_scores, correct)}
        steps = [(sc, y) for r in rows for sc, y in zip(r["prm_steps"], r["step_labels"])]
        out["prm"] = {"step_auc": auc([a for a, _ in steps], [b for _, b in steps]),
                      "step_accuracy_at_0.5": _accuracy_at_half([a for a, _ in steps], [b for _, b in steps]),
                      "heldout_steps": len(steps), "positive_steps": sum(b for _, b in steps)}
        for how in ("last", "min", "prod"):
            out["prm"][f"solution_auc_{how}"] = auc([aggregate(r["prm_steps"], how) for r in rows], correct)
        # best-of-N on the held-out samples: the chosen solution's accuracy, per problem
        pick = {"random (mean)": lambda g: sum(r["correct"] for r in g) / len(g),
                "pass@n (oracle)": lambda g: float(any(r["correct"] for r in g)),
                "orm": lambda g: float(max(g, key=lambda r: r["orm"])["correct"]),
                "prm-last": lambda g: float(max(g, key=lambda r: aggregate(r["prm_steps"], "last"))["correct"]),
                "prm-min": lambda g: float(max(g, key=lambda r: aggregate(r["prm_steps"], "min"))["correct"])}
        groups = list(by_problem.values())
        out["best_of_n"] = {"n": self.setting.samples_per_problem,
                            **{k: sum(f(g) for g in groups) / len(groups) for k, f in pick.items()}}
        # the canonical solution against the policy's wrong samples of the same problem: the share of
        # (canonical, wrong sample) pairs the verifier ranks the right way round (ties count half)
        from ..problems import solution_text

        pairs = {"orm": [], "prm-last": [], "prm-min": []}
        for row in self.heldout_for_verifiers():
            wrong = [r for r in by_problem.get(row["question"], []) if not r["correct"]]
            if not wrong:
                continue
            prompt, gold = format_prompt(row["question"]), solution_text(row)
            (o,), (p,) = orm.score(prompt, [gold]), prm.score(prompt, [gold])
            mine = {"orm": o[-1], "prm-last": aggregate(p, "last"), "prm-min": aggregate(p, "min")}
            for r in wrong:
                theirs = {"orm": r["orm"], "prm-last": aggregate(r["prm_steps"], "last"),
                          "prm-min": aggregate(r["prm_steps"], "min")}
                for k in pairs:
                    pairs[k].append(1.0 if mine[k] > theirs[k] else 0.5 if mine[k] == theirs[k] else 0.0)
        out["canonical_vs_wrong"] = {"pairs": len(pairs["orm"]),
                                     **{k: sum(v) / len(v) if v else None for k, v in pairs.items()}}
        return out

    # 7. revision models (sequential revisions)
    def revision_dir(self, name: str) -> Path:
        return self.out / "revisions" / name

    def reviser_dir(self, name: str, attempts: str) -> Path:
        """The folder of policy NAME's revision model of that kind of attempts (revise.ATTEMPTS:
        both kinds may be made in one run, from the same samples)."""
        return self.revision_dir(name) / attempts

    def revision_samples(self, name: str, model: Path | None = None) -> dict:
        """`revision_samples` samples of policy NAME (the run's, or the model folder `model`:
        another policy of the same tokenizer, a GRPO-trained one say) for each of the first
        `revision_problems` training problems (the attempts the revision rows are built from)."""
        s = self.setting
        rows = self.rows("train")[:s.revision_problems]
        policy = self.load_policy(name, seed=s.seed + 20, model=model)
        out = []
        for b in range(0, len(rows), s.chunk):
            part = rows[b:b + s.chunk]
            gens = policy.generate([format_prompt(r["question"]) for r in part], s.revision_samples,
                                   temperature=s.temperature, max_tokens=s.max_tokens)
            for i, (r, gen) in enumerate(zip(part, gens)):
                for sample in gen.samples:
                    solution = normalize_solution(sample.text)
                    out.append({"problem": b + i, "solution": solution, "correct": is_correct(solution, r["answer"])})
        _write_jsonl(self.revision_dir(name) / "samples.jsonl", out)
        return {"problems": len(rows), "samples": len(out), "correct": sum(r["correct"] for r in out),
                "generated_tokens": policy.usage.generated_tokens}

    def train_reviser(self, name: str, attempts: str | None = None, model: Path | None = None) -> dict:
        """Policy NAME fine-tuned (full, loss on the completions) on revision rows from its own
        samples (`attempts`: revise.ATTEMPTS, default the setting's) and as many plain rows of
        other training problems, with its context raised to `revision_context` (revise.py); the
        model lands in reviser_dir(NAME, attempts)/run/model. `model`: as for revision_samples."""
        from ..finetune.run import FinetuneConfig, finetune
        from ..train.checkpoint import CHECKPOINT, load_checkpoint
        from ..train.trainer import TrainConfig
        from .revise import plain_rows, revision_rows, with_context

        s = self.setting
        kind = attempts or s.revision_attempts
        folder = self.reviser_dir(name, kind)
        train = self.rows("train")
        tries: list[list[tuple[str, bool]]] = [[] for _ in range(s.revision_problems)]
        for r in _read_jsonl(self.revision_dir(name) / "samples.jsonl"):
            tries[r["problem"]].append((r["solution"], r["correct"]))
        revise = revision_rows(train[:s.revision_problems], tries, window=s.revision_window, seed=s.seed + 21,
                               kind=kind)
        plain = plain_rows(train[s.revision_problems:s.revision_problems + len(revise)])
        data = folder / "data.jsonl"
        if not data.is_file():
            _write_jsonl(data, revise + plain)  # (the loop draws rows in a seeded order)
        base = folder / "base"
        if not (base / "config.json").is_file():
            with_context(model or self.policy_dir(name) / "model", base, s.revision_context)
        run = folder / "run"
        fc = FinetuneConfig(model=str(base), data=[str(data)], method="full", chat_template="chatml",
                            val_fraction=0.02, epochs=1.0, sample_rows=0)
        tc = TrainConfig(data="", out=str(run), context=s.revision_context, batch_size=s.revision_batch,
                         max_steps=0, lr=s.revision_lr, min_lr=s.revision_lr / 10, warmup_steps=20, eval_every=0,
                         eval_batches=4, checkpoint_every=200, log_every=50, sample_every=0, seed=s.seed + 22,
                         device=self.device, progress=False)
        resume = (run / CHECKPOINT).is_file()
        started = time.perf_counter()
        if not (resume and (run / "model" / "config.json").is_file()):
            finetune(fc, tc, resume=resume)
        rows = _read_jsonl(run / "metrics.jsonl")
        evals = [r for r in rows if r.get("val_loss") is not None]
        return {"name": name, "attempts": kind, "revision_rows": len(revise), "plain_rows": len(plain),
                "chains": {str(k): sum(r["prompt"].count("\nAttempt ") == k for r in revise)
                           for k in range(1, s.revision_window + 1)},  # rows by attempts in the prompt
                "steps": load_checkpoint(run)["step"], "context": s.revision_context, "lr": s.revision_lr,
                "train_loss": rows[-1]["train_loss"] if rows else None,
                "val_loss": evals[-1]["val_loss"] if evals else None,
                "train_seconds": time.perf_counter() - started, "resumed": resume}

    # the whole run
    def run(self) -> dict:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_setting()
        s = self.setting
        info = {"problems": self.stage("problems", self.problems),
                "tokenizer": self.stage("tokenizer", self.tokenizer_stage),
                "shards": self.stage("shards", self.shards)}
        policies = [self.stage(f"policy-{p.name}", lambda p=p: self.train_policy(p)) for p in s.policies]
        for split in ("verifier", "heldout"):
            info[f"samples-{split}"] = self.stage(f"samples-{split}", lambda split=split: self.sample(split))
            info[f"labels-{split}"] = self.stage(f"labels-{split}", lambda split=split: self.label(split))
        verifiers = {kind: self.stage(kind, lambda kind=kind: self.train_verifier(kind)) for kind in ("orm", "prm")}
        greedy = {p.name: self.stage(f"eval-{p.name}", lambda p=p: self.greedy(p.name)) for p in s.policies}
        quality = self.stage("eval-verifiers", self.evaluate_verifiers)
        revisers = []
        for name in s.revisers:
            self.stage(f"revision-samples-{name}", lambda name=name: self.revision_samples(name))
            revisers.append(self.stage(reviser_stage(name, s.revision_attempts),
                                       lambda name=name: self.train_reviser(name)))
        for p in policies:
            p["greedy"] = {k: greedy[p["name"]][k] for k in ("problems", "accuracy", "fully_correct", "by_difficulty")}
        verifiers["orm"]["heldout"] = quality["orm"]
        verifiers["prm"]["heldout"] = quality["prm"]
        stage_seconds = {p.stem: json.loads(p.read_text())["seconds"]
                         for p in sorted((self.out / STAGES_DIR).glob("*.json"))}
        summary = {"setting": self.setting_name, "settings": asdict(s), "data": info, "policies": policies,
                   "verifiers": verifiers, "revisers": revisers,
                   "verifier_heldout": {k: quality[k] for k in quality if k not in ("orm", "prm")},
                   "parameter_span": {"non_embedding": max(p["non_embedding_params"] for p in policies)
                                      / min(p["non_embedding_params"] for p in policies),
                                      "total": max(p["params"] for p in policies) / min(p["params"] for p in policies)},
                   "stage_seconds": stage_seconds, "total_seconds": sum(stage_seconds.values()),
                   "this_call_seconds": time.perf_counter() - started, "threads": torch.get_num_threads(),
                   "device": self.device}
        _write_json(self.out / SUMMARY, summary)
        return summary


def reviser_stage(name: str, attempts: str) -> str:
    """The stage that makes policy NAME's revision model of that kind of attempts."""
    return f"revision-{name}-{attempts}"


def _fit(ids: list[int], positions: list[int], labels: list[float], block: int):
    """A text longer than the context keeps its end (as the verifier does); positions move with it."""
    cut = max(0, len(ids) - block)
    kept = [(p - cut, y) for p, y in zip(positions, labels) if p >= cut]
    return ids[cut:], [p for p, _ in kept], [y for _, y in kept]


def _collate(batch, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T), the positions read (B, T) bool, their labels (B, T)."""
    width = max(len(ids) for ids, _, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    labels = torch.zeros((len(batch), width))
    for r, (row, positions, ys) in enumerate(batch):
        ids[r, :len(row)] = torch.tensor(row)
        for p, y in zip(positions, ys):
            mask[r, p], labels[r, p] = True, y
    return ids, mask, labels


# ------------------------------------------------------------------------------ the table
def format_table(summary: dict) -> str:
    lines = []
    diffs = sorted({d for p in summary["policies"] for d in p["greedy"]["by_difficulty"]}, key=int)
    head = (f"{'policy':<7}{'layers x width':>15}{'params':>9}{'non-emb':>9}{'tokens':>9}{'train s':>9}"
            f"{'val loss':>9}{'greedy':>8}  " + " ".join(f"{'d' + d:>5}" for d in diffs))
    lines.append(head)
    for p in summary["policies"]:
        g = p["greedy"]
        lines.append(f"{p['name']:<7}{str(p['n_layer']) + ' x ' + str(p['n_embd']):>15}{p['params'] / 1e6:>8.2f}M"
                     f"{p['non_embedding_params'] / 1e6:>8.2f}M{p['tokens'] / 1e6:>8.2f}M{p['train_seconds']:>9.0f}"
                     f"{p['val_loss'] if p['val_loss'] is not None else float('nan'):>9.3f}{g['accuracy']:>8.1%}  "
                     + " ".join(f"{g['by_difficulty'].get(d, float('nan')):>5.0%}" for d in diffs))
    span = summary["parameter_span"]
    lines.append(f"parameter span: {span['non_embedding']:.1f}x non-embedding, {span['total']:.1f}x total")

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    v = summary["verifiers"]
    o, p = v["orm"]["heldout"], v["prm"]["heldout"]
    for split in ("verifier", "heldout"):
        sam, lab = summary["data"][f"samples-{split}"], summary["data"][f"labels-{split}"]
        lines.append(f"samples ({split} problems, policy {summary['settings']['sampler']}): {sam['samples']} "
                     f"solutions, {sam['correct']} right; {lab['steps']} steps, {lab['positive_steps']} positive after "
                     f"{lab['rollouts']} rollouts")
    lines.append(f"ORM (from {v['orm']['init']}, {v['orm']['items']} solutions, {v['orm']['positive']:.0f} right): "
                 f"held-out AUC {f(o['auc'])}, accuracy at 0.5 {f(o['accuracy_at_0.5'])}")
    lines.append(f"PRM (from {v['prm']['init']}, {v['prm']['labels']} steps, {v['prm']['positive']:.0f} positive): "
                 f"held-out step AUC {f(p['step_auc'])}, solution AUC last {f(p['solution_auc_last'])} "
                 f"min {f(p['solution_auc_min'])} prod {f(p['solution_auc_prod'])}")
    b = summary["verifier_heldout"]["best_of_n"]
    lines.append(f"best-of-{b['n']} on {summary['verifier_heldout']['heldout_problems']} held-out problems: "
                 + ", ".join(f"{k} {b[k]:.1%}" for k in b if k != "n"))
    c = summary["verifier_heldout"].get("canonical_vs_wrong")
    if c:
        lines.append(f"canonical solution above a wrong sample ({c['pairs']} held-out pairs): "
                     + ", ".join(f"{k} {f(c[k])}" for k in ("orm", "prm-last", "prm-min")))
    for r in summary.get("revisers", []):
        counts = sorted(r["chains"], key=int)
        lines.append(f"revision model of {r['name']} ({r['attempts']} attempts): {r['revision_rows']} revision rows "
                     f"({'/'.join(counts)} attempts in the prompt: {'/'.join(str(r['chains'][k]) for k in counts)}) + "
                     f"{r['plain_rows']} plain rows, {r['steps']} steps, "
                     f"context {r['context']}, val loss {f(r['val_loss'])}")
    lines.append(f"total {summary['total_seconds'] / 60:.1f} min of stages")
    return "\n".join(lines)


def run(out: str | Path, setting: str | Setting = "default", *, device: str = "auto",
        log: Callable[[str], None] = print) -> dict:
    """Train (or finish training) the policies and verifiers in OUT; returns the summary."""
    name = setting if isinstance(setting, str) else "custom"
    if isinstance(setting, str):
        if setting not in SETTINGS:
            raise InvalidArgument(f"unknown setting {setting!r} (use {', '.join(SETTINGS)})")
        setting = SETTINGS[setting]
    return Pipeline(out, setting, device=device, log=log, setting_name=name).run()


# --------------------------------------------------------------------------------- the CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Train the policies (three sizes) and verifiers (an ORM and a Math-Shepherd PRM) that "
                     "`emergence search` uses, on generated arithmetic word problems, into OUT: problems, tokenizer, "
                     "pretraining, samples, step labels, reward models, evaluation. A rerun skips the finished "
                     "stages. Prints a table and writes OUT/summary.json.")
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder (a rerun resumes it)")
    p.add_argument("--quick", action="store_true", help="tiny models and a few hundred problems (tests; seconds)")
    p.add_argument("--setting", choices=sorted(SETTINGS), default=None,
                   help="default (about 16 minutes on 2 CPU cores), long (4x the steps and problems), quick")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")


def command(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgument(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.quick and args.setting not in (None, "quick"):
        raise InvalidArgument(f"--quick and --setting {args.setting} disagree: give one")
    summary = run(args.out, "quick" if args.quick else (args.setting or "default"), device=args.device,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(summary, indent=1) if args.json else format_table(summary))
