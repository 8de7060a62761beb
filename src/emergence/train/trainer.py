"""The one pretraining loop: token shards + a Config -> a trained model in the HF layout.

    data (TokenShards) -> WindowSampler -> objective batch -> model -> loss -> AdamW step
                                                       every N steps: eval, sample, checkpoint

Exact resume: the data order is a function of (seed, samples consumed), the schedule a
function of the step, and the checkpoint carries model, optimizer and RNG states, so a run
resumed from step k repeats the uninterrupted run's losses from k on.

Data parallelism: under `torchrun` (WORLD_SIZE > 1) each rank reads its own slice of every
global micro-batch: rank r takes samples [c + r*B, c + (r+1)*B) of the B*world samples that
start at cursor c, so N ranks with batch B see what one process with batch N*B sees, and
DistributedDataParallel's gradient average equals that process's gradient. `fsdp=True`
shards parameters, gradients and optimizer state instead (FSDP2, `fully_shard`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config, read_json
from ..errors import ConfigError, InvalidArgument
from ..data.shards import TokenShards
from ..model import Transformer
from ..t5 import T5Config, build_model, initialize_t5, t5_config_of
from ..progress import Progress, duration, human
from ..sampling import SamplingParams
from . import moe, objectives
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import SCHEDULES, initialize_weights, learning_rate, make_optimizer


@dataclass
class TrainConfig:
    """Everything that decides a run besides the model's shapes (all of it is checkpointed)."""

    data: str
    out: str
    init: str | None = None  # start from this model (HF-layout folder or packaged name) instead of random weights
    objective: str = "next-token"  # objectives.OBJECTIVES
    context: int | None = None  # tokens per row seen by the model; None: the model's block_size
    batch_size: int = 16  # rows per micro-batch on each rank
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # optim.SCHEDULES
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    dtype: str = "auto"  # auto (bf16 autocast on a GPU that supports it, else fp32), bf16, fp32
    compile: bool = False
    checkpoint_activations: bool = False  # recompute each block's activations in the backward pass
    eval_every: int = 100
    eval_batches: int = 10
    sample_every: int = 0  # 0: only at the end
    sample_tokens: int = 64
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    fsdp: bool = False
    save_best: bool = False  # also keep OUT/best (HF layout) at the lowest validation loss
    noise_density: float = 0.15  # span corruption
    mean_noise_span_length: float = 3.0
    router_aux_loss_coef: float = 0.01  # mixture of experts: the load-balancing loss's weight (train/moe.py)
    router_z_loss_coef: float = 0.001  # and the router z-loss's
    progress: bool = True

    def validate(self) -> None:
        if self.objective not in objectives.OBJECTIVES:
            raise InvalidArgument(f"unknown objective {self.objective!r}; known: {', '.join(objectives.OBJECTIVES)}")
        if self.schedule not in SCHEDULES:
            raise InvalidArgument(f"unknown schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise InvalidArgument(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_every", "checkpoint_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise InvalidArgument(f"need 0 < lr and 0 <= min-lr <= lr, got lr={self.lr}, min-lr={self.min_lr}")


# ---------------------------------------------------------------------------------- data
class SeededOrder:
    """Item i of a run (counted over the whole run) is perm_e[i mod N], e = i div N, with perm_e
    a permutation seeded by (seed, e): the order depends only on i, which makes resume exact."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, i: int) -> int:
        epoch, pos = divmod(i, self.count)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.count, generator=g).numpy()
        return int(self._perm[pos])


class WindowSampler:
    """Fixed-length windows of a split's token stream, in a seeded order, epoch after epoch.

    Window k of a shard covers tokens [k*stride, k*stride + length). Sample number i (counted
    over the whole run) is window perm_e[i mod N] with e = i div N and perm_e a permutation
    seeded by (seed, e): the order depends only on i, which is what makes resume exact.
    """

    def __init__(self, arrays: list[np.ndarray], length: int, stride: int, seed: int) -> None:
        self.arrays, self.length, self.stride, self.seed = arrays, length, stride, seed
        counts = [max(0, (len(a) - length) // stride + 1) for a in arrays]
        self.offsets = np.cumsum([0] + counts)  # window index -> shard by searchsorted
        self.num_windows = int(self.offsets[-1])
        self.order = SeededOrder(self.num_windows, seed)

    def window(self, k: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, k, side="right") - 1)
        start = (k - int(self.offsets[shard])) * self.stride
        return self.arrays[shard][start:start + self.length]

    def sample(self, i: int) -> np.ndarray:
        return self.window(self.order[i])

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Samples first .. first+count-1 as a (count, length) int64 tensor."""
        rows = [self.sample(i).astype(np.int64) for i in range(first, first + count)]
        return torch.from_numpy(np.stack(rows))


class Batches:
    """The objective's rows from the shards: training batches by sample number (any rank, any
    resume: the same rows), validation batches by window number."""

    def __init__(self, data: TokenShards, tc: TrainConfig, context: int, vocab_size: int, eos_id: int,
                 seq2seq_start: int | None = None) -> None:
        self.tc, self.eos_id = tc, eos_id
        self.seq2seq_start = seq2seq_start  # an encoder-decoder's decoder start id (None: a decoder-only model)
        window = objectives.window_length_for(tc.objective, context, tc.noise_density, tc.mean_noise_span_length)
        stride = window - 1 if tc.objective == "next-token" else window  # next-token windows share one token
        self.train = WindowSampler(data.split("train"), window, stride, tc.seed)
        val_arrays = data.split("val")
        self.val = WindowSampler(val_arrays, window, stride, tc.seed) if val_arrays else None
        self.prompt_source = val_arrays or data.split("train")  # where sample_text takes its prompt
        if self.train.num_windows == 0:
            raise InvalidArgument(f"the training split ({data.tokens('train')} tokens) is shorter than one "
                                  f"window of {window} tokens; use a smaller --context")
        self.sentinels = objectives.t5_sentinel_ids(vocab_size)
        if tc.objective == "span-corruption" and min(self.sentinels) < data.vocab_size:
            raise InvalidArgument(f"span corruption needs vocab_size >= {data.vocab_size + 100} "
                                  f"(tokenizer + 100 sentinels), the model has {vocab_size}")

    def train_batch(self, first: int) -> objectives.Batch:
        """Samples first .. first + batch_size - 1."""
        count = self.tc.batch_size
        windows = self.train.batch(first, count)
        if self.tc.objective == "next-token":
            return objectives.next_token_batch(windows)
        # span corruption: each row's spans are seeded by its sample number
        return self._objective(windows, [self.tc.seed * 1_000_003 + first + i for i in range(count)])

    def eval_batch(self, window_ids: Sequence[int]) -> objectives.Batch:
        rows = np.stack([self.val.window(int(k)).astype(np.int64) for k in window_ids])
        return self._objective(torch.from_numpy(rows), [int(k) for k in window_ids])  # same spans every time

    def _objective(self, windows: torch.Tensor, seeds: list[int]) -> objectives.Batch:
        if self.tc.objective == "next-token":
            return objectives.next_token_batch(windows)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if self.seq2seq_start is not None:
            return objectives.span_corruption_seq2seq_batch(
                windows, self.sentinels, self.eos_id, self.seq2seq_start, generator=generators,
                noise_density=self.tc.noise_density, mean_noise_span_length=self.tc.mean_noise_span_length)
        return objectives.span_corruption_batch(windows, self.sentinels, self.eos_id, generator=generators,
                                                noise_density=self.tc.noise_density,
                                                mean_noise_span_length=self.tc.mean_noise_span_length)


# ---------------------------------------------------------------------- the environment
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run initialised the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return _Dist(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return _Dist(rank, world, local_rank, owns), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def _end_distributed(env: _Dist) -> None:
    """Destroy the process group this run created: left to interpreter exit, gloo's threads can
    abort a rank ("terminate called without an active exception") after its work is done."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def estimate_training_memory(config: Config, batch_size: int, context: int, bf16: bool) -> dict[str, int]:
    """Bytes a training step needs: fp32 weights + grads + AdamW's two moments (16 per
    parameter), and activations (Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes per
    layer in 16-bit, doubled in fp32) plus the fp32 logits and their gradient."""
    params = config.num_parameters()
    s, b, h, a = context, batch_size, config.n_embd, config.n_head
    per_layer = s * b * h * (34 + 5 * a * s / h) * (1 if bf16 else 2)
    logits = 3 * b * s * config.vocab_size * 4
    return {"parameters": params, "weights_and_optimizer": 16 * params,
            "activations": int(config.n_layer * per_layer + logits)}


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _check_memory(config: Config, tc: TrainConfig, context: int, bf16: bool, device: torch.device) -> None:
    need = estimate_training_memory(config, tc.batch_size, context, bf16)
    total, have = need["weights_and_optimizer"] + need["activations"], available_memory(device)
    if total > have:
        gb = 1 << 30
        raise InvalidArgument(
            f"this run needs about {total / gb:.1f} GiB on {device.type} ({need['parameters'] / 1e6:.1f}M parameters: "
            f"{need['weights_and_optimizer'] / gb:.1f} GiB weights, gradients and AdamW state; "
            f"{need['activations'] / gb:.1f} GiB activations at batch {tc.batch_size} x context {context}) "
            f"but only {have / gb:.1f} GiB is available; use a smaller model, batch or context")


def model_flops_per_token(config: Config, context: int) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention's
    12 * n_layer * n_head * head_dim * context (PaLM, appendix B)."""
    d, hd = config.n_embd, config.head_dim
    q, kv = config.n_head * hd, config.n_kv_head * hd
    n_mats = 3 if config.mlp == "swiglu" else 2
    matmul = config.n_layer * (d * (q + 2 * kv) + q * d + n_mats * d * config.intermediate_size)
    matmul += config.vocab_size * d  # the output head
    return 6 * matmul + 12 * config.n_layer * config.n_head * hd * context


# ------------------------------------------------------------------------------ the loop
@dataclass
class TrainResult:
    step: int
    tokens: int
    train_loss: float
    val_loss: float | None
    elapsed_s: float
    tokens_per_s: float
    model_dir: Path | None
    losses: list[float] = field(default_factory=list)  # train loss of every step this call ran
    val_stats: dict[str, float] = field(default_factory=dict)  # a run with its own loss: its last evaluation's stats


def resolve_model_config(spec: str | Config, vocab_size: int, eos_id: int, objective: str) -> Config:
    """A preset name, a JSON file (our Config fields or an HF config.json) or a Config, with
    the vocabulary sized for the data's tokenizer (plus T5's 100 sentinel ids for span
    corruption), rounded up to a multiple of 64 for efficient matmuls. T5 presets and configs
    give a T5Config (trained with span corruption)."""
    t5 = t5_config_of(spec)
    if t5 is not None:
        if objective != "span-corruption":
            raise InvalidArgument(f"a T5 model (encoder-decoder) trains with --objective span-corruption, not {objective}")
        needed = vocab_size + 100
        t5.vocab_size = max(64 * math.ceil(needed / 64), t5.vocab_size if isinstance(spec, T5Config) else 0)
        # the data's tokenizer has no T5 <pad>: its EOS pads the source and starts the decoder
        t5.eos_token_id = t5.pad_token_id = t5.decoder_start_token_id = eos_id
        return t5
    if isinstance(spec, Config):
        config = Config.from_dict(spec.to_dict())
    elif Path(spec).is_file():
        raw = read_json(Path(spec))
        config = Config.from_hf(raw) if "model_type" in raw else Config.from_dict(raw)
    else:
        config = Config.from_name(spec)
    needed = vocab_size + (100 if objective == "span-corruption" else 0)
    config.vocab_size = max(64 * math.ceil(needed / 64), config.vocab_size if isinstance(spec, Config) else 0)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = None, eos_id, None
    config.validate()
    return config


class PretrainRun:
    """What pretraining puts into the loop: token shards, a new model (or --init's), an HF folder.

    The loop (`run_loop`) asks a run for: `config`, `tokenizer`, `fingerprint` (of what the data
    was made with, checked on resume), `state` (a checkpoint to resume, or None), `context`,
    `batches` (train_batch(first), val, eval_batch(ids)), `build_model(device)`, `describe()`,
    `sample(model)`, `checkpoint_state(state)` (what of the model a checkpoint keeps) and
    `save(state, folder)`. Fine-tuning (finetune/run.py) is the other kind of run.

    A run may also bring its own objective: `loss(model, batch) -> (loss, stats)` on its own
    batches (a NamedTuple of tensors, moved to the device by the loop), used for training and
    evaluation instead of the next-token loss. `metric_columns` names its stats (0-dim tensors,
    averaged over micro-batches and ranks): the metrics get them every step and as val_<name> at
    evaluations; `summary_stats`, those the last line reports (the preference runs of align/train.py).
    """

    kind = "pretrain"

    def __init__(self, model_spec: str | Config | None, tc: TrainConfig, env: _Dist, resume: bool) -> None:
        self.tc = tc
        data = TokenShards(tc.data)
        self.tokenizer = data.tokenizer()
        if self.tokenizer.fingerprint() != data.tokenizer_hash:
            raise InvalidArgument(f"{tc.data}: the shards' manifest names tokenizer {data.tokenizer_hash} but the "
                                  f"tokenizer stored beside them hashes to {self.tokenizer.fingerprint()}")
        self.data, self.fingerprint = data, data.tokenizer_hash
        self.config, self.state, self.init_weights = _run_start(model_spec, tc, env, data, resume)
        self.context = tc.context or self.config.block_size
        if self.context > self.config.block_size:
            raise InvalidArgument(f"context {self.context} exceeds the model's block_size {self.config.block_size}")
        start = self.config.decoder_start_token_id if self.config.is_encoder_decoder else None
        self.batches = Batches(data, tc, self.context, self.config.vocab_size, self.tokenizer.eos_id, start)

    def build_model(self, device: torch.device, bf16: bool) -> Transformer:
        _check_memory(self.config, self.tc, self.context, bf16, device)
        torch.manual_seed(self.tc.seed)
        model = build_model(self.config)
        if self.config.is_encoder_decoder:
            initialize_t5(model, generator=torch.Generator().manual_seed(self.tc.seed))
        else:
            initialize_weights(model, generator=torch.Generator().manual_seed(self.tc.seed))
        if self.init_weights is not None:
            model.load_state_dict(self.init_weights)
        return model.to(device)

    def describe(self, model: torch.nn.Module) -> str:
        params = sum(p.numel() for p in model.parameters())
        return (f"pretrain: {params / 1e6:.2f}M parameters ({self.config.n_layer} layers x {self.config.n_embd} "
                f"wide), {self.data.tokens('train'):,} training tokens")

    def sample(self, model: Transformer) -> str:
        return sample_text(model, self.tokenizer, self.batches.prompt_source, self.tc)

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state

    def save(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        from ..weights.hf import save_hf

        plain = build_model(self.config)
        plain.load_state_dict(state)
        save_hf(plain, folder)
        self.tokenizer.save(folder)


def train(model_spec: str | Config, tc: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or continue, with resume=True) the pretraining described by tc; see the module docstring."""
    tc.validate()
    env, device = _init_distributed(tc.device)
    try:
        return run_loop(PretrainRun(model_spec, tc, env, resume), tc, env, device)
    finally:
        _end_distributed(env)


def run_loop(run, tc: TrainConfig, env: _Dist, device: torch.device) -> TrainResult:
    """The training loop of every kind of run (see PretrainRun for what a run provides)."""
    out = Path(tc.out)
    config, state, batches, context = run.config, run.state, run.batches, run.context
    bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    model = run.build_model(device, bf16)
    decoders = [m for m in model.modules() if isinstance(m, Transformer)]  # (inside a reward model too)
    if tc.checkpoint_activations and not decoders:
        raise InvalidArgument(f"activation checkpointing is built for decoder-only models, not {type(model).__name__}")
    for decoder in decoders:
        decoder.checkpoint_activations = tc.checkpoint_activations
    train_model = _wrap_parallel(model, tc, env, device)
    optimizer = make_optimizer(train_model, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2))
    step, cursor, best_val = 0, 0, math.inf
    if state is not None:
        _load_state(train_model, optimizer, state)
        step, cursor, best_val = state["step"], state["cursor"], state.get("best_val", math.inf)
        _restore_rng(state["rng"], device)

    def batch_loss(inputs: torch.Tensor, targets: torch.Tensor, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        """extras: a packed batch's segment_ids, or an encoder-decoder's decoder inputs and source mask."""
        if "decoder_inputs" in extras:
            logits = train_model(inputs, extras["decoder_inputs"], extras["source_mask"])
            return objectives.next_token_loss(logits, targets)
        # A decoder scores its own hidden states a slice at a time: the (B, T, V) logits, their
        # softmax and gradient never exist whole (model.head_cross_entropy).
        return train_model(inputs, segment_ids=extras.get("segments"), targets=targets)

    # torch.compile takes model and loss together.
    compute_loss = torch.compile(batch_loss) if tc.compile else batch_loss
    own_loss = getattr(run, "loss", None)  # a run with its own objective: (model, batch) -> (loss, stats)
    if own_loss is not None and tc.compile:
        own_loss = torch.compile(own_loss)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext())

    tokens_per_step = tc.batch_size * env.world * tc.grad_accum * context
    metrics = _Metrics(out, env.main, truncate_after=step if state is not None else None,
                       extra_columns=[*getattr(run, "metric_columns", ()),
                                      *(f"val_{k}" for k in getattr(run, "metric_columns", ()))])
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(tc), indent=2) + "\n")
        (out / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        print(f"{run.describe(model)}, {tokens_per_step:,} tokens per step, "
              f"{'bf16 autocast' if bf16 else 'fp32'} on {device}"
              f"{f' x {env.world} ranks' if env.world > 1 else ''}"
              f"{f', resuming at step {step}' if state is not None else ''}", flush=True)

    progress = Progress(tc.max_steps * tokens_per_step, "tok", desc=run.kind, enabled=tc.progress and env.main)
    progress.done = step * tokens_per_step
    losses: list[float] = []
    val_loss, val_stats = None, {}
    # Steps whose loss, grad norm (and a run's stats) are still on the device: reading them back
    # is a host sync that would stall a GPU every step, so they are read in one go at log points.
    pending: list[tuple[int, float, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
    start = time.perf_counter()
    window_start, window_tokens = start, 0

    def flush() -> list[dict]:
        """The pending steps' metrics rows, read back from the device in one go; the last row
        (the current step) carries the throughput since the previous flush."""
        nonlocal window_tokens
        values = torch.stack([torch.stack([loss, norm, *stats.values()]) for _, _, loss, norm, stats in pending]).double()
        if env.world > 1:
            dist.all_reduce(values)  # the loss mean over ranks (grad norms are already global)
            values /= env.world
        values = values.cpu().tolist()
        now = time.perf_counter()
        rows = []
        for (n, lr, _, _, stats), (loss, norm, *stat_values) in zip(pending, values):
            if not math.isfinite(loss):
                raise InvalidArgument(f"the loss became {loss} at step {n}; lower --lr or raise --warmup-steps")
            losses.append(loss)
            rows.append({"step": n, "tokens": n * tokens_per_step, "train_loss": loss, "lr": lr, "grad_norm": norm,
                         **dict(zip(stats, stat_values))})
        rows[-1]["tokens_per_s"] = window_tokens / max(now - window_start, 1e-9)
        rows[-1]["elapsed_s"] = now - start
        progress.update(len(rows) * tokens_per_step, step=f"{rows[-1]['step']}/{tc.max_steps}",
                        loss=rows[-1]["train_loss"], lr=f"{rows[-1]['lr']:.2e}")
        pending.clear()
        window_tokens = 0
        return rows

    def save(folder: Path) -> None:
        """The model as the run writes it, from rank 0 (every rank calls this: FSDP gathers first)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.main:
            run.save(weights, folder)

    train_model.train()
    experts = moe.moe_layers(model)  # the MoE layers, whose routers add auxiliary losses
    moe_losses = None  # the last micro-batch's auxiliary losses (2,), on the device
    while step < tc.max_steps:
        lr = learning_rate(step, schedule=tc.schedule, lr=tc.lr, min_lr=tc.min_lr, warmup_steps=tc.warmup_steps,
                           max_steps=tc.max_steps, decay_fraction=tc.decay_fraction)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = None  # the mean of the micro-batches' losses, kept on the device
        step_stats: dict[str, torch.Tensor] = {}  # and of a run's own stats
        for micro in range(tc.grad_accum):
            batch = batches.train_batch(cursor + env.rank * tc.batch_size)
            cursor += tc.batch_size * env.world
            if own_loss is None:
                inputs, targets = _to_device(batch.inputs, device), _to_device(batch.targets, device)
                extras = {k: _to_device(v, device) for k, v in batch_extras(batch).items()}
            else:
                batch = _batch_to_device(batch, device)
            sync = micro == tc.grad_accum - 1 or env.world == 1 or tc.fsdp
            with (nullcontext() if sync else train_model.no_sync()), autocast:
                if own_loss is None:
                    loss = compute_loss(inputs, targets, extras)
                else:
                    loss, stats = own_loss(train_model, batch)
                    for k, v in stats.items():
                        v = v.detach().float() / tc.grad_accum
                        step_stats[k] = v if k not in step_stats else step_stats[k] + v
                if tc.grad_accum > 1:  # (one kernel launch less per step without accumulation)
                    loss = loss / tc.grad_accum
                total = loss
                if experts:  # the routers' auxiliary losses train with it; the logged loss stays the LM's
                    aux, moe_losses = moe.auxiliary_loss(experts, tc.router_aux_loss_coef, tc.router_z_loss_coef)
                    total = loss + aux / tc.grad_accum
            total.backward()
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(_trainable(train_model), tc.grad_clip) if tc.grad_clip
                     else _grad_norm(train_model))
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += tokens_per_step
        pending.append((step, lr, step_loss, grad_norm.detach().float().to(step_loss.device), step_stats))

        last = step == tc.max_steps
        evaluate_now = batches.val is not None and ((tc.eval_every and step % tc.eval_every == 0) or last)
        sample_now = (tc.sample_every and step % tc.sample_every == 0) or last
        checkpoint_now = (tc.checkpoint_every and step % tc.checkpoint_every == 0) or last
        if not (step % tc.log_every == 0 or evaluate_now or sample_now or checkpoint_now):
            continue
        rows = flush()
        if experts:  # the last micro-batch's routing: its auxiliary losses and each layer's expert shares
            rows[-1].update(moe.metrics(experts, moe_losses))
        if evaluate_now:
            if own_loss is None:
                val_loss = evaluate(train_model, compute_loss, batches, env, device, autocast)
                rows[-1]["val_loss"], rows[-1]["val_ppl"] = val_loss, math.exp(min(val_loss, 50))
            else:  # (the bare model: no DDP collective in a forward some rank may not run)
                val_loss, val_stats = evaluate_own_loss(model, own_loss, run.metric_columns, batches, env, device,
                                                        autocast)
                rows[-1]["val_loss"] = val_loss
                rows[-1].update({f"val_{k}": v for k, v in val_stats.items()})
            if tc.save_best and val_loss < best_val:
                save(out / "best")
            best_val = min(best_val, val_loss)
        for row in rows:
            metrics.write(row)
        if sample_now:
            text = run.sample(model)
            metrics.sample(step, text)
            if env.main and tc.progress:
                print(f"\n[step {step}] {text!r}", flush=True)
        if checkpoint_now:
            model_state, optimizer_state = _gather_state(train_model, optimizer)
            if env.main:
                save_checkpoint({"step": step, "cursor": cursor, "best_val": best_val,
                                 "model": run.checkpoint_state(model_state), "optimizer": optimizer_state,
                                 "rng": _rng_state(device), "world": env.world, "train_config": asdict(tc),
                                 "model_config": config.to_dict(), "tokenizer_hash": run.fingerprint,
                                 **getattr(run, "checkpoint_extra", {})}, out)
            if env.world > 1:
                dist.barrier()
        window_start = time.perf_counter()  # evaluation, samples and checkpoints are not training time
    progress.close()

    elapsed = time.perf_counter() - start
    model_dir = out / getattr(run, "result_folder", "model")
    save(model_dir)
    if env.main:
        ran = len(losses) * tokens_per_step
        print(f"done: step {step}, train loss {losses[-1] if losses else float('nan'):.4f}"
              f"{f', val loss {val_loss:.4f}' if val_loss is not None else ''}"
              f"{f' (ppl {math.exp(val_loss):.2f})' if val_loss is not None and own_loss is None else ''}"
              f"{''.join(f', val {k} {v:.4f}' for k, v in val_stats.items() if k in getattr(run, 'summary_stats', ()))}, "
              f"{human(ran)} tokens in {duration(elapsed)} ({human(ran / max(elapsed, 1e-9))} tok/s); "
              f"{'model' if run.kind == 'pretrain' else run.kind + ' result'} saved to {model_dir}", flush=True)
    return TrainResult(step, step * tokens_per_step, losses[-1] if losses else math.nan, val_loss, elapsed,
                       len(losses) * tokens_per_step / max(elapsed, 1e-9), model_dir if env.main else None, losses,
                       val_stats)


def config_from_dict(d: dict) -> Config | T5Config:
    """A run's model_config.json (Config.to_dict or T5Config.to_dict) back to its config."""
    return T5Config(**d) if d.get("family") == "t5" else Config.from_dict(d)


def _run_start(model_spec: str | Config, tc: TrainConfig, env: _Dist, data: TokenShards, resume: bool
               ) -> tuple[Config, dict | None, dict[str, torch.Tensor] | None]:
    """(config, checkpoint state or None, initial weights or None) for a resumed run, a run
    continuing an existing model (--init), or a new one; refuses mismatched tokenizers,
    changed settings and a new run over an existing one."""
    out = Path(tc.out)
    if resume:
        state = load_checkpoint(out)
        if state["tokenizer_hash"] != data.tokenizer_hash:
            raise InvalidArgument(f"the checkpoint in {out} was trained on tokenizer {state['tokenizer_hash']} but "
                                  f"the shards in {tc.data} use tokenizer {data.tokenizer_hash}")
        _check_same_run(TrainConfig(**state["train_config"]), tc)
        if state["step"] >= tc.max_steps:
            raise InvalidArgument(f"the run in {out} is finished: it reached step {state['step']} of "
                                  f"{tc.max_steps}; give a larger --max-steps to train it further")
        if model_spec is not None:
            tokenizer_eos = data.manifest["tokenizer"]["eos_id"]
            spec = resolve_model_config(model_spec, data.vocab_size, tokenizer_eos, tc.objective)
            if spec.to_dict() != state["model_config"]:
                raise InvalidArgument(f"--config {model_spec} is not the model of the run in {out}; leave --config "
                                      "out to resume it")
        saved_world, saved_batch = state.get("world", 1), state["train_config"]["batch_size"]
        if saved_world * saved_batch != env.world * tc.batch_size:
            raise InvalidArgument(f"cannot resume with a different global batch: the run used {saved_world} "
                                  f"process(es) x batch {saved_batch}, now {env.world} x {tc.batch_size}")
        return config_from_dict(state["model_config"]), state, None
    if (out / "checkpoint.pt").exists():
        raise InvalidArgument(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    if tc.init is not None:
        config, weights = _initial_model(tc.init, data)
        return config, None, weights
    tokenizer_eos = data.manifest["tokenizer"]["eos_id"]
    return resolve_model_config(model_spec, data.vocab_size, tokenizer_eos, tc.objective), None, None


def _initial_model(spec: str, data: TokenShards) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and fp32 weights of an existing model to continue pretraining from; its tokenizer
    must be the one the shards were made with."""
    from ..store import resolve_model
    from ..tokenizer import Tokenizer
    from ..weights.hf import load_hf

    folder = resolve_model(spec).path
    if not folder.is_dir():
        raise InvalidArgument(f"--init takes a Hugging Face layout folder or a packaged model name, got {spec}")
    model_hash = Tokenizer.load(folder).fingerprint()
    if model_hash != data.tokenizer_hash:
        raise InvalidArgument(f"the model {spec} uses tokenizer {model_hash} but the shards in {data.folder} were "
                              f"made with tokenizer {data.tokenizer_hash}; prepare them with --tokenizer {spec}")
    model, config = load_hf(folder, dtype=torch.float32)
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host: pinned memory and an asynchronous copy on CUDA."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _batch_to_device(batch, device: torch.device):
    """A run's own batch (a NamedTuple) with every tensor in it on the device (None stays None)."""
    return type(batch)(*(_to_device(v, device) if isinstance(v, torch.Tensor) else v for v in batch))


# What resuming may change: how far the run goes and how it reports, not what it computes. (The
# global batch, batch_size x ranks, is checked on its own: the ranks may change, the product not.)
RESUME_MAY_CHANGE = {"max_steps", "out", "data", "batch_size", "eval_every", "eval_batches", "sample_every",
                     "sample_tokens", "checkpoint_every", "log_every", "progress", "device", "compile", "save_best",
                     "checkpoint_activations"}


def saved_settings(out: str | Path) -> dict:
    """The settings of the run in `out` (its train_config.json, else its checkpoint's), for
    `pretrain --resume`: what a resumed run starts from before the flags given apply."""
    out = Path(out)
    path = out / "train_config.json"
    if path.is_file():
        return load_train_config(str(path))
    return dict(load_checkpoint(out)["train_config"])


def _check_same_run(saved: TrainConfig, now: TrainConfig) -> None:
    """Resuming may extend a run (max_steps) or change how it reports; not what it computes."""
    may_differ = RESUME_MAY_CHANGE
    changed = [f.name for f in fields(TrainConfig)
               if f.name not in may_differ and getattr(saved, f.name) != getattr(now, f.name)]
    if changed:
        raise InvalidArgument("cannot resume with different settings: " + ", ".join(
            f"{n} was {getattr(saved, n)!r}, now {getattr(now, n)!r}" for n in changed))


def _wrap_parallel(model: Transformer, tc: TrainConfig, env: _Dist, device: torch.device) -> torch.nn.Module:
    if env.world == 1:
        return model
    if tc.fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = model.layers if hasattr(model, "layers") else model.decoder.layers  # (a reward model's decoder)
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded, CPU) model and optimizer state dicts keyed by parameter names, the
    same whether the run is single-process, DDP or FSDP, so any of them can resume any other."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # A fine-tuning checkpoint keeps only the trained tensors (the frozen base is loaded again).
    partial = len(state["model"]) < len(model.state_dict())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False, strict=not partial))


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _grad_norm(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)


# ------------------------------------------------------------------ evaluation, samples
@torch.no_grad()
def batch_extras(batch) -> dict[str, torch.Tensor]:
    """A batch's tensors besides inputs and targets (segments; decoder inputs, source mask)."""
    return {k: v for k, v in batch._asdict().items() if k not in ("inputs", "targets") and v is not None}


@torch.no_grad()  # (no graph: evaluation needs no gradients)
def evaluate(model: torch.nn.Module, compute_loss, batches: Batches, env: _Dist, device: torch.device,
             autocast) -> float:
    """Mean loss over the same evenly spread validation windows every time (split over ranks)."""
    tc, windows = batches.tc, batches.val
    count = min(windows.num_windows, tc.eval_batches * tc.batch_size * env.world)
    picks = np.linspace(0, windows.num_windows - 1, count).round().astype(int)[env.rank::env.world]
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(picks), tc.batch_size):
        chunk = picks[i:i + tc.batch_size]
        batch = batches.eval_batch(chunk)
        with autocast:
            loss = compute_loss(batch.inputs.to(device), batch.targets.to(device),
                                {k: v.to(device) for k, v in batch_extras(batch).items()})
        total += loss.item() * len(chunk)
        n += len(chunk)
    model.train(was_training)
    if env.world > 1:
        t = torch.tensor([total, n], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, n = t.tolist()
    return total / max(n, 1)


@torch.no_grad()
def evaluate_own_loss(model: torch.nn.Module, loss_fn, names: Sequence[str], batches, env: _Dist,
                      device: torch.device, autocast) -> tuple[float, dict[str, float]]:
    """`evaluate` for a run with its own loss: the mean loss and stats `names` over the same
    held-out rows every time (each batch weighted by its rows; split over ranks)."""
    tc, held_out = batches.tc, batches.val
    count = min(held_out.num_windows, tc.eval_batches * tc.batch_size * env.world)
    picks = np.linspace(0, held_out.num_windows - 1, count).round().astype(int)[env.rank::env.world]
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(names) + 2, dtype=torch.float64, device=device)  # loss, stats, rows
    for i in range(0, len(picks), tc.batch_size):
        chunk = picks[i:i + tc.batch_size]
        with autocast:
            loss, stats = loss_fn(model, _batch_to_device(batches.eval_batch(chunk), device))
        values = torch.stack([loss.detach().float(), *(stats[k].float() for k in names), loss.new_ones(())])
        totals += values.double() * len(chunk)
    model.train(was_training)
    if env.world > 1:
        dist.all_reduce(totals)
    values = (totals[:-1] / totals[-1].clamp(min=1)).tolist()
    return values[0], dict(zip(names, values[1:]))


def sample_text(model: Transformer, tokenizer, arrays: list[np.ndarray], tc: TrainConfig) -> str:
    """A continuation of the first 8 validation tokens (fixed seed: comparable across steps);
    prompt and continuation are shortened to fit a small context."""
    from ..generate import generate

    context = model.config.block_size
    new_tokens = max(1, min(tc.sample_tokens, context - 1))
    prompt = [int(t) for t in arrays[0][:max(1, min(8, context - new_tokens))]]
    was_training = model.training
    model.eval()
    completion = generate(model, tokenizer, [prompt], SamplingParams(
        temperature=0.8, top_k=40, max_new_tokens=new_tokens, seed=tc.seed))[0]
    model.train(was_training)
    return tokenizer.decode(prompt) + completion.text


# ------------------------------------------------------------------------------ metrics
class _Metrics:
    """metrics.jsonl (one object per step) and metrics.csv; samples.jsonl. On resume the rows
    after the checkpoint's step (work the crash threw away) are dropped first."""

    COLUMNS = ("step", "tokens", "train_loss", "val_loss", "val_ppl", "lr", "grad_norm", "tokens_per_s", "elapsed_s")

    def __init__(self, out: Path, enabled: bool, truncate_after: int | None, extra_columns=()) -> None:
        self.enabled = enabled
        self.COLUMNS = (*self.COLUMNS, *extra_columns)  # a run's own stats
        self.jsonl, self.csv, self.samples = out / "metrics.jsonl", out / "metrics.csv", out / "samples.jsonl"
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        rows = _rows_up_to(self.jsonl, truncate_after) if truncate_after is not None else []
        samples = _rows_up_to(self.samples, truncate_after) if truncate_after is not None else []
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.samples.write_text("".join(json.dumps(r) + "\n" for r in samples))
        with open(self.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, self.COLUMNS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.COLUMNS} for r in rows)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, self.COLUMNS).writerow({k: row.get(k, "") for k in self.COLUMNS})

    def sample(self, step: int, text: str) -> None:
        if self.enabled:
            with open(self.samples, "a") as f:
                f.write(json.dumps({"step": step, "text": text}) + "\n")


def _rows_up_to(path: Path, step: int) -> list[dict]:
    """The JSON lines of `path` with step <= `step` (a line cut short by a crash is dropped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", math.inf) <= step:
                rows.append(row)
    return rows


def load_train_config(path: str) -> dict:
    """Settings from a JSON file (TrainConfig fields), for `emergence pretrain --train-config`."""
    raw = read_json(Path(path))
    unknown = set(raw) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown training settings in {path}: {', '.join(sorted(unknown))}")
    return raw
