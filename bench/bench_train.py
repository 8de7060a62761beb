"""Training throughput at nanoGPT size: emergence's training loop vs a plain nanoGPT loop, same run.

The model is GPT-2 shaped at nanoGPT's small scale: 6 layers, 6 heads, 384 wide, context 256,
learned positions, LayerNorm, GELU, biases and a tied output head, vocabulary --vocab (50304,
nanoGPT's padded GPT-2 vocabulary; --vocab 65 is the shakespeare-char setting). Every engine
trains that model on the same token stream with the same batch, the same AdamW (lr 6e-4,
betas (0.9, 0.95), weight decay 0.1 on matrices only, eps 1e-8, fused on CUDA), global-norm
clipping at 1.0 and bf16 autocast (or fp32), in this process, round after round:

- emergence: `emergence.train.trainer.train()` itself, the real loop with its data loader
  (memory-mapped shards -> WindowSampler -> next_token_batch -> .to(device)), on shards this
  script writes in the manifest format TokenShards reads. Each round is one fresh train() call
  of W + steps steps with log_every=steps, W being the warm-up rounded up to a multiple of
  steps; the rate is metrics.jsonl's tokens_per_s of the last row, whose window is exactly
  the timed steps (from the log point at the end of the warm-up to the end of the last step;
  evaluation, samples and checkpoints are switched off until the final step, which does them
  after its timing). So it includes everything the loop does per step: the schedule, the
  batch assembly and host-to-device copy, the losses and grad norms kept on the device and
  read back once per log point, the metrics.jsonl/csv writes.
- emergence + compile: the same with TrainConfig(compile=True) (the trainer compiles model and
  loss together). Dynamo reuses its graph for each round's fresh model.
- nanoGPT: a self-contained copy of nanoGPT's model (below: c_attn/c_proj attention through
  F.scaled_dot_product_attention(is_causal=True), GELU(tanh) MLP, LayerNorm with bias, learned
  positions, tied head, std-0.02 init with 0.02/sqrt(2L) on the residual projections, no
  dropout) and its train.py loop: get_batch (torch.randint offsets into a 1-D tensor, pinned and
  copied non_blocking on CUDA, the next batch fetched while the GPU works), forward with the
  loss inside the model, backward, clip, AdamW step, zero_grad(set_to_none=True); no per-step
  host sync. The model and optimizer live across rounds; each round runs warmup untimed steps,
  then `steps` steps between two device synchronisations.
- nanoGPT + compile: the same model under torch.compile (which, as in nanoGPT, covers the loss).

Under bf16 autocast both losses are F.cross_entropy on the bf16 logits, which autocast runs
in fp32; emergence's next_token_loss adds no copy of its own (a (B, T, V) fp32 copy with a 50k
vocabulary would be a large share of a step).

The data is --data random (ids from a seeded generator) or shakespeare (the bytes of
tinyshakespeare's input.txt mod V). The trainer rounds the vocabulary up to a multiple of 64
(as nanoGPT pads 50257 to 50304), so with --vocab 65 every engine's model has 128 rows.

Model FLOPs utilisation is model_flops_per_token(config, context) (6 x matmul weights + 12 x
L x H x hd x T for attention) x tokens/s / peak. The peak: on CUDA --peak-tflops, by default
the H100/H200 SXM datasheet's dense rate for the dtype (bf16 989; fp32 67, or 495 when TF32 is
on); on the CPU the best rate of 2048^3 matmuls measured in this run (fp32, and bf16 too with
--dtype bf16), before and after the rounds.

    python bench/bench_train.py [--device auto] [--dtype auto] [--batch B] [--steps N]
                                [--rounds R] [--warmup W] [--vocab V] [--no-compile]
    python bench/bench_train.py --smoke        # 1 round of 2 steps at batch 2: checks it runs

On an H200 the defaults (batch 12, 5 rounds of 10 + 50 steps) take about 1.5 minutes, most of
it the two first compiles (--smoke: 50 s). On a 2-core CPU, --vocab 65 --steps 5 --rounds 2
takes 3 minutes with a cold compile cache, under 1 once Inductor's cache holds the graphs.

Rates are medians over rounds; rounds interleave the engines (in a rotating order) so a
shared machine's drift affects them alike, and the table gives each engine's range. The ratios
are medians over rounds of the ratio of two engines' rates in the same round.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers import Tokenizer as Backend
from tokenizers import models

import emergence
from emergence.config import Config
from emergence.data.shards import FORMAT, MANIFEST, TOKENIZER_DIR, VERSION
from emergence.tokenizer import Tokenizer
from emergence.train.trainer import TrainConfig, model_flops_per_token, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import matmul_peak, result_path, write_result  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP, SEED = 6e-4, (0.9, 0.95), 0.1, 1.0, 1337
# Dense tensor-core rates of the H100/H200 SXM datasheet, TFLOP/s (H200 has the H100's compute).
DATASHEET_TFLOPS = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


# ------------------------------------------------------------------------------ data
def token_stream(kind: str, vocab: int, n_tokens: int) -> torch.Tensor:
    """The 1-D int64 token stream every engine trains on."""
    if kind == "random":
        g = torch.Generator().manual_seed(SEED)
        return torch.randint(0, vocab, (n_tokens,), generator=g, dtype=torch.int64)
    path = Path(SHAKESPEARE if kind == "shakespeare" else kind)
    if not path.is_file():
        raise SystemExit(f"no data file {path} (use --data random)")
    return torch.from_numpy(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int64) % vocab)


def write_shards(folder: Path, tokens: torch.Tensor, vocab: int) -> None:
    """`tokens` as one training shard in the layout prepare_corpus writes (no validation split),
    with a word-level tokenizer of `vocab` ids ("t0" is EOS) so train() can check and sample."""
    folder.mkdir(parents=True)
    tokenizer = Tokenizer(Backend(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")),
                          eos_token="t0")
    tokenizer.save(folder / TOKENIZER_DIR)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    (folder / "train-00000.bin").write_bytes(tokens.numpy().astype(dtype).tobytes())
    manifest = {"format": FORMAT, "version": VERSION,
                "tokenizer": {"hash": tokenizer.fingerprint(), "vocab_size": vocab, "eos_id": tokenizer.eos_id},
                "dtype": dtype.name, "val_fraction": 0.0,
                "splits": {"train": {"tokens": len(tokens), "shards": [{"file": "train-00000.bin",
                                                                       "tokens": len(tokens)}]},
                           "val": {"tokens": 0, "shards": []}},
                "sources": []}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# ------------------------------------------------------------------- emergence engines
class EmergenceEngine:
    """One train() call per round, timed by the trainer's own metrics (see the module docstring)."""

    def __init__(self, config: Config, shards: Path, work: Path, args, compile: bool) -> None:
        self.config, self.shards, self.work, self.args, self.compile = config, shards, work, args, compile
        self.calls = 0
        self.last_loss = math.nan

    def round(self, warmup: int, steps: int) -> float:
        self.calls += 1
        out = self.work / f"{'compiled' if self.compile else 'eager'}-{self.calls}"
        a = self.args
        tc = TrainConfig(data=str(self.shards), out=str(out), context=a.context, batch_size=a.batch,
                         max_steps=self.warmup_steps(warmup, steps) + steps, lr=LR, min_lr=LR / 10, warmup_steps=0, schedule="constant",
                         weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1], grad_clip=GRAD_CLIP,
                         dtype=a.dtype, compile=self.compile, eval_every=0, eval_batches=1, sample_every=0,
                         sample_tokens=1, checkpoint_every=0, log_every=steps, seed=SEED, device=a.device,
                         progress=False)
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                result = train(self.config, tc)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        except BaseException:
            if printed.getvalue():
                log(printed.getvalue().rstrip())
            raise
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if self.calls == 1:
            log("  " + printed.getvalue().splitlines()[0])  # the trainer's "pretrain: ..." line
        last = rows[-1]
        assert last["step"] == self.warmup_steps(warmup, steps) + steps and "tokens_per_s" in last, "no timed row"
        self.last_loss = result.train_loss
        return last["tokens_per_s"]

    @staticmethod
    def warmup_steps(warmup: int, steps: int) -> int:
        """The warm-up rounded up to a multiple of steps, so a log point falls at its end."""
        return -(-warmup // steps) * steps


# ------------------------------------------------------------------- nanoGPT, in brief
class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head = c.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoMLP(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), NanoMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList(NanoBlock(c) for _ in range(c.n_layer)), ln_f=LayerNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class NanoGPTEngine:
    """nanoGPT's train.py loop (gradient_accumulation_steps=1, constant lr), persistent across rounds."""

    def __init__(self, config: Config, data: torch.Tensor, args, device: torch.device, compile: bool) -> None:
        self.data, self.args, self.device = data, args, device
        torch.manual_seed(SEED)
        self.model = NanoGPT(config).to(device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True if device.type == "cuda" else None)
        self.forward = torch.compile(self.model) if compile else self.model
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
                         else contextlib.nullcontext())
        self.generator = torch.Generator().manual_seed(SEED)
        self.batch = None
        self.last_loss = math.nan

    def get_batch(self):
        T, data = self.args.context, self.data
        ix = torch.randint(len(data) - T, (self.args.batch,), generator=self.generator)
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def steps(self, n: int):
        X, Y = self.batch or self.get_batch()
        for _ in range(n):
            with self.autocast:
                _, loss = self.forward(X, Y)
            X, Y = self.get_batch()  # while the device works on this step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.batch = X, Y
        return loss

    def round(self, warmup: int, steps: int) -> float:
        self.steps(warmup)
        synchronize(self.device)
        start = time.perf_counter()
        loss = self.steps(steps)
        synchronize(self.device)
        seconds = time.perf_counter() - start
        self.last_loss = loss.item()
        return steps * self.args.batch * self.args.context / seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- peaks
def cpu_peak(dtype: str) -> dict[str, float]:
    """Measured FLOP/s of a large matmul in fp32 (and bf16 when training in bf16): the best of
    torch.mm's and oneDNN's (provenance.matmul_peak)."""
    peaks = {"fp32": matmul_peak(torch.float32)}
    if dtype == "bf16":
        peaks["bf16"] = matmul_peak(torch.bfloat16)
    return peaks


def cuda_peak(dtype: str, override: float | None) -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    if override is not None:
        return override * 1e12, f"--peak-tflops {override:g} ({name})"
    kind = "bf16" if dtype == "bf16" else ("fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    known = any(part in name for part in ("H100", "H200"))
    note = "" if known else f"; {name} is not an H100/H200, pass --peak-tflops for its rate"
    return DATASHEET_TFLOPS[kind] * 1e12, (f"{DATASHEET_TFLOPS[kind]:g} TFLOP/s, the H100/H200 SXM datasheet's "
                                           f"dense {kind} rate ({name}){note}")


# ------------------------------------------------------------------------------ main
def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--batch", type=int, help="rows per step (default 12 on a GPU, 4 on the CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per engine per round (default 50 GPU, 5 CPU)")
    parser.add_argument("--rounds", type=int, help="rounds (default 5 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each engine's timed steps "
                        "(default 10 GPU, 2 CPU; the first round's compile happens in them)")
    parser.add_argument("--vocab", type=int, default=50304, help="token ids 0..V-1 (65: shakespeare-char)")
    parser.add_argument("--data", default="random", help=f"random, shakespeare ({SHAKESPEARE}) or a file path")
    parser.add_argument("--engines", default="emergence,emergence+compile,nanogpt,nanogpt+compile")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile engines")
    parser.add_argument("--peak-tflops", type=float, help="CUDA peak for MFU (default: H100/H200 datasheet)")
    parser.add_argument("--smoke", action="store_true", help="1 round, 2 steps, 1 warm-up step, batch 2")
    parser.add_argument("--out", help="JSON results (default bench/results/train_<device>[_smoke].json)")
    args = parser.parse_args()

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.dtype == "auto":  # as the trainer's auto: bf16 autocast on a GPU that supports it
        args.dtype = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    if args.smoke:
        args.rounds, args.steps, args.warmup = 1, 2, 1
        args.batch = args.batch or 2
    args.batch = args.batch or (12 if gpu else 4)
    args.steps = args.steps or (50 if gpu else 5)
    args.rounds = args.rounds or (5 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    if min(args.batch, args.steps, args.rounds, args.warmup) < 1:
        parser.error("--batch, --steps, --rounds and --warmup must be at least 1")
    default = f"bench/results/train_{device.type}_smoke.json" if args.smoke else result_path(f"train_{device.type}")
    out = Path(args.out or default)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    known = ("emergence", "emergence+compile", "nanogpt", "nanogpt+compile")
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown engines {unknown}; known: {', '.join(known)}")
    if args.no_compile:
        names = [n for n in names if not n.endswith("+compile")]

    padded_vocab = 64 * math.ceil(args.vocab / 64)  # what the trainer's resolve_model_config builds
    config = Config(family="gpt2", norm="layernorm", mlp="gelu", position="learned", bias=True, tie_embeddings=True,
                    n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=padded_vocab)
    config.validate()
    args.context = config.block_size
    flops_per_token = model_flops_per_token(config, args.context)
    tokens = token_stream(args.data, args.vocab, 1 << 20)
    params = sum(p.numel() for p in NanoGPT(config).parameters())

    log(f"emergence {emergence.__version__}, torch {torch.__version__}, "
        f"{device}{f' ({torch.cuda.get_device_name()})' if gpu else f', {torch.get_num_threads()} threads'}, "
        f"{args.dtype}; {params / 1e6:.2f}M parameters, vocab {args.vocab}"
        f"{f' (model rows {padded_vocab})' if padded_vocab != args.vocab else ''}, batch {args.batch} x "
        f"{args.context}, {flops_per_token / 1e6:.1f} MFLOP/token; {args.rounds} rounds of {args.warmup} warm-up + "
        f"{args.steps} timed steps; data: {args.data} ({len(tokens):,} tokens)")
    cpu_peaks = None if gpu else cpu_peak(args.dtype)  # measured again after the rounds
    if gpu:
        peak, peak_note = cuda_peak(args.dtype, args.peak_tflops)
        log(f"peak for MFU: {peak_note}")

    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(tmp)
        write_shards(work / "shards", tokens, args.vocab)
        data = tokens.pin_memory() if gpu else tokens
        engines = {}
        for name in names:
            try:
                if name.startswith("emergence"):
                    engines[name] = EmergenceEngine(config, work / "shards", work, args, name.endswith("compile"))
                else:
                    engines[name] = NanoGPTEngine(config, data, args, device, name.endswith("compile"))
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                log(f"  {name}: failed to set up: {one_line(e)}")
        samples: dict[str, dict[int, float]] = {n: {} for n in engines}  # engine -> round -> tokens/s
        failed: dict[str, str] = {}
        for r in range(args.rounds):
            order = list(engines)
            order = order[r % len(order):] + order[:r % len(order)] if order else order
            for name in order:
                if name in failed:
                    continue
                start = time.perf_counter()
                try:
                    rate = engines[name].round(args.warmup, args.steps)
                except Exception as e:  # noqa: BLE001 - one engine's failure (a compile) must not end the run
                    failed[name] = one_line(e)
                    log(f"  round {r + 1}/{args.rounds} {name:18} FAILED: {failed[name]}")
                    continue
                samples[name][r] = rate
                log(f"  round {r + 1}/{args.rounds} {name:18} {rate:10.0f} tok/s  "
                    f"(loss {engines[name].last_loss:.3f}, {time.perf_counter() - start:.1f} s with warm-up)")
    if not gpu:
        after = cpu_peak(args.dtype)
        cpu_peaks = {k: max(v, after[k]) for k, v in cpu_peaks.items()}
        peak = max(cpu_peaks.values())
        peak_note = ("measured here: best 2048^3 matmul, " +
                     ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in cpu_peaks.items()))
        log(f"peak for MFU: {peak_note}")

    results = {"device": str(device), "device_name": torch.cuda.get_device_name() if gpu else platform.processor(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
               "batch": args.batch, "context": args.context, "vocab": args.vocab, "model_vocab": padded_vocab,
               "data": args.data, "parameters": params, "flops_per_token": flops_per_token,
               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
               "peak_flops": peak, "peak_note": peak_note, "cpu_peaks": cpu_peaks, "engines": {}, "failed": failed}

    def paired(name: str, base: str) -> float | None:
        """Median over rounds of the rate ratio within a round (robust to drift between rounds)."""
        both = [r for r in samples.get(name, {}) if r in samples.get(base, {})]
        return statistics.median(samples[name][r] / samples[base][r] for r in both) if both else None

    print(f"\n{params / 1e6:.1f}M-parameter GPT-2 (6x384, context {args.context}, vocab {padded_vocab}), "
          f"{args.dtype} on {results['device_name'] or device}, batch {args.batch}; peak {peak / 1e12:.3g} TFLOP/s "
          f"({peak_note})")
    print("\n| engine | tokens/s (median) | range | ms/step | vs nanoGPT | vs nanoGPT, same compile | MFU |")
    print("|---|---|---|---|---|---|---|")
    for name in engines:
        s = list(samples[name].values())
        if not s:
            print(f"| {name} | failed: {failed.get(name, '?')} | | | | | |")
            continue
        med = statistics.median(s)
        e = {"tokens_per_s": med, "range": [min(s), max(s)], "samples": s,
             "ms_per_step": 1e3 * args.batch * args.context / med, "vs_nanogpt": paired(name, "nanogpt"),
             "vs_nanogpt_same_compile": paired(name, "nanogpt+compile" if name.endswith("compile") else "nanogpt"),
             "mfu": med * flops_per_token / peak, "last_loss": engines[name].last_loss}
        results["engines"][name] = e
        print(f"| {name} | {med:,.0f} | {min(s):,.0f}-{max(s):,.0f} | {e['ms_per_step']:.1f} "
              f"| {_ratio(e['vs_nanogpt'])} | {_ratio(e['vs_nanogpt_same_compile'])} | {100 * e['mfu']:.1f}% |")
    write_result(out, results, "bench/bench_train.py", sys.argv[1:], torch.get_num_threads())  # commit, machine
    log(f"results written to {out}")
    return 1 if failed and len(failed) == len(engines) else 0


if __name__ == "__main__":
    sys.exit(main())
