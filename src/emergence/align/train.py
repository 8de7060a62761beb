"""Reward models and DPO through the one training loop (`train.trainer.run_loop`).

    JSONL preference rows (data.py) -> pairs (identical ones skipped, over-long ones dropped) -> held-out split
    MODEL -> [LoRA / DoRA] -> reward model: RewardModel (decoder + score head), reward_model_loss
                                            -> OUT/model, transformers' *ForSequenceClassification layout
                           -> DPO: the policy, against reference log-probs computed once and cached
                                   (OUT/reference_logps.safetensors), dpo_loss (sigmoid or ipo)
                                            -> OUT/model (full) or OUT/adapter (a PEFT folder)

The loop is pretraining's and fine-tuning's: atomic checkpoints with exact resume, the progress
line, metrics CSV/JSONL (the losses' stats as TRL names them, every step and as val_<name> at
each evaluation on the held-out pairs), DDP/FSDP2, bf16 autocast, torch.compile. A run here
brings its own batches (pairs, chosen rows first) and its own loss (`loss(model, batch)`).

**The reference model.** DPO's reference is the model the policy starts from. Its log-probs of
every pair (training and held-out) are computed once, before the first step, from the base
weights as loaded: with LoRA the policy itself with its adapters turned off (`adapters_disabled`,
bit for bit the base), with full fine-tuning the policy before it has trained. So neither method
ever holds a second copy of the weights. The file is keyed by a hash of the base weights, the
tokenized pairs and the precision (bf16 or fp32): a resumed run reuses it, a changed input
recomputes it.

**The reward model** is the decoder with a scalar head on each row's last non-padding token
(align/reward.py). The head always trains in full; the decoder in full or through LoRA/DoRA,
whose adapters are merged into the decoder when the model is saved, so OUT/model is a plain
*ForSequenceClassification folder (with the tokenizer and the chat template) that transformers
loads as is. Padding is the tokenizer's pad token, else its EOS: then a completion's closing EOS
reads as padding and the score sits on the token before it, in training and in transformers alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch

from ..adapters.lora import (LoraSpec, add_adapter, adapters_disabled, mark_only_adapters_trainable,
                             merge_and_unload)
from ..chat import ChatTemplate
from ..errors import InvalidArgument
from ..finetune.data import read_jsonl, split_held_out
from ..finetune.run import _Count, check_run_settings, load_template, save_trained, trained_state
from ..model import Transformer, empty_model
from ..sampling import SamplingParams
from ..train.trainer import (SeededOrder, TrainConfig, TrainResult, _check_same_run, _Dist, _end_distributed,
                             _init_distributed, run_loop)
from .data import KEYS, PreferencePair, collate, load_pairs
from .losses import DPO_LOSSES, dpo_loss, reward_model_loss, sequence_logps
from .reward import RewardModel, save_reward_model

METHODS = ("full", "lora", "dora")
REFERENCE_FILE = "reference_logps.safetensors"
REWARD_STATS = ("accuracy", "margin", "chosen_reward", "rejected_reward", "min_reward", "mean_reward", "max_reward")
DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


@dataclass
class PreferenceConfig:
    """What to train on which pairs, and how (the loop's own settings are a TrainConfig). The
    reward-model and DPO settings sit side by side; each run reads its own."""

    model: str
    data: list[str]
    method: str = "full"  # METHODS
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False
    chat_template: str | None = None  # built-in name, Jinja file or text; default: the model's own
    val_fraction: float = 0.05
    epochs: float = 1.0  # passes over the training pairs, when the TrainConfig's max_steps is 0
    center_rewards_coefficient: float | None = None  # reward model: pull the rewards towards 0
    beta: float = 0.1  # DPO
    loss_type: str = "sigmoid"  # DPO: losses.DPO_LOSSES
    label_smoothing: float = 0.0  # DPO sigmoid: conservative DPO's eps

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"unknown training method {self.method!r}; use {', '.join(METHODS)}")
        if not self.data:
            raise InvalidArgument("give --data FILE.jsonl (one or more files of {prompt, chosen, rejected} rows)")
        check_run_settings(self)
        if self.loss_type not in DPO_LOSSES:
            raise InvalidArgument(f"--loss must be one of {', '.join(DPO_LOSSES)}, got {self.loss_type!r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise InvalidArgument(f"--beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise InvalidArgument(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type == "ipo":
            raise InvalidArgument("the ipo loss takes no --label-smoothing")
        if self.center_rewards_coefficient is not None and not self.center_rewards_coefficient >= 0:
            raise InvalidArgument(f"--center-rewards must not be negative, got {self.center_rewards_coefficient}")

    def spec(self) -> LoraSpec:
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets, rslora=self.rslora,
                        dora=self.method == "dora")


# ------------------------------------------------------------------------------ batches
class PairBatch(NamedTuple):
    input_ids: torch.Tensor  # (2B, L): the B chosen rows, then the B rejected rows, right-padded
    completion_mask: torch.Tensor  # (2B, L) bool
    margin: torch.Tensor | None  # (B,) float32, when the rows have margins
    ref_chosen: torch.Tensor | None  # (B,) DPO: the reference's summed completion log-probs
    ref_rejected: torch.Tensor | None


class PairBatches:
    """Training pairs in a seeded order by sample number (exact resume, any rank), held-out pairs by
    index: what the loop's `batches` must answer. `reference` ((N,) chosen, (N,) rejected over the
    training pairs then the held-out ones) rides along in DPO's batches."""

    def __init__(self, train: list[PreferencePair], val: list[PreferencePair], tc: TrainConfig, pad_id: int) -> None:
        self.pairs, self.n_train, self.tc, self.pad_id = train + val, len(train), tc, pad_id
        self.order = SeededOrder(len(train), tc.seed)
        self.val = _Count(len(val)) if val else None
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def _batch(self, indices: list[int]) -> PairBatch:
        batch = collate([self.pairs[i] for i in indices], self.pad_id)
        ref = (None, None) if self.reference is None else (self.reference[0][indices], self.reference[1][indices])
        return PairBatch(*batch, *ref)

    def train_batch(self, first: int) -> PairBatch:
        return self._batch([self.order[i] for i in range(first, first + self.tc.batch_size)])

    def eval_batch(self, ids) -> PairBatch:
        return self._batch([self.n_train + int(i) for i in ids])


# -------------------------------------------------------------------- reference log-probs
@torch.no_grad()
def reference_logps(model: Transformer, pairs: list[PreferencePair], pad_id: int, batch_size: int,
                    device: torch.device, autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) summed completion log-probs of each pair's chosen and rejected rows under `model` as it
    is (call it inside `adapters_disabled` for a LoRA policy's reference), in batches of
    `batch_size` pairs, float32 on the CPU."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = collate(pairs[i:i + batch_size], pad_id)
        ids, mask = chunk.input_ids.to(device), chunk.completion_mask.to(device)
        with autocast or nullcontext():
            total = sequence_logps(model(ids), ids, mask).total.float().cpu()
        n = len(total) // 2
        chosen.append(total[:n])
        rejected.append(total[n:])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def reference_key(model: torch.nn.Module, pairs: list[PreferencePair], bf16: bool) -> str:
    """What the reference log-probs depend on, hashed: the base weights, every pair's ids and
    masks in order, and the precision."""
    digest = hashlib.sha256(f"emergence dpo reference v1 {'bf16' if bf16 else 'fp32'}".encode())
    for name, t in sorted(model.state_dict().items()):
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for pair in pairs:
        for ex in (pair.chosen, pair.rejected):
            digest.update(json.dumps([ex.ids, ex.mask]).encode())
    return digest.hexdigest()


def read_reference(path: Path, key: str, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached log-probs when `path` holds those of `key` (count pairs), else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            chosen, rejected = f.get_tensor("chosen"), f.get_tensor("rejected")
    except Exception:  # missing, cut short, not a safetensors file: computed again
        return None
    return (chosen, rejected) if chosen.shape == rejected.shape == (count,) else None


def write_reference(path: Path, key: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp),
              metadata={"key": key, "pairs": str(len(chosen))})
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the runs
class _PreferenceRun:
    """What the two preference runs share: pairs, held-out split, resume checks, adapters, the
    save of the template and data report (see train.trainer.PretrainRun for the protocol)."""

    kind = ""
    metric_columns: tuple[str, ...] = ()
    summary_stats: tuple[str, ...] = ()

    def __init__(self, pc: PreferenceConfig, tc: TrainConfig, env: _Dist, resume: bool) -> None:
        from ..api import load, require_decoder_only
        from ..store import resolve_model
        from ..train.checkpoint import load_checkpoint

        pc.validate()
        self.pc, self.tc, self.env = pc, tc, env
        out = Path(tc.out)
        self.state = None
        if resume:
            self.state = load_checkpoint(out)
            saved, now = self.state.get("align_config"), asdict(pc)
            if saved is None or self.state.get("align_kind") != self.kind:
                what = self.state.get("align_kind") or ("fine-tuning" if "finetune_config" in self.state
                                                        else "pretraining")
                raise InvalidArgument(f"{out} holds a {what} run, not a {self.kind} one")
            if saved != now:
                changed = ", ".join(f"{k} was {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v)
                raise InvalidArgument(f"cannot resume the run in {out} with different {self.kind} settings: {changed}")
        elif (out / "checkpoint.pt").exists():
            raise InvalidArgument(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        source = resolve_model(pc.model)
        self.lm = load(source, device="cpu", dtype="fp32")
        require_decoder_only(self.lm.config, f"emergence {self.kind}")
        self.config, self.tokenizer = self.lm.config, self.lm.tokenizer
        # A template only where a row is in chat form: text rows need none (a base model has none).
        chat = pc.chat_template is not None or any(
            k in row and not isinstance(row[k], str) for path in pc.data for _, row in read_jsonl(path) for k in KEYS)
        self.template = load_template(source.path, pc.chat_template) if chat else None
        self.max_length = tc.context or self.config.block_size
        if self.max_length > self.config.block_size:
            raise InvalidArgument(f"context {self.max_length} exceeds the model's block_size {self.config.block_size}")
        pairs, self.report = load_pairs(pc.data, self.tokenizer, self.template or ChatTemplate.builtin("plain"),
                                        max_length=self.max_length)
        with_margin = [p.margin is not None for p in pairs]
        if any(with_margin) and not all(with_margin):
            bare = pairs[with_margin.index(False)]
            raise InvalidArgument(f"{bare.where}: this row has no 'margin' but others have one: give every row a "
                                  "margin, or none")
        self.train_pairs, self.val_pairs = split_held_out(pairs, pc.val_fraction, tc.seed)
        self.report["held_out"] = len(self.val_pairs)
        self.pad_id = self._pad_id()
        self.batches = PairBatches(self.train_pairs, self.val_pairs, tc, self.pad_id)
        # tokens per step are counted as pairs x this (chosen + rejected; an upper bound)
        self.context = max(len(p.chosen.ids) + len(p.rejected.ids) for p in self.train_pairs)
        if tc.max_steps == 0:  # --epochs decides
            pairs_per_step = tc.batch_size * env.world * tc.grad_accum
            tc.max_steps = max(1, math.ceil(pc.epochs * len(self.train_pairs) / pairs_per_step))
        self.fingerprint = f"{self.tokenizer.fingerprint()}:{self._data_hash()}"
        if self.state is not None:
            if self.state.get("tokenizer_hash") != self.fingerprint:
                raise InvalidArgument(f"the run in {out} was trained on other data (or another tokenizer): "
                                      f"{', '.join(pc.data)} changed since it started")
            _check_same_run(TrainConfig(**self.state["train_config"]), tc)
            if self.state["step"] >= tc.max_steps:
                raise InvalidArgument(f"the run in {out} is finished at step {self.state['step']}; give a larger "
                                      "--max-steps to train it further")
        self.checkpoint_extra = {"align_config": asdict(pc), "align_kind": self.kind}
        self.trainable = (0, 0)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
        if pad is None:
            raise InvalidArgument("this tokenizer has neither a pad nor an EOS token to pad the rows with")
        return pad

    def _data_hash(self) -> str:
        digest = hashlib.sha256()
        for path in self.pc.data:
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()[:16]

    def _adapt(self, decoder: Transformer) -> None:
        """Adapters on the decoder (only they train), or every weight trainable."""
        if self.pc.method == "full":
            for p in decoder.parameters():
                p.requires_grad_(True)
            n = sum(p.numel() for p in decoder.parameters())
            self.trainable = (n, n)
        else:
            add_adapter(decoder, self.pc.spec(), generator=torch.Generator().manual_seed(self.tc.seed))
            self.trainable = mark_only_adapters_trainable(decoder)

    def _how(self) -> str:
        pc = self.pc
        return "full" if pc.method == "full" else (f"{'DoRA' if pc.method == 'dora' else 'LoRA'} r={pc.r} "
                                                    f"alpha={pc.alpha:g}{' (rsLoRA)' if pc.rslora else ''}")

    def describe(self, model: torch.nn.Module) -> str:
        (trainable, total), rep = self.trainable, self.report
        skipped = "".join(f", {rep[k]} {what}" for k, what in (
            ("identical", "with chosen == rejected skipped"),
            ("too_long", f"longer than {self.max_length} tokens dropped")) if rep[k])
        return (f"{self.kind}: {self._how()}, {trainable:,} of {total:,} parameters trainable "
                f"({100 * trainable / total:.2f}%), {rep['rows']} rows{skipped}: {len(self.train_pairs)} pairs to "
                f"train on, {len(self.val_pairs)} held out")

    def _save_extras(self, folder: Path) -> None:
        if self.template is not None:
            (folder / "chat_template.jinja").write_text(self.template.source, encoding="utf-8")
        (folder / "preference_data.json").write_text(json.dumps(self.report, indent=2) + "\n")


class RewardModelRun(_PreferenceRun):
    """A reward model: the decoder with a scalar head, trained on the Bradley-Terry loss."""

    kind = "reward-model"
    metric_columns = REWARD_STATS
    summary_stats = ("accuracy",)

    def __init__(self, pc: PreferenceConfig, tc: TrainConfig, env: _Dist, resume: bool) -> None:
        super().__init__(pc, tc, env, resume)
        self.result_folder = "model"

    def _pad_id(self) -> int:  # the reward model's own padding rule (its config's, else the tokenizer's)
        pad = self.config.pad_token_id
        return super()._pad_id() if pad is None else pad

    def build_model(self, device: torch.device, bf16: bool) -> RewardModel:
        torch.manual_seed(self.tc.seed)  # the score head's initialisation and adapter dropout draw from it
        model = RewardModel(self.lm.model.float(), self.pad_id)
        self._adapt(model.decoder)
        model.score.weight.requires_grad_(True)  # the head trains in full, adapters or not
        n = model.score.weight.numel()
        self.trainable = (self.trainable[0] + n, self.trainable[1] + n)
        return model.to(device)

    def describe(self, model: torch.nn.Module) -> str:
        coef = self.pc.center_rewards_coefficient
        margins = ", margins from the rows" if self.train_pairs[0].margin is not None else ""
        return super().describe(model) + margins + (f", rewards centred (coefficient {coef:g})" if coef else "")

    def loss(self, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = model(batch.input_ids).float().chunk(2)
        return reward_model_loss(chosen, rejected, batch.margin, self.pc.center_rewards_coefficient)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module) -> str:
        """The rewards of the first held-out pairs (chosen vs rejected)."""
        pairs = self.val_pairs[:2] or self.train_pairs[:2]
        batch = collate(pairs, self.pad_id)
        was_training = model.training
        model.eval()
        rewards = model(batch.input_ids.to(model.score.weight.device)).float().cpu()
        model.train(was_training)
        n = len(pairs)
        return " | ".join(f"{p.where}: chosen {c:.3f} vs rejected {r:.3f}"
                          for p, c, r in zip(pairs, rewards[:n].tolist(), rewards[n:].tolist()))

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pc.method == "full":
            return state
        return {k: v for k, v in state.items() if ".adapters." in k or k.startswith("score.")}

    def save(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        """The HF *ForSequenceClassification folder; adapters are merged into the decoder first."""
        model = RewardModel(empty_model(self.config), self.pad_id)
        if self.pc.method != "full":
            add_adapter(model.decoder, self.pc.spec(), init=False)
        model.load_state_dict(state, assign=True)
        if self.pc.method != "full":
            merge_and_unload(model.decoder, "default")
        save_reward_model(model, folder)
        self.tokenizer.save(folder)
        self._save_extras(folder)


class DPORun(_PreferenceRun):
    """DPO / IPO: the policy against the cached log-probs of the model it starts from."""

    kind = "dpo"
    metric_columns = DPO_STATS
    summary_stats = ("rewards/accuracies", "rewards/margins")

    def __init__(self, pc: PreferenceConfig, tc: TrainConfig, env: _Dist, resume: bool) -> None:
        super().__init__(pc, tc, env, resume)
        self.result_folder = "model" if pc.method == "full" else "adapter"
        self.reference_status = ""

    def build_model(self, device: torch.device, bf16: bool) -> Transformer:
        torch.manual_seed(self.tc.seed)  # adapter dropout draws from the global RNG
        model = self.lm.model.float()
        key = reference_key(model, self.batches.pairs, bf16)  # the base, before any adapter
        self._adapt(model)
        model = model.to(device)
        self._reference(model, key, device, bf16)
        return model

    def _reference(self, model: Transformer, key: str, device: torch.device, bf16: bool) -> None:
        """The reference log-probs of every pair from the cache, or computed (rank 0) and cached.
        Called before the first step (and before a checkpoint's weights are loaded): `model` is the
        base, its adapters (if any) switched off here."""
        import torch.distributed as dist

        path = Path(self.tc.out) / REFERENCE_FILE
        count = len(self.batches.pairs)
        cached = read_reference(path, key, count) if self.env.main else None
        if self.env.main and cached is None:
            autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else None
            with adapters_disabled(model) if self.pc.method != "full" else nullcontext():
                cached = reference_logps(model, self.batches.pairs, self.pad_id, self.tc.batch_size, device, autocast)
            write_reference(path, key, *cached)
            self.reference_status = f"computed for {count} pairs and cached in {path}"
        elif self.env.main:
            self.reference_status = f"of {count} pairs read from {path}"
        if self.env.world > 1:
            dist.barrier()
            if not self.env.main:
                cached = read_reference(path, key, count)
                if cached is None:
                    raise InvalidArgument(f"rank {self.env.rank}: {path} does not hold this run's reference "
                                          "log-probs (is the run folder on a filesystem every rank shares?)")
        self.batches.reference = cached

    def describe(self, model: torch.nn.Module) -> str:
        pc = self.pc
        smoothing = f", label smoothing {pc.label_smoothing:g}" if pc.label_smoothing else ""
        loss = f"{pc.loss_type} loss (beta {pc.beta:g}{smoothing})"
        return f"{super().describe(model)}, {loss}, reference log-probs {self.reference_status}"

    def loss(self, model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch.input_ids
        logps = sequence_logps(model(ids), ids, batch.completion_mask)
        n = len(batch.ref_chosen)
        return dpo_loss(logps.total[:n], logps.total[n:], batch.ref_chosen, batch.ref_rejected, beta=self.pc.beta,
                        loss_type=self.pc.loss_type, label_smoothing=self.pc.label_smoothing,
                        chosen_count=logps.count[:n], rejected_count=logps.count[n:])

    def sample(self, model: Transformer) -> str:
        """The answer (greedy) to the first held-out prompt, after its prompt's last line."""
        from ..generate import generate

        pair = (self.val_pairs or self.train_pairs)[0]
        ex = pair.chosen
        prompt = ex.ids[:ex.mask.index(True)] if True in ex.mask else ex.ids
        new = max(1, min(self.tc.sample_tokens, self.config.block_size - len(prompt)))
        stop = list(self.template.stop) if self.template is not None else []
        was_training = model.training
        model.eval()
        answer = generate(model, self.tokenizer, [prompt], SamplingParams(temperature=0, max_new_tokens=new, stop=stop),
                          backend="eager")[0]
        model.train(was_training)
        lines = self.tokenizer.decode(prompt).strip().splitlines() or [""]
        return f"{lines[-1][-60:]} -> {answer.text.strip()}"

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return trained_state(state, self.pc.method)

    def save(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        save_trained(state, folder, self.pc.method, self.config, self.pc.spec(), self.pc.model, self.tokenizer)
        self._save_extras(folder)


RUNS = {"reward-model": RewardModelRun, "dpo": DPORun}


def train_preferences(kind: str, pc: PreferenceConfig, tc: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train a reward model (kind "reward-model") or a DPO policy ("dpo"), or continue one with
    resume=True, as pc and tc say. A TrainConfig with max_steps 0 runs pc.epochs passes."""
    if kind not in RUNS:
        raise InvalidArgument(f"unknown preference training {kind!r}; use {', '.join(RUNS)}")
    steps_given = tc.max_steps
    tc.max_steps = max(tc.max_steps, 1)
    tc.validate()
    tc.max_steps = steps_given
    env, device = _init_distributed(tc.device)
    try:
        return run_loop(RUNS[kind](pc, tc, env, resume), tc, env, device)
    finally:
        _end_distributed(env)


def train_reward_model(pc: PreferenceConfig, tc: TrainConfig, *, resume: bool = False) -> TrainResult:
    return train_preferences("reward-model", pc, tc, resume=resume)


def train_dpo(pc: PreferenceConfig, tc: TrainConfig, *, resume: bool = False) -> TrainResult:
    return train_preferences("dpo", pc, tc, resume=resume)


def preference_settings() -> set[str]:
    return {f.name for f in fields(PreferenceConfig)}
