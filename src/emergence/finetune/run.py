"""Instruction tuning through the pretraining loop: full, LoRA, DoRA and QLoRA.

    JSONL rows (data.py) -> rendered, masked examples -> [packed] -> held-out split
    MODEL (anything emergence.load takes) -> [quantized base] -> [adapters] -> train.run_loop

The loop is pretraining's (`train.trainer.run_loop`): atomic checkpoints with exact resume,
the progress line, metrics CSV/JSONL, DDP/FSDP2, bf16 autocast and torch.compile. A run
adds what differs: its rows, which tensors train, what a checkpoint keeps (only the trained
ones for adapters: the base is loaded again on resume), and what it writes at the end: a
PEFT adapter folder (OUT/adapter) or a whole model (OUT/model), each with the chat template
the rows were rendered with.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..adapters.lora import LoraSpec, add_adapter, mark_only_adapters_trainable
from ..adapters.peft_format import save_adapter
from ..chat import ChatTemplate, find_model_template, resolve_chat_template
from ..errors import InvalidArgument
from ..model import Transformer, empty_model
from ..sampling import SamplingParams
from ..train.trainer import (SeededOrder, TrainConfig, TrainResult, _check_same_run, _Dist, _end_distributed,
                             _init_distributed, run_loop)
from . import data as sft

METHODS = ("lora", "dora", "full")
QUANTIZE = ("nf4", "int4", "int8", "q4_0")  # weight formats a frozen base may be kept in (QLoRA)


@dataclass
class FinetuneConfig:
    """What to fine-tune on what, and how (the loop's own settings are a TrainConfig)."""

    model: str
    data: list[str]
    method: str = "lora"  # METHODS
    quantize: str | None = None  # QUANTIZE: keep the frozen base in this format (adapters only)
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    rslora: bool = False
    chat_template: str | None = None  # built-in name, Jinja file or text; default: the model's own
    pack: bool = False
    truncate: bool = False  # rows longer than the context: cut (True) or dropped (False)
    val_fraction: float = 0.05
    epochs: float = 1.0  # passes over the training rows, when the TrainConfig's max_steps is 0
    sample_rows: int = 2  # held-out prompts answered at each sample point

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InvalidArgument(f"unknown fine-tuning method {self.method!r}; use {', '.join(METHODS)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise InvalidArgument(f"--quantize takes {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.quantize is not None and self.method == "full":
            raise InvalidArgument("a quantized base is frozen: --quantize goes with --lora or --dora, not --full")
        if not self.data:
            raise InvalidArgument("finetune needs --data FILE.jsonl (one or more)")
        check_run_settings(self)

    def spec(self) -> LoraSpec:
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets, rslora=self.rslora,
                        dora=self.method == "dora")


def check_run_settings(run) -> None:
    """The settings a fine-tuning or preference run shares (FinetuneConfig, align's
    PreferenceConfig): epochs, the held-out fraction, and for adapters their spec and alpha."""
    if run.epochs <= 0:
        raise InvalidArgument(f"--epochs must be positive, got {run.epochs}")
    if not 0 <= run.val_fraction < 1:
        raise InvalidArgument(f"--val-fraction must be in [0, 1), got {run.val_fraction}")
    if run.method != "full":
        run.spec().validate()
        if not run.alpha > 0:  # (scaling alpha/r: 0 trains nothing, NaN everything into NaN)
            raise InvalidArgument(f"--alpha must be positive, got {run.alpha}")


def load_template(model_path: Path, choice: str | None) -> ChatTemplate:
    """--chat-template (a built-in name, a Jinja file, or Jinja text), else the model's own."""
    if choice is not None and Path(choice).is_file():
        choice = Path(choice).read_text(encoding="utf-8")
    return resolve_chat_template(find_model_template(model_path), override=choice, missing="error")


class SFTBatches:
    """Training rows in a seeded order by sample number (exact resume, any rank), held-out rows by
    index: what the loop's `batches` must answer."""

    def __init__(self, train_rows: list, val_rows: list, tc: TrainConfig, fixed_length: int | None) -> None:
        self.rows, self.val_rows, self.tc, self.length = train_rows, val_rows, tc, fixed_length
        self.order = SeededOrder(len(train_rows), tc.seed)
        self.val = _Count(len(val_rows)) if val_rows else None

    def train_batch(self, first: int) -> sft.SFTBatch:
        return sft.batch([self.rows[self.order[i]] for i in range(first, first + self.tc.batch_size)], self.length)

    def eval_batch(self, ids) -> sft.SFTBatch:
        return sft.batch([self.val_rows[int(i)] for i in ids], self.length)


@dataclass
class _Count:
    num_windows: int  # (the name evaluate() reads: held-out rows here, windows in pretraining)


class FinetuneRun:
    """What fine-tuning puts into the loop (see train.trainer.PretrainRun for the protocol)."""

    kind = "finetune"

    def __init__(self, fc: FinetuneConfig, tc: TrainConfig, env: _Dist, resume: bool) -> None:
        from ..api import load, require_decoder_only
        from ..store import resolve_model
        from ..train.checkpoint import load_checkpoint

        fc.validate()
        self.fc, self.tc = fc, tc
        out = Path(tc.out)
        self.state = None
        if resume:
            self.state = load_checkpoint(out)
            saved, now = self.state.get("finetune_config"), asdict(fc)
            if saved is None:
                raise InvalidArgument(f"{out} holds a pretraining run, not a fine-tuning one")
            if saved != now:
                changed = ", ".join(f"{k} was {saved.get(k)!r}, now {v!r}" for k, v in now.items() if saved.get(k) != v)
                raise InvalidArgument(f"cannot resume the run in {out} with different fine-tuning settings: {changed}")
        elif (out / "checkpoint.pt").exists():
            raise InvalidArgument(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        source = resolve_model(fc.model)
        self.lm = load(source, device="cpu", dtype="fp32")
        require_decoder_only(self.lm.config, "emergence finetune")
        self.config, self.tokenizer = self.lm.config, self.lm.tokenizer
        self.template = load_template(source.path, fc.chat_template)
        self.context = tc.context or self.config.block_size
        if self.context > self.config.block_size:
            raise InvalidArgument(f"context {self.context} exceeds the model's block_size {self.config.block_size}")
        examples, self.report = sft.load_examples(fc.data, self.tokenizer, self.template, context=self.context,
                                                  truncate=fc.truncate)
        train_rows, self.val_examples = sft.split_held_out(examples, fc.val_fraction, tc.seed)
        if fc.pack:
            train_rows, val_rows = sft.pack(train_rows, self.context), sft.pack(self.val_examples, self.context)
        else:
            val_rows = self.val_examples
        # Packed rows are padded to the context (one shape every step); others to the batch's longest.
        self.batches = SFTBatches(train_rows, val_rows, tc, self.context if fc.pack else None)
        if not fc.pack:  # tokens per step are counted as rows x this length (an upper bound)
            self.context = max(len(r.ids) for r in train_rows) - 1
        if tc.max_steps == 0:  # --epochs decides
            rows_per_step = tc.batch_size * env.world * tc.grad_accum
            tc.max_steps = max(1, math.ceil(fc.epochs * len(train_rows) / rows_per_step))
        if self.state is not None:
            _check_same_run(TrainConfig(**self.state["train_config"]), tc)
            if self.state["step"] >= tc.max_steps:
                raise InvalidArgument(f"the run in {out} is finished at step {self.state['step']}; give a larger "
                                      "--max-steps to train it further")
        self.fingerprint = f"{self.tokenizer.fingerprint()}:{self._data_hash()}"
        self.checkpoint_extra = {"finetune_config": asdict(fc)}
        self.result_folder = "model" if fc.method == "full" else "adapter"
        self.trainable = (0, 0)

    def _data_hash(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for path in self.fc.data:
            digest.update(Path(path).read_bytes())
        return digest.hexdigest()[:16]

    def build_model(self, device: torch.device, bf16: bool) -> Transformer:
        torch.manual_seed(self.tc.seed)  # adapter dropout draws from the global RNG: seeded, as pretraining's
        model = self.lm.model.float()
        if self.fc.quantize is not None:
            from ..quant.linear import quantize_model

            quantize_model(model, self.fc.quantize)
        if self.fc.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
            n = sum(p.numel() for p in model.parameters())
            self.trainable = (n, n)
        else:
            add_adapter(model, self.fc.spec(), generator=torch.Generator().manual_seed(self.tc.seed))
            self.trainable = mark_only_adapters_trainable(model)
        return model.to(device)

    def describe(self, model: torch.nn.Module) -> str:
        fc, (trainable, total), rep = self.fc, self.trainable, self.report
        how = "full fine-tuning" if fc.method == "full" else (
            f"{'DoRA' if fc.method == 'dora' else 'LoRA'} r={fc.r} alpha={fc.alpha:g}"
            f"{' (rsLoRA)' if fc.rslora else ''}{f' on a {fc.quantize} base' if fc.quantize else ''}")
        lost = "".join(f", {rep[k]} {k}" for k in ("dropped", "truncated") if rep[k])
        packed = f", packed into {len(self.batches.rows)} rows" if fc.pack else ""
        return (f"finetune: {how}, {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
                f"{rep['rows'] - rep['dropped']} rows ({rep['trained_tokens']:,} trained tokens{lost}), "
                f"{len(self.val_examples)} held out{packed}")

    def sample(self, model: Transformer) -> str:
        """Answers to the first held-out prompts (greedy), each after its prompt's last line."""
        from ..generate import generate

        picks = self.val_examples[:self.fc.sample_rows]
        if not picks:
            return ""
        prompts = [ex.ids[:ex.mask.index(True)] if True in ex.mask else ex.ids for ex in picks]
        new = max(1, min(self.tc.sample_tokens, self.config.block_size - max(len(p) for p in prompts)))
        was_training = model.training
        model.eval()
        answers = generate(model, self.tokenizer, prompts, SamplingParams(
            temperature=0, max_new_tokens=new, stop=list(self.template.stop)), backend="eager")
        model.train(was_training)
        return " | ".join(f"{self.tokenizer.decode(p).strip().splitlines()[-1][-60:]} -> {a.text.strip()}"
                          for p, a in zip(prompts, answers))

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return trained_state(state, self.fc.method)

    def save(self, state: dict[str, torch.Tensor], folder: Path) -> None:
        save_trained(state, folder, self.fc.method, self.config, self.fc.spec(), self.fc.model, self.tokenizer)
        (folder / "chat_template.jinja").write_text(self.template.source, encoding="utf-8")
        (folder / "finetune_data.json").write_text(json.dumps(self.report, indent=2) + "\n")


def trained_state(state: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a run's state: everything (full), or the adapters' tensors only
    (the base is loaded again on resume)."""
    return state if method == "full" else {k: v for k, v in state.items() if ".adapters." in k}


def save_trained(state: dict[str, torch.Tensor], folder: Path, method: str, config, spec: LoraSpec, base: str,
                 tokenizer) -> None:
    """A run's result: the whole model in the HF layout with its tokenizer (full), or the PEFT
    adapter folder, the adapter tensors put on a weightless skeleton (the same for one process,
    DDP or FSDP)."""
    if method == "full":
        from ..weights.hf import save_hf

        plain = Transformer(config)
        plain.load_state_dict(state)
        save_hf(plain, folder)
        tokenizer.save(folder)
        return
    skeleton = empty_model(config)
    add_adapter(skeleton, spec, init=False)
    skeleton.load_state_dict(trained_state(state, method), strict=False, assign=True)
    save_adapter(skeleton, folder, base=base)


def finetune(fc: FinetuneConfig, tc: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Fine-tune (or continue, with resume=True) as fc and tc say; see the module docstring.
    A TrainConfig with max_steps 0 runs fc.epochs passes over the training rows."""
    steps_given = tc.max_steps
    tc.max_steps = max(tc.max_steps, 1)
    tc.validate()
    tc.max_steps = steps_given
    env, device = _init_distributed(tc.device)
    try:
        return run_loop(FinetuneRun(fc, tc, env, resume), tc, env, device)
    finally:
        _end_distributed(env)


def finetune_settings() -> set[str]:
    return {f.name for f in fields(FinetuneConfig)}
