"""Fine-tuning on the CPU: LoRA and full speed against peft + transformers, and QLoRA's memory.

The model is the smollm2-135m architecture (emergence.config.PRESETS: 30 layers, 576 wide,
9 query / 3 KV heads, MLP 1536, 49,152-row vocabulary tied to the output head) with random
weights (matrices N(0, 0.02), norms 1), written once with emergence.weights.hf.save_hf and
loaded from that folder by both libraries: transformers' AutoModelForCausalLM.from_pretrained
(fp32, SDPA attention) and emergence.weights.hf.load_hf (fp32). The step-0 losses of the two
are recorded as a check that they are the same model.

(a) Speed, fp32, torch.set_num_threads(2), each engine in its own process (a worker kept for the
whole run: a library's steps then meet the heap its own steps left, as in a user's process; in
one shared process, one engine's freed memory decides whether the next one's tensors need fresh
pages). Four engines:

- emergence LoRA: `emergence.adapters.add_adapter(LoraSpec(r=8, alpha=16, dropout=0))` on q, k,
  v, o, gate, up, down (emergence's fused qkv_proj / gate_up_proj carry one A, B pair per part),
  then `mark_only_adapters_trainable`;
- peft LoRA: `peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0,
  target_modules=[q_proj ... down_proj]))` on the transformers model;
- emergence full and transformers full: every parameter trains.

Every engine runs the same hand-written step, the one emergence's loop (train.trainer.run_loop)
runs without clipping or accumulation: the mean cross-entropy in fp32 of the next token
(emergence: `model(inputs, targets=targets)`, the trainer's call, which scores the hidden
states a slice of rows at a time without the whole logits, model.head_cross_entropy;
transformers: `emergence.train.objectives.next_token_loss` of `model(input_ids=inputs,
use_cache=False).logits`, what its own `labels=` loss computes), backward,
`torch.optim.AdamW(trainable params, lr=2e-4)` step, zero_grad(set_to_none=True).
Same batch for all: B rows x T tokens of seeded random ids (the speed of a step does not depend
on which ids they are), the targets the inputs shifted by one. Each engine is built once and
takes W untimed warm-up steps (Adam's state is allocated then); then R rounds, each running
every engine for S timed steps, the order reversed every other round (A B C D, D C B A, ...) so
that another job's load on the 2 cores falls on all alike. tok/s = B x T x S / seconds; the
medians over rounds are reported with each engine's range, and the ratios are the medians of
the per-round ratios (emergence / peer in the same round). Each sample also records the share
of the cores other processes used meanwhile (/proc/stat's busy time less the worker's CPU
time): a 2-thread step loses far more than that share when another job takes a core (each
parallel region waits for its descheduled thread), so the medians and ratios are also given
over the quiet rounds only (others under 10%; the ratio over the rounds where both were).

After the rounds, one step of each LoRA engine runs under torch.profiler (--no-profile skips
it): the op time, the matrix products' share (aten::mm/addmm/bmm, oneDNN's linear) and the
heaviest ops. The hardware figure beside the rates: the best rate of 2048^3 fp32 matmuls
(torch.mm's or oneDNN's), measured before and
after the rounds; each engine's GFLOP/s (training FLOPs per token from
emergence.train.trainer.model_flops_per_token; LoRA computes no gradient of the frozen weights,
so 4 instead of 6 per weight) and its share of that rate. The load average at the start and
the end says how busy the cores were with other jobs.

(b) Memory. Each configuration runs in its own fresh process (`--one CONFIG`), started before
the speed engines are built: it builds the model, takes W + S steps of the same batch and
reports its resident set. Configurations (--memory-configs; by default all but the third):

- lora-fp32: load_hf (fp32), LoRA as above;
- qlora-nf4: load_hf (fp32), `emergence.quant.linear.quantize_model(model, "nf4")` (every
  projection; the embedding and the head tied to it stay fp32), gc.collect(), then LoRA: the
  frozen matmuls go through `emergence.adapters.lora._DequantizedMatmul` (each layer's weight
  dequantized in the forward and again in the backward, no float copy kept for autograd);
- qlora-nf4-saved: the same nf4 model saved beforehand with emergence.quant.checkpoint's
  save_quantized and loaded by load_hf (the packed buffers are views of the file): no fp32 copy
  of the projections ever exists in that process;
- full: load_hf (fp32), every parameter trains;
- lora-fp32-ckpt, qlora-nf4-ckpt: lora-fp32 and qlora-nf4 with activation checkpointing
  (`model.checkpoint_activations`, the trainer's `--checkpoint-activations`: each block's
  input kept for the backward, its inside recomputed there), as the QLoRA recipe trains.

Reported per configuration, in MiB: the RSS after the imports (baseline: the interpreter, torch,
emergence and its native kernels) and before the first step, with its file-backed part (load_hf
maps the safetensors file; tensors used as stored are views of that map, and its touched pages
count in the RSS while any view lives); the peak while loading; the peak of the process
(VmHWM: getrusage's ru_maxrss is recorded too, but on Linux a child's starts at its parent's
RSS at the fork); the peak after each step (VmHWM reset through /proc/self/clear_refs before
the first); the model's stored bytes (fp32 or nf4 projections, the fp32 embedding); the bytes
the first step's forward saves for the backward (activations: every saved tensor that is not a
parameter or buffer, once per storage, through saved_tensors_hooks); the logits' size (which
emergence's sliced loss never holds whole); the gradient + Adam state bytes; and the rest, peak -
baseline - model - activations - gradients and Adam state: the backward's temporaries (a
checkpointed block's recomputed inside, one slice of the head's logits) and what the allocator
keeps of freed memory.

The memory runs are made with glibc's default malloc (what a user gets), then lora-fp32 and
qlora-nf4 (and their -ckpt configurations, when run) once more, one step each (a LoRA step's peak is the first step's: Adam's state is the
adapters' only), under MALLOC_MMAP_THRESHOLD_=131072 (--malloc; 'none' skips it): every block
of 128 KiB or more is then its own mapping, returned on free, so the peak follows the live
tensors instead of what the allocator caches. The same setting for both; it slows a step down
(every large tensor is fresh zeroed pages), so it explains the default figures, no more. (The
-ckpt configurations hand the heap's freed pages back every few blocks by themselves: the
model's checkpointed path does it, emergence/allocator.py.)

The targets: emergence LoRA >= 1.5x peft's tokens/s; QLoRA-nf4's peak <= 0.45x LoRA-fp32's.

    python bench/bench_finetune.py [--rounds 3] [--steps 1] [--warmup 1] [--batch 4] [--context 256]
    python bench/bench_finetune.py --quick     # 2 layers, 8192-row vocabulary, batch 2 x 64, 1 round

On 2 idle cores the default run takes about 5 minutes and --quick about 30 s; other jobs on
the cores stretch both (the speed ratios stay paired by round). Writes
bench/results/finetune.json, or finetune_amd.json on an AMD CPU (--quick: bench/results/finetune_quick.json,
not kept in git).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = "smollm2-135m"
R, ALPHA, LR = 8, 16.0, 2e-4
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENGINES = ("emergence-lora", "peft-lora", "emergence-full", "transformers-full")
MEMORY_CONFIGS = ("lora-fp32", "qlora-nf4", "qlora-nf4-saved", "full", "lora-fp32-ckpt", "qlora-nf4-ckpt")
DEFAULT_MEMORY = ("lora-fp32", "qlora-nf4", "full", "lora-fp32-ckpt", "qlora-nf4-ckpt")  # all but -saved
# glibc: a fixed threshold (it also stops the dynamic one from rising to 32 MiB): every block of
# 128 KiB or more is its own mapping, returned on free, so the RSS follows the live tensors.
EXACT_MALLOC = "MALLOC_MMAP_THRESHOLD_=131072"
MIB = 2 ** 20


# ---------------------------------------------------------------------------------- helpers
def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "arch": platform.machine(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    try:
        with open("/proc/meminfo") as f:
            out["memory_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return out


def config_for(layers: int | None = None, vocab: int | None = None):
    from emergence.config import Config

    config = Config.from_name(PRESET)
    return dataclasses.replace(config, n_layer=layers or config.n_layer, vocab_size=vocab or config.vocab_size)


def write_model(folder: Path, config) -> None:
    """The preset's shapes, random weights, in the Hugging Face layout (save_hf)."""
    import torch

    from emergence.model import Transformer
    from emergence.weights.hf import save_hf

    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    save_hf(model, folder)


def write_nf4(source: Path, folder: Path) -> None:
    """The model of `source` with its projections in nf4, as emergence.quant.checkpoint saves it."""
    import torch

    from emergence.quant.checkpoint import save_quantized
    from emergence.quant.linear import quantize_model
    from emergence.weights.hf import load_hf

    model, _ = load_hf(source, dtype=torch.float32)
    save_quantized(quantize_model(model, "nf4"), None, folder)


def matmul_gflops() -> float:
    """The hardware figure beside the rates, GFLOP/s (provenance.matmul_peak: the best of torch.mm's
    and oneDNN's 2048^3 fp32 matmul)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from provenance import matmul_peak

    return matmul_peak() / 1e9


def flops_per_token(config, context: int, method: str) -> float:
    """Training FLOPs per token (emergence.train.trainer.model_flops_per_token: 6 per matmul
    weight plus attention); LoRA computes no gradient of the frozen weights: 2 per weight less
    (the adapters' own are under 0.2% here and left out)."""
    from emergence.train.trainer import model_flops_per_token

    full = model_flops_per_token(config, context)
    if method == "full":
        return full
    matmul = (full - 12 * config.n_layer * config.n_head * config.head_dim * context) / 6
    return full - 2 * matmul


def make_batch(vocab: int, rows: int, context: int):
    import torch

    ids = torch.randint(0, vocab, (rows, context + 1), generator=torch.Generator().manual_seed(1234))
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def lora_spec():
    from emergence.adapters import LoraSpec

    return LoraSpec(r=R, alpha=ALPHA, dropout=0.0, targets=["q", "k", "v", "o", "gate", "up", "down"])


# ---------------------------------------------------------------------------------- engines
class Engine:
    """A model, its loss (inputs, targets) -> mean cross-entropy, and an AdamW over its trainable parameters."""

    def __init__(self, name: str, model, loss) -> None:
        import torch

        self.name, self.model, self.loss = name, model, loss
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)
        self.trainable = sum(p.numel() for p in self.params)

    def step(self, inputs, targets, saving=None, after_forward=None) -> float:
        """One step; `saving`: a context the forward runs in, `after_forward()` called before the
        backward (the memory runs count what the forward saved)."""
        with saving or contextlib.nullcontext():
            loss = self.loss(inputs, targets)
        if after_forward is not None:
            after_forward()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def emergence_engine(folder: Path, method: str, quantize: str | None = None) -> Engine:
    import torch

    from emergence.adapters import add_adapter, mark_only_adapters_trainable
    from emergence.weights.hf import load_hf

    model, _ = load_hf(folder, dtype=torch.float32)
    if quantize is not None:
        from emergence.quant.linear import quantize_model

        quantize_model(model, quantize)
        gc.collect()
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        add_adapter(model, lora_spec(), generator=torch.Generator().manual_seed(0))
        mark_only_adapters_trainable(model)
    return Engine(f"emergence-{method}", model, lambda inputs, targets: model(inputs, targets=targets))


def hf_engine(folder: Path, method: str) -> Engine:
    import warnings

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from emergence.train.objectives import next_token_loss

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        name = "transformers-full"
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS,
                                                 bias="none", task_type="CAUSAL_LM"))
        name = "peft-lora"
    return Engine(name, model, lambda inputs, targets: next_token_loss(model(input_ids=inputs, use_cache=False).logits,
                                                                          targets))


def build(name: str, folder: Path) -> Engine:
    lib, method = name.split("-")
    return emergence_engine(folder, method) if lib == "emergence" else hf_engine(folder, method)


# ------------------------------------------------------------------------------------ speed
QUIET = 0.1  # a round is quiet when other jobs used under 10% of the cores during it


class CpuClock:
    """Wall time since creation, and the share of all cores that other processes used meanwhile
    (all busy time in /proc/stat less this process's own CPU time)."""

    def __init__(self) -> None:
        self.wall, self.own, self.busy = time.perf_counter(), time.process_time(), self._busy()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def read(self) -> tuple[float, float]:
        wall = time.perf_counter() - self.wall
        other = (self._busy() - self.busy) - (time.process_time() - self.own)
        return wall, max(0.0, other / ((os.cpu_count() or 1) * wall))


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def profile_step(engine: Engine, inputs, targets) -> dict:
    """One step under torch.profiler: seconds, the matrix products' share, the heaviest ops."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        engine.step(inputs, targets)
        wall = time.perf_counter() - started
    ops = sorted(((e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()), key=lambda o: -o[1])
    total = sum(o[1] for o in ops)
    gemm = sum(o[1] for o in ops if o[0] in GEMM_OPS)
    return {"wall_s": wall, "self_cpu_s": total, "gemm_s": gemm, "gemm_share": gemm / total,
            "gemm_calls": sum(o[2] for o in ops if o[0] in GEMM_OPS), "other_s": total - gemm,
            "top_ops": [{"op": k, "self_s": round(t, 4), "calls": c} for k, t, c in ops[:10]]}


def child_command(mode: str, name: str, folder: Path, args, steps: int | None = None) -> list[str]:
    """This script run as one engine (`--engine`) or one memory configuration (`--one`) on the
    model in `folder`, with the run's batch, context, steps and threads."""
    cmd = [sys.executable, str(Path(__file__).resolve()), mode, name, "--folder", str(folder),
           "--batch", str(args.batch), "--context", str(args.context), "--warmup", str(args.warmup),
           "--steps", str(args.steps if steps is None else steps), "--threads", str(args.threads)]
    cmd += ["--layers", str(args.layers)] if args.layers else []
    cmd += ["--vocab", str(args.vocab)] if args.vocab else []
    return cmd + (["--steps-only"] if steps is not None else [])


class Worker:
    """One engine in its own process (`--engine NAME`), built once and stepped on request: each
    library runs with the heap and allocator state of its own steps only, as a user's process
    would (in one shared process, one engine's frees decide where the next one's tensors land,
    and whether their pages must be faulted in again). Lines of JSON over the pipes."""

    def __init__(self, name: str, folder: Path, args) -> None:
        self.name = name
        self.process = subprocess.Popen(child_command("--engine", name, folder, args), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.built = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker ended (exit {self.process.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def serve_engine(name: str, folder: Path, args) -> None:
    """The worker's side: build, warm up, say so; then "step" (S timed steps), "profile", or end of input."""
    config = config_for(args.layers, args.vocab)
    inputs, targets = make_batch(config.vocab_size, args.batch, args.context)
    started = time.perf_counter()
    engine = build(name, folder)
    first = engine.step(inputs, targets)
    for _ in range(args.warmup - 1):
        engine.step(inputs, targets)
    print(json.dumps({"trainable": engine.trainable, "step0_loss": first,
                      "seconds": time.perf_counter() - started}), flush=True)
    for command in sys.stdin:
        if command.strip() == "step":
            clock = CpuClock()
            for _ in range(args.steps):
                engine.step(inputs, targets)
            wall, other = clock.read()
            print(json.dumps({"wall": wall, "other": other}), flush=True)
        elif command.strip() == "profile":
            print(json.dumps(profile_step(engine, inputs, targets)), flush=True)


def speed(folder: Path, args, config) -> dict:
    peak_before = matmul_gflops()
    print(f"fp32 2048^3 matmul: {peak_before:.0f} GFLOP/s", flush=True)
    tokens = args.batch * args.context
    workers, first_loss = {}, {}
    for name in ENGINES:
        workers[name] = Worker(name, folder, args)
        built = workers[name].built
        first_loss[name] = built["step0_loss"]
        print(f"built {name} in its own process ({built['trainable']:,} trainable parameters), step-0 loss "
              f"{first_loss[name]:.4f}, {args.warmup} warm-up step(s) in {built['seconds']:.1f} s", flush=True)
    samples: dict[str, list[float]] = {n: [] for n in ENGINES}
    others: dict[str, list[float]] = {n: [] for n in ENGINES}
    for r in range(args.rounds):
        for name in ENGINES if r % 2 == 0 else ENGINES[::-1]:
            timed = workers[name].ask("step")
            samples[name].append(tokens * args.steps / timed["wall"])
            others[name].append(timed["other"])
            print(f"round {r + 1}/{args.rounds} {name}: {samples[name][-1]:.1f} tok/s "
                  f"(other jobs used {100 * timed['other']:.0f}% of the cores)", flush=True)
    profiles = {}
    if args.profile:  # where a LoRA step's time goes, one step each (after the timed rounds)
        for name in ("emergence-lora", "peft-lora"):
            profiles[name] = workers[name].ask("profile")
            print(f"profiled {name}: {profiles[name]['wall_s']:.1f} s, matrix products "
                  f"{100 * profiles[name]['gemm_share']:.0f}% of the op time", flush=True)
    for worker in workers.values():
        worker.close()
    peak_after = matmul_gflops()
    print(f"fp32 2048^3 matmul: {peak_after:.0f} GFLOP/s", flush=True)
    medians = {n: statistics.median(s) for n, s in samples.items()}

    def ratio(a: str, b: str, quiet: bool = False) -> float | None:
        pairs = [(x / y) for x, y, oa, ob in zip(samples[a], samples[b], others[a], others[b])
                 if not quiet or max(oa, ob) < QUIET]
        return statistics.median(pairs) if pairs else None

    quiet = {n: [x for x, o in zip(samples[n], others[n]) if o < QUIET] for n in ENGINES}
    flops = {n: flops_per_token(config, args.context, n.split("-")[1]) for n in ENGINES}
    peak = max(peak_before, peak_after)
    return {"tokens_per_step": tokens, "tok_s": medians, "tok_s_range": {n: [min(s), max(s)] for n, s in samples.items()},
            "rounds": samples, "rounds_other_jobs_cpu_share": others,
            "tok_s_quiet_rounds": {n: statistics.median(q) if q else None for n, q in quiet.items()},
            "quiet_rounds": {n: len(q) for n, q in quiet.items()},
            "step0_loss": first_loss,
            "matmul_gflops": {"before": peak_before, "after": peak_after},
            "flops_per_token": flops, "gflops": {n: medians[n] * flops[n] / 1e9 for n in ENGINES},
            "utilization_of_matmul_peak": {n: medians[n] * flops[n] / 1e9 / peak for n in ENGINES},
            "ratios": {"lora_emergence_vs_peft": ratio("emergence-lora", "peft-lora"),
                       "full_emergence_vs_transformers": ratio("emergence-full", "transformers-full"),
                       "emergence_lora_vs_full": ratio("emergence-lora", "emergence-full"),
                       "peft_lora_vs_transformers_full": ratio("peft-lora", "transformers-full")},
            "ratios_quiet_rounds": {"lora_emergence_vs_peft": ratio("emergence-lora", "peft-lora", True),
                                    "full_emergence_vs_transformers": ratio("emergence-full", "transformers-full",
                                                                            True)},
            "profile": profiles}


# ----------------------------------------------------------------------------------- memory
def one(config: str, folder: Path, args) -> dict:
    """One memory configuration in this (fresh) process; returns its figures."""
    import torch

    import emergence.adapters.lora  # noqa: F401  (imports counted in the baseline)
    import emergence.quant.linear  # noqa: F401
    from emergence.kernels import gemv_extension
    from emergence.quant.linear import model_bytes, quantized_modules

    torch.set_num_threads(args.threads)
    gemv_extension()  # the native dequantizer, loaded before the baseline like the other libraries
    baseline = status_kib("VmRSS")
    if config in ("lora-fp32", "lora-fp32-ckpt"):
        engine = emergence_engine(folder, "lora")
    elif config in ("qlora-nf4", "qlora-nf4-ckpt"):
        engine = emergence_engine(folder, "lora", quantize="nf4")
    elif config == "qlora-nf4-saved":
        engine = emergence_engine(folder.with_name(folder.name + "-nf4"), "lora")
    else:
        engine = emergence_engine(folder, "full")
    model = engine.model
    model.checkpoint_activations = config.endswith("-ckpt")
    inputs, targets = make_batch(model.config.vocab_size, args.batch, args.context)
    gc.collect()
    before, before_file = status_kib("VmRSS"), status_kib("RssFile")
    build_peak = status_kib("VmHWM")  # this process image's peak so far (loading, quantizing)
    reset = reset_peak()

    # The first step, with the tensors autograd saves for the backward counted (by storage, once;
    # the parameters and buffers excluded: they are the model, not activations) among those still
    # held when the forward ends: a graph built and freed inside it (each slice of the sliced
    # loss) saves tensors for a moment only.
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    held: list[tuple[weakref.ref, int, int]] = []
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            held.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
        return t

    def count_held() -> None:
        saved.update({ptr: nbytes for ref, ptr, nbytes in held if ref() is not None})

    losses, seconds, peaks = [], [], []
    for i in range(args.steps if args.steps_only else args.warmup + args.steps):
        started = time.perf_counter()
        # (the forward's saves only: a checkpointed block's recomputation in the backward saves
        # its inside again for a moment, which is not what the forward keeps)
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else None
        losses.append(engine.step(inputs, targets, hooks, count_held if i == 0 else None))
        seconds.append(time.perf_counter() - started)
        peaks.append(status_kib("VmHWM") / 1024)
    state = sum(t.numel() * t.element_size() for s in engine.optimizer.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    quantized = quantized_modules(model)
    embedding = model.tok_embeddings.weight
    training_peak = status_kib("VmHWM")
    return {"config": config, "steps": len(losses), "losses": losses, "step_seconds": seconds,
            "peak_after_each_step_mib": peaks if reset else None,
            "rss_baseline_mib": baseline / 1024, "rss_before_training_mib": before / 1024,
            "rss_file_before_training_mib": before_file / 1024,
            "rss_file_after_training_mib": status_kib("RssFile") / 1024,
            "peak_build_mib": build_peak / 1024,
            "peak_rss_mib": max(build_peak, training_peak) / 1024,
            "peak_training_mib": training_peak / 1024 if reset else None,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_training_mib": status_kib("VmRSS") / 1024,
            "model_mib": model_bytes(model) / MIB,
            "projection_weights_mib": (sum(m.nbytes() for m in quantized.values()) if quantized else
                                       sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                           if n.endswith("_proj.weight") or n.endswith("_proj.base.weight"))) / MIB,
            "embedding_mib": embedding.numel() * embedding.element_size() / MIB,
            "trainable_params": engine.trainable, "grad_and_adam_mib": (state + 4 * engine.trainable) / MIB,
            "saved_activations_mib": sum(saved.values()) / MIB,
            "logits_mib": args.batch * args.context * model.config.vocab_size * 4 / MIB}


def memory(folder: Path, args, configs: list[str], env_extra: dict[str, str] | None = None,
           steps: int | None = None) -> dict:
    """Each configuration in its own process; steps: that many steps in all (default warm-up + steps)."""
    out = {}
    env = {**os.environ, **(env_extra or {})}
    label = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items())
    for config in configs:
        started = time.perf_counter()
        done = subprocess.run(child_command("--one", config, folder, args, steps), capture_output=True, text=True,
                              env=env)
        if done.returncode != 0:
            raise RuntimeError(f"--one {config} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["rest_mib"] = (row["peak_rss_mib"] - row["rss_baseline_mib"] - row["model_mib"]
                           - row["saved_activations_mib"] - row["grad_and_adam_mib"])
        out[config] = row
        print(f"memory {config}{' (' + label + ')' if label else ''}: peak {row['peak_rss_mib']:.0f} MiB "
              f"(loading {row['peak_build_mib']:.0f}, before training {row['rss_before_training_mib']:.0f}, "
              f"baseline {row['rss_baseline_mib']:.0f}), steps {', '.join(f'{t:.1f}' for t in row['step_seconds'])} s; "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    ratios = {}
    if "lora-fp32" in out:
        lora = out["lora-fp32"]
        for config in out:
            if config == "lora-fp32":
                continue
            row = out[config]
            ratios[f"{config}_vs_lora_fp32_peak"] = row["peak_rss_mib"] / lora["peak_rss_mib"]
            ratios[f"{config}_vs_lora_fp32_peak_above_baseline"] = (
                (row["peak_rss_mib"] - row["rss_baseline_mib"]) / (lora["peak_rss_mib"] - lora["rss_baseline_mib"]))
            ratios[f"{config}_vs_lora_fp32_model_bytes"] = row["model_mib"] / lora["model_mib"]
    return {"configs": out, "ratios": ratios, "env": env_extra or {}}


# ------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per engine and round (memory: after warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the preset's (smoke runs)")
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary than the preset's (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-configs", default=",".join(DEFAULT_MEMORY),
                        help=f"of {', '.join(MEMORY_CONFIGS)}")
    parser.add_argument("--malloc", default=EXACT_MALLOC,
                        help="the env of the second memory pass (lora-fp32 and qlora-nf4), or 'none'")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiled LoRA steps")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 layers, 8192-row vocabulary, batch 2 x 64, 1 round")
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", choices=MEMORY_CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--steps-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one(args.one, Path(args.folder), args)))
        return 0
    if args.engine:
        serve_engine(args.engine, Path(args.folder), args)
        return 0
    if args.quick:
        args.layers, args.vocab, args.batch, args.context, args.rounds, args.steps, args.warmup = 2, 8192, 2, 64, 1, 1, 1
    sys.path.insert(0, str(ROOT / "bench"))
    from provenance import result_path
    from provenance import commit  # the library's (src/) state: a run's own result files don't dirty it

    out = ROOT / (args.out or ("bench/results/finetune_quick.json" if args.quick else result_path("finetune")))

    config = config_for(args.layers, args.vocab)
    result = {"command": " ".join(["python", "bench/bench_finetune.py"] + sys.argv[1:]), "commit": commit(),
              "date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "model": {"preset": PRESET, "layers": config.n_layer, "n_embd": config.n_embd,
                        "vocab_size": config.vocab_size, "parameters": config.num_parameters(),
                        "weights": "random, matrices N(0, 0.02), norms 1", "dtype": "fp32"},
              "batch": args.batch, "context": args.context, "warmup": args.warmup, "steps": args.steps,
              "rounds": args.rounds, "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "targets": HF_TARGETS},
              "optimizer": f"torch.optim.AdamW(trainable parameters, lr={LR})",
              "step": "loss (emergence: model(inputs, targets=targets), the sliced head loss; transformers: "
                      "next_token_loss(model(input_ids=inputs).logits, targets)); loss.backward(); AdamW step; "
                      "zero_grad(set_to_none=True)",
              "data": "seeded random token ids"}
    load_start = [round(x, 2) for x in os.getloadavg()]  # other jobs on the cores, over 1, 5, 15 minutes
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "smollm2"
        write_model(folder, config)
        write_nf4(folder, Path(tmp) / "smollm2-nf4")
        gc.collect()
        print(f"{PRESET} shapes ({config.n_layer} layers, {config.vocab_size} vocabulary rows, "
              f"{config.num_parameters():,} parameters) written in {time.perf_counter() - started:.0f} s, "
              f"batch {args.batch} x {args.context}", flush=True)
        if not args.skip_memory:  # first, while this process is small (a child starts as its copy)
            result["memory"] = memory(folder, args, args.memory_configs.split(","))
            if args.malloc and args.malloc != "none":
                key, _, value = args.malloc.partition("=")
                wanted = [c for c in ("lora-fp32", "qlora-nf4", "lora-fp32-ckpt", "qlora-nf4-ckpt")
                          if c in args.memory_configs.split(",")]
                # One step each: a LoRA step's peak is the first one's (Adam's state is the adapters' only).
                result["memory_exact_malloc"] = memory(folder, args, wanted, {key: value}, steps=1)
        if not args.skip_speed:
            result["speed"] = speed(folder, args, config)
    result["targets"] = targets(result)
    if commit() != result["commit"]:  # the checkout changed during the run
        result["commit_at_end"] = commit()
    result["load_average"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    report(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {out} ({result['seconds']:.0f} s)")
    return 0


def targets(result: dict) -> dict:
    out = {}
    if "speed" in result:
        ratio = result["speed"]["ratios"]["lora_emergence_vs_peft"]
        out["lora_speed_vs_peft"] = {"target": ">= 1.5", "measured": round(ratio, 3), "met": ratio >= 1.5}
        quiet = result["speed"]["ratios_quiet_rounds"]["lora_emergence_vs_peft"]
        if quiet is not None:
            out["lora_speed_vs_peft"]["measured_quiet_rounds"] = round(quiet, 3)
    if "memory" in result and "qlora-nf4_vs_lora_fp32_peak" in result["memory"]["ratios"]:
        ratio = result["memory"]["ratios"]["qlora-nf4_vs_lora_fp32_peak"]
        out["qlora_nf4_peak_vs_lora_fp32"] = {"target": "<= 0.45", "measured": round(ratio, 3), "met": ratio <= 0.45}
        exact = result.get("memory_exact_malloc", {}).get("ratios", {}).get("qlora-nf4_vs_lora_fp32_peak")
        if exact is not None:
            out["qlora_nf4_peak_vs_lora_fp32"]["measured_exact_malloc"] = round(exact, 3)
    checkpointed = result.get("memory", {}).get("ratios", {}).get("qlora-nf4-ckpt_vs_lora_fp32_peak")
    if checkpointed is not None:  # the QLoRA recipe (activation checkpointing) against plain fp32 LoRA
        out["qlora_nf4_checkpointed_peak_vs_lora_fp32"] = {"target": "<= 0.45", "measured": round(checkpointed, 3),
                                                           "met": checkpointed <= 0.45}
        exact = result.get("memory_exact_malloc", {}).get("ratios", {}).get("qlora-nf4-ckpt_vs_lora_fp32_peak")
        if exact is not None:
            out["qlora_nf4_checkpointed_peak_vs_lora_fp32"]["measured_exact_malloc"] = round(exact, 3)
    return out


def report(result: dict) -> None:
    if "speed" in result:
        s = result["speed"]
        print(f"\nfine-tuning speed, fp32, {result['batch']} x {result['context']} tokens per step, "
              f"{result['machine']['threads']} threads; fp32 2048^3 matmul {s['matmul_gflops']['before']:.0f} "
              f"GFLOP/s before the rounds, {s['matmul_gflops']['after']:.0f} after")
        print("| engine | tok/s (median) | range | GFLOP/s | of matmul peak | quiet rounds: n, median tok/s | "
              "step-0 loss |")
        print("|---|---|---|---|---|---|---|")
        for n, v in s["tok_s"].items():
            lo, hi = s["tok_s_range"][n]
            q = s["tok_s_quiet_rounds"][n]
            print(f"| {n} | {v:.1f} | {lo:.1f}-{hi:.1f} | {s['gflops'][n]:.1f} | "
                  f"{100 * s['utilization_of_matmul_peak'][n]:.0f}% | {s['quiet_rounds'][n]}, "
                  f"{'-' if q is None else f'{q:.1f}'} | {s['step0_loss'][n]:.4f} |")
        fmt = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        r, rq = s["ratios"], s["ratios_quiet_rounds"]
        print(f"LoRA emergence / peft {fmt(r['lora_emergence_vs_peft'])} (quiet rounds "
              f"{fmt(rq['lora_emergence_vs_peft'])}; target >= 1.5x); full emergence / transformers "
              f"{fmt(r['full_emergence_vs_transformers'])} (quiet rounds {fmt(rq['full_emergence_vs_transformers'])}); "
              "medians of same-round ratios")
        for n, p in s["profile"].items():
            print(f"{n} profiled step: {p['self_cpu_s']:.2f} s of op time, matrix products {p['gemm_s']:.2f} s "
                  f"({100 * p['gemm_share']:.0f}%, {p['gemm_calls']} calls), the rest {p['other_s']:.2f} s")
    for key in ("memory", "memory_exact_malloc"):
        if key not in result:
            continue
        m = result[key]
        env = " ".join(f"{k}={v}" for k, v in m["env"].items())
        print(f"\npeak memory, {result['batch']} x {result['context']} tokens per step"
              f"{', ' + env if env else ', default glibc malloc'} (MiB)")
        print("| config | peak RSS | loading peak | before training (file-backed) | baseline | model | activations saved | "
              "grads + Adam | rest | step s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for n, c in m["configs"].items():
            print(f"| {n} | {c['peak_rss_mib']:.0f} | {c['peak_build_mib']:.0f} | {c['rss_before_training_mib']:.0f} "
                  f"({c['rss_file_before_training_mib']:.0f}) | "
                  f"{c['rss_baseline_mib']:.0f} | {c['model_mib']:.0f} | {c['saved_activations_mib']:.0f} | "
                  f"{c['grad_and_adam_mib']:.0f} | {c['rest_mib']:.0f} | {c['step_seconds'][-1]:.1f} |")
        print("; ".join(f"{k} {v:.2f}x" for k, v in m["ratios"].items()))
    for name, t in result.get("targets", {}).items():
        extra = "".join(f", {k.removeprefix('measured_').replace('_', ' ')} {v}" for k, v in t.items()
                        if k.startswith("measured_"))
        print(f"target {name}: {t['target']}, measured {t['measured']}{extra}: {'met' if t['met'] else 'missed'}")


if __name__ == "__main__":
    sys.exit(main())
