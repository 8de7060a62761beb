"""Online reinforcement learning: GRPO and PPO on a decoder, with rollouts through the batched decode path.

    prompts.jsonl --load_prompts--> token ids (chat rows through the chat template)
    every step:  rollout   G samples of each of P prompts: one DecodeBatch per rollout, each prompt
                           prefilled once and forked G ways (its KV blocks shared, copied on write),
                           decoded by the native CPU step where it runs (decode.make_backend), with
                           the policy's weights as they are now (a fresh batch builds its plan from them)
                 score     rewards: Python functions (rewards.py) or a reward model
                 logps     the completions' log-probs under the policy (old), the reference and (PPO)
                           the value model: one teacher-forced forward per chunk of rows, no grad
                 update    GRPO: group-relative advantages, `num_iterations` passes of the clipped
                           loss (align.losses.grpo_loss), `mini_batches` optimizer steps per pass;
                           PPO: per-token KL penalty + score, GAE, whitening (losses.ppo_advantages),
                           `ppo_epochs` x `mini_batches` steps of losses.ppo_loss
    OUT/checkpoint.pt (exact resume), OUT/metrics.jsonl + .csv, OUT/adapter or OUT/model at the end

Conventions follow TRL (GRPOTrainer, PPOTrainer): the completion includes its end token (trained
on, so the policy learns to stop); log-probs are of the tempered distribution (logits /
temperature); GRPO's default is beta 0 (no reference), loss_type "dapo", one iteration; with
num_iterations 1 and one minibatch the old log-probs are the current ones detached (ratio 1);
PPO's KL is k1 per token with kl_coef 0.05, gamma 1, lam 0.95, 4 epochs.

**Reference model**: with LoRA (`lora=True`) it is the base with the adapters disabled
(adapters.lora.adapters_disabled): no second copy of the weights. A full fine-tune that needs one
(beta > 0, PPO, or kl_stop) keeps a frozen copy of the starting weights.

**PPO's value model** is TRL's choice: a separate model (the reward model's architecture: decoder +
scalar head) initialised from the reward model, trained in full alongside the policy by the same
optimizer. When the reward model reads another tokenizer (or rewards come from functions) the
value model starts from the policy's weights with a fresh head instead, since values are per
policy token. Values are read at the position before each completion token (TRL's
`full_value[:, context_length - 1 : -1]`).

A step is one rollout and the updates on it. Exact resume: the prompt order is a function of
(seed, prompts consumed), and the checkpoint keeps the rollout generator's state (every sample's
seed is drawn from it), the trained tensors, the optimizer and the global RNG. `kl_stop`: when the
mean per-token KL (k3, policy vs reference, over a rollout's completion tokens) exceeds it, the run
stops with one line and a non-zero exit, keeping the newest checkpoint whose weights were measured
under the bound (checkpoint.prev.pt takes the place of a newer one that was not).

**Data parallel** (`torchrun --nproc-per-node N -m emergence grpo|ppo ...`, gloo on the CPU,
NCCL on GPUs): a step's P prompts are split into N equal shares; each rank rolls out its share
(drawing the samples one process would: sample_groups' `rows`), scores it and updates on it, and
after every backward the gradients are averaged over the ranks (one all-reduce of them
flattened, what DDP does without its overlap), so the weights stay the same on every rank. As in
TRL under accelerate, each rank normalises its loss over its own rows (`dapo`: over the global
minibatch's tokens), group-relative advantages are the groups' own (`scale_rewards="batch"`: the
std of every rank's rewards), PPO whitens each rank's advantages; the logged reward, length and
KL are over all ranks' samples, the other statistics the mean of the ranks'. Rank 0 writes the
checkpoints (with every rank's RNG state: exact resume on the same number of ranks), metrics and
the result.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import EmergenceError, InvalidArgument
from ..model import Transformer
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer
from . import losses

METHODS = ("grpo", "ppo")
CHECKPOINT_PREV = "checkpoint.prev.pt"


class KLBoundExceeded(EmergenceError):
    """The policy drifted from the reference past --kl-stop."""


# ------------------------------------------------------------------------------ prompts
@dataclass
class Prompt:
    ids: list[int]  # what the policy reads
    text: str  # the rendered prompt text (re-encoded for a reward model with its own tokenizer)
    prompt: object  # as the row gives it: text, messages, or a problem's question (the reward function's)
    row: dict
    where: str


def load_prompts(path: str, tokenizer: Tokenizer, template, block_size: int) -> tuple[list[Prompt], dict]:
    """Rows {"prompt": text | messages} or problem rows {"question", "answer"} -> Prompts, and a
    report (rows, kept, too_long). Message lists are rendered with `template` (a ChatTemplate;
    required for them) and a generation prompt; problem rows too when a template is given, else
    in search.prompt's step-by-step format ("Question: ...\nAnswer step by step.\n"); text
    prompts as they are. Prompts that leave no room in the
    context for a completion are dropped (counted)."""
    from ..chat import encode_prompt, template_variables
    from ..finetune.data import read_jsonl

    rows = read_jsonl(path)
    problems = "prompt" not in rows[0][1] and "question" in rows[0][1]
    if problems:
        from ..problems import load_problems

        rows = [(r["source"], r) for r in load_problems(path)]
    out, too_long = [], 0
    for where, row in rows:
        if problems:
            prompt = row["question"]
            if template is not None:
                text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       **template_variables(tokenizer))
                ids = encode_prompt(tokenizer, text)
            else:  # the step-by-step prompt `emergence search` uses and search-train's policies learn
                from ..search.prompt import format_prompt

                text = format_prompt(prompt)
                ids = tokenizer.encode(text)
        else:
            if "prompt" not in row:
                raise InvalidArgument(f"{where}: a prompt row needs 'prompt' (text or chat messages), or "
                                      "'question' and 'answer' (a problem row)")
            prompt = row["prompt"]
            if isinstance(prompt, str):
                text, ids = prompt, tokenizer.encode(prompt)
            elif isinstance(prompt, list) and prompt:
                from .data import _part

                messages = _part(prompt, "prompt", "user", where)
                if template is None:
                    raise InvalidArgument(f"{where}: a chat prompt needs a chat template: the model has none "
                                          "(give --chat-template)")
                text = template.render(messages, add_generation_prompt=True, **template_variables(tokenizer))
                ids = encode_prompt(tokenizer, text)
            else:
                raise InvalidArgument(f"{where}: 'prompt' must be text or a non-empty list of messages")
        if not ids:
            start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
            if start is None:
                raise InvalidArgument(f"{where}: empty prompt and the tokenizer has neither BOS nor EOS")
            ids = [start]
        if len(ids) >= block_size:
            too_long += 1
            continue
        out.append(Prompt(ids, text, prompt, row, where))
    if not out:
        raise InvalidArgument(f"no usable prompts in {path}: all {len(rows)} leave no room for a completion in the "
                              f"context of {block_size} tokens")
    return out, {"rows": len(rows), "kept": len(out), "too_long": too_long}


# ------------------------------------------------------------------------------ rollouts
@dataclass
class Sample:
    token_ids: list[int]  # the completion, its end token included when it stopped on one
    text: str
    finish_reason: str  # "stop" or "length"
    sampler_logprobs: list[float] | None = None  # the decode step's own log-probs (raw distribution)


def sample_groups(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]], group: int,
                  params: SamplingParams, seed: int, *, backend: str = "auto",
                  stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
                  rows: tuple[int, int] | None = None) -> list[Sample]:
    """`group` samples of every prompt, prompt-major (prompt p's samples at p*group .. p*group+group-1),
    through one DecodeBatch: each prompt is prefilled once and forked into its group (the forks
    share its KV blocks, copied on write), and every step runs all rows in one forward pass
    (the native CPU step where it can run). The tokens of a step are drawn for all rows at once,
    from one generator seeded with `seed` (temperature, top_k, top_p apply; penalties do not),
    one uniform number per live row. With `rows` (first, total), these samples being rows first ..
    of a rollout of `total`, each step draws a number for every row of the rollout, finished or
    not, and a row takes its own: its tokens then depend on the seed and its place alone, so a
    data-parallel rank sampling its share draws what one process sampling the whole would.
    A completion ends with its end token (kept: it is trained on) or at max_new_tokens. A stop
    string that is several tokens (chatml's "<|im_end|>" in a small vocabulary) ends it too, as in
    generate(): its tokens are kept (trained on, so the policy learns to write it) and the text
    stops before it.
    params.logprobs (0 or more) also records each token's log-prob as the decode step computed it
    (the raw distribution)."""
    from ..decode import DecodeBatch, end_ids, new_row
    from ..sampling import choose, process_logits

    config = model.config
    device = model.device
    eos = end_ids(config, tokenizer)
    stops = set(params.stop_token_ids) | set(stop_token_ids) | (set() if params.ignore_eos else eos)
    plain = dataclasses.replace(params, seed=None, logprobs=None, stop=())
    record = params.logprobs is not None
    # a stop string shows in the decoded tail of this many tokens (a token is at least one character)
    tail = max((len(x) for x in stop_strings), default=0) + 2
    out = [Sample([], "", "length", [] if record else None) for _ in range(len(prompts) * group)]
    parents = [new_row(p * group, ids, plain, config, tokenizer, eos, device) for p, ids in enumerate(prompts)]
    live = [r for r in parents if r.max_new > 0]
    if live:
        with torch.no_grad():
            batch = DecodeBatch.for_rows(model, tokenizer, [r for r in live for _ in range(group)], backend=backend)
            batch.admit(live)
            for parent in live:
                if group > 1:
                    batch.fork(parent, [batch.child(parent, tag=parent.tag + g) for g in range(1, group)])
            generator = torch.Generator(device=batch.logits.device).manual_seed(int(seed))
            while batch.rows:
                logits = batch.logits
                if batch.unused is not None:
                    logits[:, batch.unused] = float("-inf")
                uniforms = None
                if rows is not None:  # one number for every row of the rollout; each row takes its own
                    uniforms = torch.rand(rows[1], generator=generator, device=logits.device, dtype=torch.float64)
                    uniforms = uniforms[torch.tensor([rows[0] + row.tag for row in batch.rows], device=logits.device)]
                chosen = choose(process_logits(logits, plain), plain.greedy, generator, uniforms)
                tokens = chosen.tolist()
                logprobs = (logits.log_softmax(-1).gather(1, chosen[:, None])[:, 0].tolist() if record else None)
                finished, going = [], []
                for b, row in enumerate(batch.rows):
                    sample, token = out[row.tag], tokens[b]
                    sample.token_ids.append(token)
                    if record:
                        sample.sampler_logprobs.append(logprobs[b])
                    if token in stops:
                        sample.finish_reason = "stop"
                        finished.append(row)
                    elif stop_strings and _ends_in_stop(tokenizer, sample.token_ids[-tail:], stop_strings):
                        sample.finish_reason = "stop_string"
                        finished.append(row)
                    elif len(sample.token_ids) >= row.max_new:
                        finished.append(row)
                    else:
                        going.append(token)
                batch.remove(finished)
                batch.advance(going)
                if batch.preempted:  # (the cache is sized for every row's budget)
                    raise RuntimeError("a rollout row was preempted")
    for sample in out:
        ids = sample.token_ids[:-1] if sample.finish_reason == "stop" else sample.token_ids
        sample.text = tokenizer.decode(ids)
        if sample.finish_reason == "stop_string":
            sample.text = sample.text[:min(i for i in (sample.text.find(x) for x in stop_strings) if i >= 0)]
            sample.finish_reason = "stop"
    return out


def _ends_in_stop(tokenizer: Tokenizer, tail: list[int], stop_strings: Sequence[str]) -> bool:
    text = tokenizer.decode(tail)
    return any(x in text for x in stop_strings)


@contextmanager
def merged_for_decoding(model: Transformer) -> Iterator[None]:
    """A LoRA policy as a plain model for the block, so that its rollouts run on the native step:
    the active adapter folded into the base weights (LoraLinear.merge) and the plain projections
    put in place; afterwards the LoRA modules are back and the base weights restored bit for bit.
    (Merging holds the unmerged weights of the adapted projections meanwhile.) A model without
    adapters, or whose base is quantized, is left as it is (it decodes eagerly)."""
    from ..adapters.lora import lora_modules, routing

    layers = lora_modules(model)
    name = routing(model).active if layers else None
    if name is None or routing(model).rows is not None or not all(
            isinstance(layer.base, torch.nn.Linear) and layer.merged is None for layer in layers.values()):
        yield
        return
    swapped = []
    try:
        for module_name, layer in layers.items():
            if name in layer.adapters:
                layer.merge(name)
            parent, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, layer.base)
            swapped.append((parent, leaf, layer))
        yield
    finally:
        for parent, leaf, layer in swapped:
            setattr(model.get_submodule(parent), leaf, layer)
            layer.unmerge()


@dataclass
class RolloutBatch:
    """B = P x G sequences, right-padded, and what the updates need of them. The per-token tensors
    cover the window of scored positions: column j is token start + 1 + j of input_ids."""

    prompt_index: list[int]  # (B,) index into the run's prompts
    samples: list[Sample]
    input_ids: torch.Tensor  # (B, L)
    completion_mask: torch.Tensor  # (B, L) bool
    start: int  # first position whose logits are read (the shortest prompt's last token)
    mask: torch.Tensor  # (B, T) bool, T = L - start - 1: completion tokens in the window
    old_logprobs: torch.Tensor | None = None  # (B, T) the sampling policy's
    ref_logprobs: torch.Tensor | None = None  # (B, T)
    values: torch.Tensor | None = None  # (B, T) PPO
    rewards: torch.Tensor | None = None  # (B,) NaN where no reward
    failures: int = 0


def collate(prompts: Sequence[list[int]], samples: Sequence[Sample], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """prompt + completion rows, right-padded: (input_ids, completion_mask, start)."""
    rows = [list(p) + s.token_ids for p, s in zip(prompts, samples)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, len(p):len(r)] = True
    return ids, mask, min(len(p) for p in prompts) - 1


def completion_logps(model: Transformer, input_ids: torch.Tensor, completion_mask: torch.Tensor, start: int,
                     temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """(B, T) log-probs of the completion tokens under `model` (0 elsewhere), teacher-forced: the
    logits from position `start` on, divided by the temperature (TRL's convention)."""
    B = input_ids.shape[0]
    chunk = chunk or B
    out = []
    for i in range(0, B, chunk):
        ids, cmask = input_ids[i:i + chunk], completion_mask[i:i + chunk]
        h = model.hidden_states(ids)[:, start:]
        logits = model.head(h)
        if temperature != 1.0:
            logits = logits / temperature
        out.append(losses.sequence_logps(logits, ids[:, start:], cmask[:, start:]).per_token)
    return torch.cat(out) if len(out) > 1 else out[0]


def value_estimates(value_model, input_ids: torch.Tensor, start: int, chunk: int | None = None) -> torch.Tensor:
    """(B, T) the value model's estimate at the position before each window token."""
    B = input_ids.shape[0]
    chunk = chunk or B
    return torch.cat([value_model.token_scores(input_ids[i:i + chunk])[:, start:-1] for i in range(0, B, chunk)])


# ------------------------------------------------------------------------------- settings
@dataclass
class RLConfig:
    """Everything that decides a GRPO or PPO run (all of it is checkpointed)."""

    method: str  # METHODS
    model: str
    prompts: str
    out: str
    reward: list[str] = field(default_factory=list)  # package.module:function specs, summed
    reward_model: str | None = None
    lora: bool = False
    r: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.0
    targets: str | list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    chat_template: str | None = None
    group: int | None = None  # samples per prompt (default: 8 for GRPO, 1 for PPO)
    prompts_per_step: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mini_batches: int = 1  # optimizer steps per pass over a rollout
    # GRPO
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1
    # PPO
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    # the loop
    kl_stop: float | None = None
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # the rollouts' decode backend
    forward_batch: int = 32  # rows per teacher-forced forward
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"method must be grpo or ppo, got {self.method!r}")
        if self.group is None:
            self.group = 8 if self.method == "grpo" else 1
        if not self.reward and self.reward_model is None:
            raise InvalidArgument(f"{self.method} needs rewards: --reward package.module:function or "
                                  "--reward-model DIR")
        if self.reward and self.reward_model is not None:
            raise InvalidArgument("give --reward or --reward-model, not both")
        for name in ("group", "prompts_per_step", "max_new_tokens", "max_steps", "mini_batches", "num_iterations",
                     "ppo_epochs", "checkpoint_every", "forward_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.method == "grpo" and self.group < 2:
            raise InvalidArgument("GRPO compares the samples of a prompt: --group must be at least 2")
        if (self.prompts_per_step * self.group) % self.mini_batches:
            raise InvalidArgument(f"--mini-batches {self.mini_batches} must divide the {self.prompts_per_step} x "
                                  f"{self.group} samples of a step")
        if not self.lr > 0:
            raise InvalidArgument(f"--lr must be positive, got {self.lr}")
        if self.temperature <= 0:
            raise InvalidArgument(f"--temperature must be positive for sampling, got {self.temperature}")
        if self.kl_stop is not None and not self.kl_stop > 0:
            raise InvalidArgument(f"--kl-stop must be positive, got {self.kl_stop}")
        if self.beta < 0 or self.kl_coef < 0:
            raise InvalidArgument("beta and kl_coef must not be negative")
        losses._check_choice("loss_type", self.loss_type, losses.GRPO_LOSSES)
        losses._check_choice("scale_rewards", self.scale_rewards, losses.SCALE_REWARDS)
        losses._check_choice("kl_estimator", self.kl_estimator, losses.KL_ESTIMATORS)
        SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)  # checks them

    def spec(self):
        from ..adapters.lora import LoraSpec

        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.lora_dropout, targets=self.targets)


# What resuming may change: how far the run goes and how it reports.
RESUME_MAY_CHANGE = {"max_steps", "out", "checkpoint_every", "progress", "kl_stop"}


# ------------------------------------------------------------------------------- the run
class RLRun:
    """A GRPO or PPO run: `step()` does one rollout and its updates; `train()` loops."""

    def __init__(self, cfg: RLConfig, *, resume: bool = False) -> None:
        from ..api import load, require_decoder_only
        from ..store import resolve_model
        from ..train.checkpoint import load_checkpoint
        from ..train.trainer import _init_distributed

        cfg.validate()
        self.cfg, self.out = cfg, Path(cfg.out)
        world = int(os.environ.get("WORLD_SIZE", "1"))  # (checked before any rank waits for the others)
        if cfg.prompts_per_step % world:
            raise InvalidArgument(f"--prompts-per-step {cfg.prompts_per_step} must be a multiple of the "
                                  f"{world} ranks (each rolls out an equal share)")
        self.env, device = _init_distributed(cfg.device)
        self.state = None
        if resume:
            self.state = load_checkpoint(self.out)
            saved = self.state.get("rl_config")
            if saved is None:
                raise InvalidArgument(f"{self.out} holds another kind of run, not a GRPO/PPO one")
            now = asdict(cfg)
            changed = [k for k in now if k not in RESUME_MAY_CHANGE and saved.get(k) != now[k]]
            if changed:
                raise InvalidArgument("cannot resume with different settings: " + ", ".join(
                    f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in changed))
            if self.state.get("world", 1) != self.env.world:
                raise InvalidArgument(f"the run in {self.out} was trained on {self.state.get('world', 1)} rank(s); "
                                      f"resume it on as many (now {self.env.world})")
            if self.state["step"] >= cfg.max_steps:
                raise InvalidArgument(f"the run in {self.out} is finished at step {self.state['step']}; give a larger "
                                      "--max-steps to train it further")
        elif (self.out / "checkpoint.pt").exists():
            raise InvalidArgument(f"{self.out} already holds a run; pass --resume to continue it or choose "
                                  "another --out")

        source = resolve_model(cfg.model)
        lm = load(source, device=str(device), dtype="fp32")
        require_decoder_only(lm.config, f"emergence {cfg.method}")
        self.model, self.tokenizer, self.config = lm.model, lm.tokenizer, lm.config
        self.device = self.model.device
        self.template = self._template(source.path)
        self.prompts, self.prompt_report = load_prompts(cfg.prompts, self.tokenizer, self.template,
                                                        self.config.block_size)
        self.stop_ids, self.stop_strings = self._template_stops()
        self.pad_id = next(t for t in (self.tokenizer.pad_id, self.tokenizer.eos_id, 0) if t is not None)

        # rewards
        self.function_rewards = self.model_rewards = None
        if cfg.reward:
            from .rewards import FunctionRewards

            self.function_rewards = FunctionRewards.load(cfg.reward)
        else:
            from .rewards import ModelRewards

            self.model_rewards = ModelRewards.load(cfg.reward_model, self.tokenizer, self.config.vocab_size)
            self.model_rewards.model.to(self.device)

        # the policy, its reference, PPO's value model
        torch.manual_seed(cfg.seed)
        if cfg.lora:
            from ..adapters.lora import add_adapter, mark_only_adapters_trainable

            add_adapter(self.model, cfg.spec(), generator=torch.Generator().manual_seed(cfg.seed))
            self.trainable = mark_only_adapters_trainable(self.model)
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
            n = sum(p.numel() for p in self.model.parameters())
            self.trainable = (n, n)
        self.needs_ref = cfg.method == "ppo" or cfg.beta != 0.0 or cfg.kl_stop is not None
        self.ref_model = None
        if self.needs_ref and not cfg.lora:
            self.ref_model = copy.deepcopy(self.model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
        self.value_model = None
        if cfg.method == "ppo":
            self.value_model = self._value_model(source).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.value_model is not None:
            params += list(self.value_model.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

        from ..train.trainer import SeededOrder

        self.order = SeededOrder(len(self.prompts), cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step_count, self.cursor = 0, 0
        self.saved_step: int | None = None  # the step of OUT/checkpoint.pt, and of OUT/checkpoint.prev.pt
        self.prev_step: int | None = None
        self.last: RolloutBatch | None = None  # the latest rollout, for inspection
        self.first_loss: float | None = None  # the latest step's first minibatch loss (before any update)
        prompts_hash = hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()[:16]
        self.fingerprint = f"{self.tokenizer.fingerprint()}:{prompts_hash}"
        if self.state is not None:
            self._restore(self.state)

    # ---------------------------------------------------------------- setup helpers
    def _template(self, path: Path):
        from ..chat import find_model_template, resolve_chat_template

        choice = self.cfg.chat_template
        if choice is not None and Path(choice).is_file():
            choice = Path(choice).read_text(encoding="utf-8")
        found = find_model_template(path)
        if choice is None and found is None:
            return None  # chat rows are refused when met
        return resolve_chat_template(found, override=choice)

    def _template_stops(self) -> tuple[list[int], list[str]]:
        """The template's stop strings (<|im_end|>) end a completion too: as a token id where the
        string is one token, else as text."""
        ids, strings = [], []
        for s in (self.template.stop if self.template is not None else ()):
            encoded = self.tokenizer.encode(s, add_bos=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
            else:
                strings.append(s)
        return ids, strings

    def _value_model(self, source):
        """TRL's value model: the reward model's copy; the policy's weights and a fresh head when the
        reward model reads other tokens or there is none."""
        from .reward import RewardModel

        if self.model_rewards is not None and self.model_rewards.same_tokens:
            value = copy.deepcopy(self.model_rewards.model)
        else:
            from ..api import load

            decoder = load(source, device="cpu", dtype="fp32").model
            value = RewardModel(decoder, self.pad_id)
        value.train()
        for p in value.parameters():
            p.requires_grad_(True)
        return value

    def reference(self):
        """(model, context): the reference's log-probs are the model's forward inside the context."""
        if self.cfg.lora:
            from ..adapters.lora import adapters_disabled

            return self.model, adapters_disabled(self.model)
        return self.ref_model, nullcontext()

    # ---------------------------------------------------------------- the rollout
    def params(self, logprobs: int | None = None) -> SamplingParams:
        c = self.cfg
        return SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                              max_new_tokens=c.max_new_tokens, logprobs=logprobs)

    def rollout(self, prompt_index: Sequence[int], seed: int, *, sampler_logprobs: bool = False,
                rows: tuple[int, int] | None = None) -> RolloutBatch:
        """Sample, then score: old / reference log-probs, values (PPO), rewards. rows: see sample_groups."""
        c = self.cfg
        G = c.group
        was_training = self.model.training
        self.model.eval()
        prompts = [self.prompts[i].ids for i in prompt_index]
        with torch.no_grad(), merged_for_decoding(self.model):
            samples = sample_groups(self.model, self.tokenizer, prompts, G,
                                    self.params(0 if sampler_logprobs else None), seed, backend=c.backend,
                                    stop_token_ids=self.stop_ids, stop_strings=self.stop_strings, rows=rows)
        full_prompts = [p for p in prompts for _ in range(G)]
        ids, cmask, start = collate(full_prompts, samples, self.pad_id)
        ids, cmask = ids.to(self.device), cmask.to(self.device)
        batch = RolloutBatch([i for i in prompt_index for _ in range(G)], samples, ids, cmask, start,
                             cmask[:, start + 1:])
        with torch.no_grad():
            # (with one pass and one minibatch GRPO's loss takes the current log-probs detached, as
            # TRL does; these are logged and give the KL to the reference)
            batch.old_logprobs = completion_logps(self.model, ids, cmask, start, c.temperature, c.forward_batch)
            if self.needs_ref:
                ref_model, context = self.reference()
                with context:
                    batch.ref_logprobs = completion_logps(ref_model, ids, cmask, start, c.temperature, c.forward_batch)
            if self.value_model is not None:
                batch.values = value_estimates(self.value_model, ids, start, c.forward_batch)
        batch.rewards, batch.failures = self.score(batch)
        self.model.train(was_training)
        return batch

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
        prompts = [self.prompts[i] for i in batch.prompt_index]
        texts = [s.text for s in batch.samples]
        if self.function_rewards is not None:
            return self.function_rewards([p.prompt for p in prompts], texts, [p.row for p in prompts])
        sequences = [p.ids + s.token_ids for p, s in zip(prompts, batch.samples)]
        return self.model_rewards(sequences, [p.text + t for p, t in zip(prompts, texts)]).to(self.device), 0

    # ---------------------------------------------------------------- the updates
    def _optimizer_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.env.world > 1:  # the ranks' mean gradient, in one all-reduce (a rank's unused tensor: zeros)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= self.env.world
            for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
                p.grad = g
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """values summed over the ranks (themselves in one process)."""
        if self.env.world > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def _all_rows(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's values (the same shape on each), rank after rank along dim 0."""
        if self.env.world == 1:
            return values
        parts = [torch.empty_like(values) for _ in range(self.env.world)]
        dist.all_gather(parts, values.contiguous())
        return torch.cat(parts)

    def _minibatches(self, B: int) -> list[torch.Tensor]:
        M = self.cfg.mini_batches
        order = torch.randperm(B, generator=self.generator) if M > 1 else torch.arange(B)
        return list(order.to(self.device).chunk(M))

    def grpo_update(self, batch: RolloutBatch) -> dict[str, float]:
        c = self.cfg
        rewards = batch.rewards.to(self.device).float()
        if c.scale_rewards == "batch" and self.env.world > 1:  # the std of every rank's rewards
            advantages, stats = losses.grpo_advantages(self._all_rows(rewards), c.group, c.scale_rewards)
            advantages = advantages.chunk(self.env.world)[self.env.rank]
        else:
            advantages, stats = losses.grpo_advantages(rewards, c.group, c.scale_rewards)
        row = {k: float(v) for k, v in stats.items()}
        sums: dict[str, float] = {}
        n = 0
        self.model.train()
        for _ in range(c.num_iterations):
            for mb in self._minibatches(batch.input_ids.shape[0]):
                ids, cmask = batch.input_ids[mb], batch.completion_mask[mb]
                logps = completion_logps(self.model, ids, cmask, batch.start, c.temperature)
                old = batch.old_logprobs[mb] if batch.old_logprobs is not None and (
                    c.num_iterations > 1 or c.mini_batches > 1) else logps.detach()
                loss, st = losses.grpo_loss(
                    logps, old, advantages[mb], batch.mask[mb],
                    ref_logprobs=batch.ref_logprobs[mb] if batch.ref_logprobs is not None else None, beta=c.beta,
                    epsilon_low=c.epsilon, epsilon_high=c.epsilon_high, loss_type=c.loss_type,
                    max_completion_length=c.max_new_tokens, num_items_in_batch=self._dapo_items(batch.mask[mb]))
                if n == 0:
                    self.first_loss = loss.item()
                self._optimizer_step(loss)
                for k, v in {"loss": loss.detach(), **st}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
        row.update({k: v / n for k, v in sums.items() if k != "kl"})
        if "kl" in sums:
            row["kl_loss"] = sums["kl"] / n  # the loss's KL term, during the updates
        return row

    def _dapo_items(self, mask: torch.Tensor) -> torch.Tensor | None:
        """dapo's normaliser under data parallelism: the minibatch's completion tokens over every
        rank, per rank (TRL's num_items_in_batch / num_processes), so the averaged gradient is the
        token mean of the global minibatch. None (this minibatch's own count) in one process."""
        if self.cfg.loss_type != "dapo" or self.env.world == 1:
            return None
        return self._all_sum(mask.sum().float()) / self.env.world

    def ppo_rollout(self, batch: RolloutBatch) -> losses.PPORollout:
        c = self.cfg
        scores = torch.nan_to_num(batch.rewards.to(self.device), nan=0.0)
        if c.missing_eos_penalty is not None:
            no_eos = torch.tensor([s.finish_reason != "stop" for s in batch.samples], device=self.device)
            scores = scores - c.missing_eos_penalty * no_eos
        return losses.ppo_advantages(batch.old_logprobs, batch.ref_logprobs, batch.values, scores, batch.mask,
                                     kl_coef=c.kl_coef, kl_estimator=c.kl_estimator, gamma=c.gamma, lam=c.lam,
                                     whiten_rewards=c.whiten_rewards)

    def ppo_update(self, batch: RolloutBatch, rollout: losses.PPORollout | None = None,
                   epochs: int | None = None) -> dict[str, float]:
        """PPO's epochs on one rollout; the row holds the means over every minibatch and, per epoch,
        `loss/value` of the last one (`value_loss_by_epoch`)."""
        c = self.cfg
        rollout = rollout if rollout is not None else self.ppo_rollout(batch)
        row = {k: float(v) for k, v in rollout.stats.items()}
        sums: dict[str, float] = {}
        n = 0
        by_epoch = []
        self.model.train()
        self.value_model.train()
        for _ in range(epochs or c.ppo_epochs):
            epoch_value = []
            for mb in self._minibatches(batch.input_ids.shape[0]):
                ids, cmask = batch.input_ids[mb], batch.completion_mask[mb]
                logps = completion_logps(self.model, ids, cmask, batch.start, c.temperature)
                vpred = value_estimates(self.value_model, ids, batch.start)
                loss, st = losses.ppo_loss(logps, batch.old_logprobs[mb], rollout.advantages[mb], vpred,
                                           rollout.values[mb], rollout.returns[mb], batch.mask[mb],
                                           cliprange=c.cliprange, cliprange_value=c.cliprange_value,
                                           vf_coef=c.vf_coef)
                if n == 0:
                    self.first_loss = loss.item()
                self._optimizer_step(loss)
                for k, v in {"loss": loss.detach(), **st}.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                epoch_value.append(float(st["loss/value"]))
                n += 1
            by_epoch.append(sum(epoch_value) / len(epoch_value))
        row.update({k: v / n for k, v in sums.items()})
        row["value_loss_by_epoch"] = by_epoch
        return row

    # ---------------------------------------------------------------- one step
    def next_prompts(self) -> tuple[list[int], int]:
        """The next step's prompt indices and sampling seed (drawn from the run's generator)."""
        P = self.cfg.prompts_per_step
        index = [self.order[i] for i in range(self.cursor, self.cursor + P)]
        return index, int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def step(self) -> dict:
        """One rollout and its updates; returns the step's metrics row. Raises KLBoundExceeded
        (before any update) when the rollout's KL exceeds kl_stop."""
        c, env = self.cfg, self.env
        started = time.perf_counter()
        index, seed = self.next_prompts()
        share = len(index) // env.world  # this rank's prompts: their samples are what one process would draw
        batch = self.rollout(index[env.rank * share:(env.rank + 1) * share], seed,
                             rows=(env.rank * share * c.group, len(index) * c.group))  # (in one process too)
        self.last = batch
        rollout_s = time.perf_counter() - started
        lengths = torch.tensor([len(s.token_ids) for s in batch.samples], dtype=torch.float32)
        stopped = torch.tensor([s.finish_reason == "stop" for s in batch.samples], dtype=torch.float32)
        # every rank's samples: rewards, lengths and stops (the same count on each rank)
        rewards, lengths, stopped = self._all_rows(
            torch.stack([batch.rewards.float().to(self.device), lengths.to(self.device), stopped.to(self.device)], 1)
        ).cpu().unbind(1)
        counts = self._all_sum(torch.tensor([float(batch.failures), rollout_s], device=self.device))
        tokens = int(lengths.sum())
        row = {"step": self.step_count + 1, "reward": float(torch.nanmean(rewards)),
               "reward_std": float(losses._nanstd(rewards)) if rewards.numel() > 1 else 0.0,
               "reward_failures": int(counts[0]), "completion_length": float(lengths.mean()),
               "completions_stopped": float(stopped.mean()),
               "rollout_tokens": tokens, "rollout_tok_s": tokens / max(float(counts[1]) / env.world, 1e-9)}
        if batch.ref_logprobs is not None:  # the mean per-token KL over every rank's completion tokens
            kl = losses.kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k3")
            total, count = self._all_sum(torch.stack([(kl * batch.mask).sum(), batch.mask.sum().float()]))
            row["kl"] = float(total / count.clamp(min=1))
            if c.kl_stop is not None and row["kl"] > c.kl_stop:
                raise KLBoundExceeded(self._kl_stop(row["kl"]))
        update = self.grpo_update(batch) if c.method == "grpo" else self.ppo_update(batch)
        update.pop("value_loss_by_epoch", None)
        if env.world > 1:  # the update's statistics: the mean of the ranks'
            names = [k for k in update if k not in row]
            means = self._all_sum(torch.tensor([float(update[k]) for k in names], dtype=torch.float64,
                                               device=self.device)) / env.world
            update.update(zip(names, means.tolist()))
        row.update({k: v for k, v in update.items() if k not in row or env.world == 1})
        self.step_count += 1
        self.cursor += c.prompts_per_step
        row["step_s"] = time.perf_counter() - started
        return row

    def _kl_stop(self, kl: float) -> str:
        """Put the newest checkpoint measured under the bound in place; the message to stop with."""
        from ..train.checkpoint import CHECKPOINT

        path, prev = self.out / CHECKPOINT, self.out / CHECKPOINT_PREV
        good = self.saved_step
        if good is not None and good >= self.step_count:  # the weights just measured: not good
            if self.prev_step is not None:
                if self.env.main and prev.exists():
                    os.replace(prev, path)
                good = self.prev_step
            else:
                if self.env.main:
                    path.unlink(missing_ok=True)
                good = None
        kept = (f"the last good checkpoint (step {good}) is kept in {self.out}" if good is not None
                else "no checkpoint was written under the bound")
        return (f"KL {kl:.4g} exceeds --kl-stop {self.cfg.kl_stop:g} at step {self.step_count + 1}: the run "
                f"stops; {kept}")

    # ---------------------------------------------------------------- checkpoints
    def trained_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if self.cfg.lora:
            state = {k: v for k, v in state.items() if ".adapters." in k}
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def save_checkpoint(self) -> None:
        """OUT/checkpoint.pt, written by rank 0 (with every rank's global RNG state); with kl_stop
        the one before it is kept as OUT/checkpoint.prev.pt."""
        from ..train.checkpoint import CHECKPOINT, save_checkpoint

        rng = {"rollout": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.env.world > 1:
            states = [None] * self.env.world
            dist.all_gather_object(states, torch.get_rng_state())
            rng["torch_by_rank"] = states
        keep_prev = self.cfg.kl_stop is not None and self.saved_step is not None  # (its file exists then)
        if self.env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            path = self.out / CHECKPOINT
            if keep_prev:
                tmp = self.out / (CHECKPOINT_PREV + ".tmp")  # keep the previous one (a hard link: no copy)
                tmp.unlink(missing_ok=True)
                try:
                    os.link(path, tmp)
                except OSError:
                    import shutil

                    shutil.copyfile(path, tmp)
                os.replace(tmp, self.out / CHECKPOINT_PREV)
            state = {"step": self.step_count, "cursor": self.cursor, "model": self.trained_state(),
                     "optimizer": self.optimizer.state_dict(), "rng": rng, "world": self.env.world,
                     "rl_config": asdict(self.cfg), "tokenizer_hash": self.fingerprint,
                     "prev_step": self.saved_step if keep_prev else self.prev_step}
            if self.value_model is not None:
                state["value_model"] = {k: v.detach().cpu().clone() for k, v in self.value_model.state_dict().items()}
            save_checkpoint(state, self.out)
        if keep_prev:
            self.prev_step = self.saved_step
        self.saved_step = self.step_count
        if self.env.world > 1:
            dist.barrier()  # every rank goes on once rank 0 has written it

    def _restore(self, state: dict) -> None:
        if state.get("tokenizer_hash") != self.fingerprint:
            raise InvalidArgument(f"the run in {self.out} used another tokenizer or prompts file "
                                  f"({state.get('tokenizer_hash')}, now {self.fingerprint})")
        self.model.load_state_dict(state["model"], strict=not self.cfg.lora)
        if self.value_model is not None:
            self.value_model.load_state_dict(state["value_model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["rng"]["rollout"])
        torch.set_rng_state(state["rng"].get("torch_by_rank", [state["rng"]["torch"]])[self.env.rank])
        self.step_count, self.cursor = state["step"], state["cursor"]
        self.saved_step, self.prev_step = state["step"], state.get("prev_step")

    def result_folder(self) -> Path:
        return self.out / ("adapter" if self.cfg.lora else "model")

    def save_result(self) -> Path:
        """OUT/adapter (PEFT) or OUT/model (HF layout), and OUT/value_model for PPO."""
        folder = self.result_folder()
        if self.cfg.lora:
            from ..adapters.peft_format import save_adapter

            save_adapter(self.model, folder, base=self.cfg.model)
        else:
            from ..weights.hf import save_hf

            save_hf(self.model, folder)
            self.tokenizer.save(folder)
        if self.template is not None:
            (folder / "chat_template.jinja").write_text(self.template.source, encoding="utf-8")
        if self.value_model is not None:
            from .reward import save_reward_model

            save_reward_model(self.value_model, self.out / "value_model")
        return folder

    def describe(self) -> str:
        c, (trainable, total) = self.cfg, self.trainable
        how = f"LoRA r={c.r} alpha={c.alpha:g}" if c.lora else "full weights"
        rewards = f"reward model {c.reward_model}" if c.reward_model else f"reward {', '.join(c.reward)}"
        dropped = f", {self.prompt_report['too_long']} too long dropped" if self.prompt_report["too_long"] else ""
        return (f"{c.method}: {how}, {trainable:,} of {total:,} parameters trainable; {len(self.prompts)} prompts"
                f"{dropped}; {c.prompts_per_step} prompts x {c.group} samples a step, up to {c.max_new_tokens} "
                f"tokens; {rewards}")

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        """Steps until max_steps: checkpoints, metrics, the progress line; the result at the end."""
        from ..progress import Progress

        c, main = self.cfg, self.env.main
        metrics = _Metrics(self.out, self.step_count if self.state is not None else None, c.method) if main else None
        if c.progress and main:
            print(self.describe() + (f", {self.env.world} ranks" if self.env.world > 1 else ""), flush=True)
        progress = Progress(c.max_steps - self.step_count, "steps", desc=c.method, enabled=c.progress and main)
        started = time.perf_counter()
        first = last = None
        while self.step_count < c.max_steps:
            try:
                row = self.step()
            except KLBoundExceeded:
                progress.close()
                raise
            row["elapsed_s"] = time.perf_counter() - started
            if metrics is not None:
                metrics.write(row)
            first = row if first is None else first
            last = row
            progress.update(1, reward=row["reward"], **({"kl": row["kl"]} if "kl" in row else {}),
                            **{"tok/s": f"{row['rollout_tok_s']:.0f}"})
            if self.step_count % c.checkpoint_every == 0 or self.step_count == c.max_steps:
                self.save_checkpoint()
        progress.close()
        folder = self.save_result() if main else self.result_folder()
        if self.env.world > 1:
            dist.barrier()  # the result is written before any rank returns
        if c.progress and main and last is not None:
            print(f"done: step {self.step_count}, reward {first['reward']:.4f} (first step of this call) -> "
                  f"{last['reward']:.4f}; {'adapter' if c.lora else 'model'} saved to {folder}", flush=True)
        return {"step": self.step_count, "folder": folder, "first": first, "last": last}


class _Metrics:
    """OUT/metrics.jsonl (every value of every step) and OUT/metrics.csv (the main columns). On
    resume the rows after the checkpoint's step are dropped first."""

    COMMON = ("step", "reward", "reward_std", "reward_failures", "kl", "loss", "completion_length",
              "completions_stopped", "rollout_tok_s", "step_s", "elapsed_s")
    GRPO = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "frac_reward_zero_std", "kl_loss")
    PPO = ("objective/kl", "objective/scores", "objective/rlhf_reward", "loss/policy", "loss/value",
           "policy/clipfrac", "val/clipfrac", "policy/approxkl")

    def __init__(self, out: Path, resumed_at: int | None, method: str) -> None:
        from ..train.trainer import _rows_up_to

        out.mkdir(parents=True, exist_ok=True)
        self.columns = self.COMMON + (self.GRPO if method == "grpo" else self.PPO)
        self.jsonl, self.csv = out / "metrics.jsonl", out / "metrics.csv"
        rows = _rows_up_to(self.jsonl, resumed_at) if resumed_at is not None else []
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.columns} for r in rows)

    def write(self, row: dict) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: row.get(k, "") for k in self.columns})


def train_rl(cfg: RLConfig, *, resume: bool = False) -> dict:
    """Run (or, with resume, continue) the GRPO / PPO run `cfg` describes (on every rank under torchrun)."""
    from ..train.trainer import _end_distributed

    run = RLRun(cfg, resume=resume)
    try:
        return run.train()
    finally:
        _end_distributed(run.env)


def rl_settings() -> set[str]:
    return {f.name for f in dataclasses.fields(RLConfig)}


__all__ = ["KLBoundExceeded", "Prompt", "RLConfig", "RLRun", "RolloutBatch", "Sample", "collate", "completion_logps",
           "load_prompts", "sample_groups", "train_rl"]


# --------------------------------------------------------------------------- command line
# flag -> (RLConfig field, type, help); a flag left out keeps the default (or, with --resume, the run's)
_FLAGS = {
    "group": (int, "samples per prompt (default 8 for grpo, 1 for ppo)"),
    "prompts_per_step": (int, "prompts per rollout (default 4)"),
    "max_new_tokens": (int, "longest completion (default 64)"),
    "temperature": (float, "sampling temperature (default 1.0)"), "top_p": (float, "(default 1.0)"),
    "top_k": (int, "0 = off (default)"), "max_steps": (int, "rollouts, each followed by its updates (default 100)"),
    "lr": (float, "learning rate (default 1e-5)"), "weight_decay": (float, "AdamW decay (default 0)"),
    "grad_clip": (float, "max grad norm, 0 = off (default 1.0)"),
    "mini_batches": (int, "optimizer steps per pass over a rollout (default 1)"),
    "r": (int, "LoRA rank (default 8)"), "alpha": (float, "LoRA alpha (default 16)"),
    "lora_dropout": (float, "(default 0)"), "chat_template": (str, "built-in name, Jinja file or text"),
    "kl_stop": (float, "stop when the mean per-token KL to the reference exceeds this (last good checkpoint kept)"),
    "checkpoint_every": (int, "steps between checkpoints (default 10)"), "seed": (int, "(default 0)"),
    "device": (str, "cpu (default) or cuda"), "backend": (str, "rollout decode backend: auto, native or eager"),
    "forward_batch": (int, "rows per teacher-forced forward (default 32)"),
}
_GRPO_FLAGS = {
    "beta": (float, "KL coefficient to the reference (default 0: none)"),
    "epsilon": (float, "clip range, low side (default 0.2)"), "epsilon_high": (float, "clip range, high side"),
    "loss_type": (str, "grpo, bnpo, dr_grpo or dapo (default)"), "scale_rewards": (str, "group (default), batch, none"),
    "num_iterations": (int, "optimisation passes per rollout (mu, default 1)"),
}
_PPO_FLAGS = {
    "kl_coef": (float, "per-token KL penalty (default 0.05)"), "kl_estimator": (str, "k1 (default) or k3"),
    "cliprange": (float, "(default 0.2)"), "cliprange_value": (float, "(default 0.2)"),
    "vf_coef": (float, "value loss weight (default 0.1)"), "gamma": (float, "(default 1.0)"),
    "lam": (float, "GAE lambda (default 0.95)"), "ppo_epochs": (int, "(default 4)"),
    "missing_eos_penalty": (float, "subtracted from the score of a completion that did not stop"),
}


def add_arguments(p, method: str) -> None:
    """The flags of `emergence grpo` / `emergence ppo`."""
    p.description = (f"{method.upper()} on MODEL: prompts from a JSONL file ({{\"prompt\": text or messages}} or "
                     "problem rows {question, answer}), rewards from Python functions (--reward pkg.mod:fn, "
                     "called with prompt, completion and row; emergence.align.rewards:exact_answer for problems) "
                     "or a reward model (--reward-model DIR).")
    p.add_argument("model", metavar="MODEL", help="folder, GGUF file, store name or packaged model")
    p.add_argument("--prompts", required=True, metavar="FILE.jsonl")
    p.add_argument("--reward", action="append", default=None, metavar="PKG.MOD:FN",
                   help="a reward function (repeatable: summed); or file.py:fn")
    p.add_argument("--reward-model", default=None, metavar="DIR", help="a *ForSequenceClassification folder")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: checkpoint, metrics, OUT/adapter or OUT/model")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (the reference: the adapter disabled)")
    p.add_argument("--target", default=None, metavar="NAMES", help="LoRA targets: q,k,v,o,gate,up,down or all-linear")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no live progress line")
    if method == "ppo":
        p.add_argument("--whiten-rewards", action="store_true", default=None)
    for name, (kind, help_) in {**_FLAGS, **(_GRPO_FLAGS if method == "grpo" else _PPO_FLAGS)}.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_)


def run_command(args) -> None:
    """`emergence grpo|ppo MODEL --prompts F --reward M:F | --reward-model DIR --out DIR [...]`."""
    method = args.command
    given = {name: getattr(args, name) for name in (*_FLAGS, *_GRPO_FLAGS, *_PPO_FLAGS, "whiten_rewards")
             if getattr(args, name, None) is not None}
    if args.target is not None:
        given["targets"] = args.target if args.target == "all-linear" else [
            t.strip() for t in args.target.split(",") if t.strip()]
    if args.no_progress:
        given["progress"] = False
    settings = {"method": method, "model": args.model, "prompts": args.prompts, "out": args.out,
                "reward": args.reward or [], "reward_model": args.reward_model, "lora": args.lora}
    if args.resume:
        from ..train.checkpoint import load_checkpoint

        saved = dict(load_checkpoint(Path(args.out)).get("rl_config") or {})
        settings = {**saved, **{k: v for k, v in settings.items() if v not in (None, [], False)}, "out": args.out}
    settings.update(given)
    result = train_rl(RLConfig(**settings), resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:  # (under torchrun, once)
        print(f"{'adapter' if settings.get('lora') else 'model'}: {result['folder']}")
