"""What quantization costs in quality: perplexity on held-out text at every format, and how well
the token-embedding space (nearest neighbours by cosine similarity) survives each format.

    .venv/bin/python bench/quant_quality.py                       # the built-in model (stories260K)
    .venv/bin/python bench/quant_quality.py --model stories260K --model path/to/model   # several models
    .venv/bin/emergence prepare ../shared/data/tinystories/train ../shared/data/tinystories/valid \
        ../shared/data/tinyshakespeare ../shared/data/text --tokenizer emergence-6m \
        --out /tmp/e6m_shards --val-fraction 0.05               # emergence-6m's own train/val split
    .venv/bin/python bench/quant_quality.py --model stories260K --model emergence-6m \
        --eval-shards emergence-6m=/tmp/e6m_shards              # ... evaluated on its val split

1. Perplexity, on text the model was not trained on. Each model is evaluated on one of:

   a. TinyStories text (the default, for a model trained on the TinyStories train split, as
      stories260K was by llama2.c): the start of the TinyStories validation split
      (../shared/data/tinystories/valid), cut at a paragraph break after `--eval-chars`
      characters and tokenized by each model's own tokenizer. It is split into non-overlapping
      windows of the model's context; each window starts with BOS (or, for a tokenizer without
      one, the token before the window) and every text token is predicted exactly once.
      int4-gptq is calibrated on the start of the TinyStories *train* split (whole stories, BOS
      before each, as llama2.c trains), never on the evaluation text.
   b. Its own held-out split (`--eval-shards MODEL=DIR`, for a model trained with `emergence
      train`): the `val` split of the token shards `emergence prepare` wrote to DIR, the ids
      exactly as training saw them (documents joined by EOS, BOS only where the tokenizer adds
      one). The shards' tokenizer hash must equal the model tokenizer's fingerprint, else the
      script refuses. The stream is read as training reads it: non-overlapping windows of
      context + 1 tokens with stride context, the first token of the split context only, so
      every later token (EOS included) is predicted exactly once (the fp32 loss over the full
      windows alone, as training evaluates, is given too). int4-gptq is calibrated on
      the start of the same shards' *train* split, cut into sequences. A model whose training
      corpus holds the TinyStories validation text (TRAINED_ON_VALID_TEXT: emergence-6m) is
      refused without --eval-shards: that text is not held out for it.

   Perplexity = exp(mean next-token cross-entropy), computed from `model(input_ids)` logits
   cast to fp32. fp32, bf16 and fp16 cast the whole model; the other formats swap the linear
   layers with `emergence.quant.quantize_model` (embeddings, norms and a tied output head stay
   fp32). A layer whose shape a format cannot take (in_features not a multiple of its group or
   block) stays fp32 and is listed in the "kept fp32" column; so is an untied output head,
   which `quantize_model` keeps by default. Bytes are those of the linear layers' stored weight
   buffers (kept layers at their float size); bits/weight = 8 x bytes / weights.

2. Embedding space. The token-embedding matrix E (V x D) is quantized as if it were a linear
   weight (rows = tokens, groups/blocks along D) with each format's own quantizer
   (`FORMATS[fmt].from_linear(...).dequantize()`); for every token its 10 nearest neighbours
   by cosine similarity (itself excluded) are found in E and in the dequantized E, and the
   table gives the mean of |NN_before & NN_after| / 10 over all V tokens, and the relative
   Frobenius error ||E - E_q|| / ||E||.

Everything is deterministic (fixed slices, no sampling); torch runs on `--threads` CPU threads
(default 1: the model is tiny, and on a shared 2-core machine a second thread mostly waits).
Writes the tables to stdout and to docs/quantization.md (`--out ''` only prints); one progress
line per format goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import emergence
from emergence.data import TokenShards
from emergence.data.shards import expand_inputs
from emergence.errors import CheckpointError, InvalidArgument
from emergence.evaluate import distinct_rows, nearest_neighbours, neighbour_overlap, perplexity, relative_error
from emergence.gguf import quants as ggml
from emergence.quant import FORMATS, GGML_FORMATS, linear_weight_bytes, quantize_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATA = SHARED / "tinystories"
VALID_TEXT = DATA / "valid" / "hf_TinyStories_validation.head.txt"
TRAIN_TEXT = DATA / "train" / "TinyStories-train.head2MiB.txt"
DOC = ROOT / "docs" / "quantization.md"
DEFAULT_MODEL = "stories260K"

EVAL_CHARS = 100_000  # about 50k tokens with stories260K's 512-token vocabulary
CALIB_SEQS = 32
CALIB_LEN = 512
NEIGHBOURS = 10
DUPLICATE_COS = 0.999  # rows at least this similar to another row count as near-duplicates
STORY_END = "<|endoftext|>"
# Models whose training corpus holds the TinyStories validation text: for them it is not held
# out, so they are evaluated on their own validation split only (--eval-shards), the one
# `emergence prepare` makes of these inputs with this fraction (bench/train_models.py's CORPUS).
TRAINED_ON_VALID_TEXT = {
    "emergence-6m": {"inputs": [str(SHARED / d) for d in ("tinystories/train", "tinystories/valid",
                                                          "tinyshakespeare", "text")], "val_fraction": 0.05},
}


def training_prepare(name: str) -> list[str]:
    """The `emergence prepare` command that remakes the train/val split a model above was trained on."""
    corpus = TRAINED_ON_VALID_TEXT[name]
    return ["emergence", "prepare", *corpus["inputs"], "--tokenizer", name, "--out", "DIR",
            "--val-fraction", str(corpus["val_fraction"])]


# ------------------------------------------------------------------------------- the formats
@dataclass(frozen=True)
class Spec:
    """One row: a float dtype for the whole model, or a `quantize_model` format and options."""

    name: str
    dtype: torch.dtype | None = None  # fp32 / bf16 / fp16 rows: cast the whole model
    fmt: str | None = None  # quantize_model's format name
    options: dict = field(default_factory=dict)  # group_size, act_bits

    @property
    def base(self) -> str | None:
        """The module format (int4-gptq -> int4)."""
        return None if self.fmt is None else self.fmt.removesuffix("-gptq")

    @property
    def module_options(self) -> dict:
        """Options of the module class (FORMATS[base]) for this spec."""
        if self.base in GGML_FORMATS:
            return {"ggml_format": self.base}
        return {k: v for k, v in self.options.items() if k == "group_size"}

    @property
    def unit(self) -> int | None:
        """The number in_features must be a multiple of (int4 group, ggml block), if any."""
        if self.base == "int4":
            return self.options["group_size"]
        if self.base in GGML_FORMATS:
            return ggml.BLOCK_SIZES[GGML_FORMATS[self.base]][0]
        return None


SPECS: list[Spec] = [
    Spec("fp32", dtype=torch.float32),
    Spec("bf16", dtype=torch.bfloat16),
    Spec("fp16", dtype=torch.float16),
    Spec("int8", fmt="int8"),
    *(Spec(f"int4-g{g}", fmt="int4", options={"group_size": g}) for g in (32, 64, 128)),
    *(Spec(f"int4-gptq-g{g}", fmt="int4-gptq", options={"group_size": g}) for g in (32, 64, 128)),
    Spec("nf4", fmt="nf4"),
    Spec("ternary", fmt="ternary"),
    Spec("ternary-a8", fmt="ternary", options={"act_bits": 8}),
    *(Spec(name, fmt=name) for name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}


# ------------------------------------------------------------------------------------ data
def eval_text(n_chars: int = EVAL_CHARS, path: Path = VALID_TEXT) -> str:
    """The first `n_chars` characters of the validation text, cut back to the last paragraph
    break (the file separates paragraphs and stories by blank lines)."""
    text = path.read_text(encoding="utf-8")
    if n_chars >= len(text):
        return text.strip()
    cut = text.rfind("\n\n", 0, n_chars)
    return text[: cut if cut > 0 else n_chars].strip()


def eval_tokens(tokenizer, text: str) -> torch.Tensor:
    """(N,) token ids of the evaluation text, without BOS (windows add it)."""
    return torch.tensor(tokenizer.encode(text, add_bos=False), dtype=torch.long)


def train_stories(path: Path = TRAIN_TEXT) -> list[str]:
    """Complete stories of the train file (the cut-off story after the last separator is dropped)."""
    parts = path.read_text(encoding="utf-8").split(STORY_END)[:-1]
    return [p.strip() for p in parts if p.strip()]


def calibration_tokens(tokenizer, n_seqs: int = CALIB_SEQS, seq_len: int = CALIB_LEN,
                       path: Path = TRAIN_TEXT) -> tuple[torch.Tensor, int]:
    """(n_seqs, seq_len) token ids: train stories in file order, each with BOS first (when the
    tokenizer has one), concatenated and cut into sequences. Also returns the stories used."""
    need, ids, used = n_seqs * seq_len, [], 0
    for story in train_stories(path):
        ids.extend(tokenizer.encode(story, add_bos=tokenizer.bos_id is not None))
        used += 1
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InvalidArgument(f"the train text holds {len(ids)} tokens, fewer than {need} asked for calibration")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(n_seqs, seq_len), used


# ------------------------------------------------------------------------------ quantizing
def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers quantize_model considers: all but those sharing an embedding's weight."""
    tied = {id(mod.weight) for mod in model.modules() if isinstance(mod, nn.Embedding)}
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and id(mod.weight) not in tied}


def kept_layers(model: nn.Module, spec: Spec) -> dict[str, str]:
    """Qualified name -> why the layer stays in full precision under `spec`."""
    if spec.fmt is None:
        return {}
    kept = {}
    cls = FORMATS[spec.base]
    for name, linear in linear_layers(model).items():
        if name == "lm_head" or name.endswith(".lm_head"):
            kept[name] = "output head (quantize_model's default skip)"
            continue
        try:
            cls.check(linear.in_features, linear.out_features, what=name, **spec.module_options)
        except InvalidArgument as e:
            kept[name] = (f"in_features {linear.in_features} not a multiple of {spec.unit}" if spec.unit
                          else str(e))
    return kept


def build(model: nn.Module, spec: Spec, calibration: torch.Tensor | None = None) -> tuple[nn.Module | None, dict]:
    """A copy of `model` in `spec`'s format and the layers it keeps; None when no layer fits."""
    if spec.dtype is not None:
        return copy.deepcopy(model).to(spec.dtype), {}
    kept = kept_layers(model, spec)
    if len(kept) == len(linear_layers(model)):
        return None, kept
    options = dict(spec.options)
    if spec.fmt.endswith("-gptq"):
        options["calibration"] = calibration
    quantized = quantize_model(copy.deepcopy(model), spec.fmt, skip=tuple(kept), **options)
    return quantized, kept


def layer_pattern(names) -> str:
    """'layers.0.mlp.down_proj', 'layers.1.mlp.down_proj' -> 'layers.*.mlp.down_proj (x2)'."""
    counts: dict[str, int] = {}
    for name in names:
        key = re.sub(r"\.\d+\.", ".*.", name)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} (x{c})" if c > 1 else k for k, c in counts.items())


def describe_kept(kept: dict[str, str]) -> str:
    if not kept:
        return "none"
    by_reason: dict[str, list[str]] = {}
    for name, reason in kept.items():
        by_reason.setdefault(reason, []).append(name)
    return "; ".join(f"{layer_pattern(names)}: {reason}" for reason, names in by_reason.items())


# --------------------------------------------------------------------------- embedding space
def quantize_matrix(w: torch.Tensor, spec: Spec) -> tuple[torch.Tensor | None, float | None, str]:
    """(dequantized W (float32) or None, bits per weight, note) for W (V, D) under `spec`'s
    tensor quantizer, W taken as a linear weight (rows = tokens, groups along D)."""
    w = w.detach().float()
    if spec.dtype is not None:
        return w.to(spec.dtype).float(), torch.finfo(spec.dtype).bits, ""
    if spec.fmt.endswith("-gptq"):
        return None, None, "n/a: GPTQ needs the layer's input activations; an embedding lookup has none"
    cls = FORMATS[spec.base]
    try:
        cls.check(w.shape[1], w.shape[0], what="the embedding", **spec.module_options)
    except InvalidArgument:
        return None, None, f"n/a: D = {w.shape[1]} is not a multiple of {spec.unit}"
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    linear.weight.data.copy_(w)
    module = cls.from_linear(linear, **spec.module_options)
    bits = 8 * sum(t.numel() * t.element_size() for t in module.buffers()) / w.numel()
    note = "same matrix as ternary (8-bit activations do not change the weights)" if spec.options.get("act_bits") \
        else ""
    return module.dequantize().float(), bits, note


# ------------------------------------------------------------------------------- one model
@dataclass
class ModelReport:
    name: str
    source: str  # the name or path given to emergence.load
    description: str
    vocab: int
    distinct: int
    duplicate_bytes: int
    duplicate_unseen: int
    eval_chars: int
    eval_tokens: int
    calib_tokens: int
    calib_stories: int  # stories (text) or documents (shards) the calibration tokens reach into
    ppl_rows: list[dict]
    emb_rows: list[dict]
    seconds: float
    context: int = 0  # the model's block size: the evaluation windows' length
    shards: dict | None = None  # evaluated on a prepared val split: folder, hash, splits, sources
    bos_id: int | None = None  # the tokenizer's BOS (text windows start with it)


def evaluate(lm, name: str, specs: list[Spec], *, eval_chars: int = EVAL_CHARS, calib_seqs: int = CALIB_SEQS,
             shards: TokenShards | None = None, source: str | None = None, progress=None) -> ModelReport:
    """The tables for one model: on the TinyStories validation text, or with `shards` (their
    tokenizer checked to be the model's) on their val split, GPTQ calibrated on their train split."""
    started = time.perf_counter()
    model, tok, cfg = lm.model.eval(), lm.tokenizer, lm.config
    if shards is None:
        tokens, bos = eval_tokens(tok, eval_text(eval_chars)), tok.bos_id
    else:
        tokens, bos = shards.ids("val"), None  # the stream as it is: BOS only where the shards hold one
        if len(tokens) < 2:
            raise InvalidArgument(f"the val split of {shards.folder} holds {len(tokens)} tokens: nothing to predict")
    calib, stories = (None, 0)
    if any(s.fmt and s.fmt.endswith("-gptq") for s in specs):
        seq_len = min(CALIB_LEN, cfg.block_size)
        calib, stories = (calibration_tokens(tok, calib_seqs, seq_len) if shards is None
                          else shards.calibration(calib_seqs, seq_len))
    emb = model.tok_embeddings.weight.detach().float()
    nn_ref = nearest_neighbours(emb, NEIGHBOURS)
    distinct = distinct_rows(emb, DUPLICATE_COS)
    nn_ref_distinct = nearest_neighbours(emb[distinct], NEIGHBOURS)
    ppl_rows, emb_rows, base_ppl = [], [], None
    for i, spec in enumerate(specs):
        t0 = time.perf_counter()
        qmodel, kept = build(model, spec, calib)
        row = {"format": spec.name, "kept": describe_kept(kept)}
        if qmodel is None:
            row.update(ppl=None, note="no layer fits: all kept fp32")
        else:
            ppl, nll, n = perplexity(qmodel, tokens, context=cfg.block_size, bos_id=bos)
            tb, tn, qb, qn = linear_weight_bytes(qmodel)
            row.update(ppl=ppl, nll=nll, tokens=n, bytes=tb, weights=tn, bpw=8 * tb / tn,
                       qbpw=(8 * qb / qn if qn else (torch.finfo(spec.dtype).bits if spec.dtype else None)),
                       qweights=qn if spec.fmt else None)
            if spec.name == "fp32":
                base_ppl = ppl
                rest = (len(tokens) - 1) % cfg.block_size
                if shards is not None and rest and len(tokens) > cfg.block_size + 1:
                    # Training's evaluation reads full windows only: the mean without the last, partial one.
                    last = perplexity(qmodel, tokens[len(tokens) - 1 - rest:], context=cfg.block_size, bos_id=None)
                    full = (nll * n - last[1] * last[2]) / (n - last[2])
                    row["full_windows"] = (full, math.exp(full), (n - last[2]) // cfg.block_size)
        ppl_rows.append(row)
        wq, bits, note = quantize_matrix(emb, spec)
        erow = {"format": spec.name, "note": note, "bpw": bits}
        if wq is not None:
            erow.update(overlap=neighbour_overlap(nn_ref, nearest_neighbours(wq, NEIGHBOURS)),
                        rel_err=relative_error(emb, wq),
                        overlap_distinct=neighbour_overlap(nn_ref_distinct, nearest_neighbours(wq[distinct], NEIGHBOURS)))
        emb_rows.append(erow)
        if progress is not None:
            done = time.perf_counter() - started
            eta = done / (i + 1) * (len(specs) - i - 1)
            ppl_s = f"ppl {row['ppl']:.4f}" if row["ppl"] is not None else "ppl n/a"
            progress(f"[{name}] {i + 1}/{len(specs)} {spec.name:<14} {ppl_s}  "
                     f"({time.perf_counter() - t0:.1f}s; elapsed {done:.0f}s, ETA {eta:.0f}s)")
    for row in ppl_rows:
        row["rel"] = None if row["ppl"] is None or base_ppl is None else row["ppl"] / base_ppl - 1
    desc = (f"n_layer {cfg.n_layer}, d_model {cfg.n_embd}, vocab {cfg.vocab_size}, context {cfg.block_size}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters")
    duplicates = (~distinct).nonzero().flatten().tolist()
    if shards is None:
        seen = set(tok.encode("\n".join(train_stories()), add_bos=False))
        shard_info = None
    else:
        train = shards.ids("train")
        seen = set(torch.unique(train).tolist())
        shard_info = {"folder": str(shards.folder), "hash": shards.tokenizer_hash,
                      "val_fraction": shards.manifest["val_fraction"], "train_tokens": len(train),
                      "eos_id": shards.manifest["tokenizer"]["eos_id"], "bos_id": tok.bos_id if tok.add_bos else None,
                      "sources": shards.val_sources(tokens),
                      "source_paths": [src["path"] for src in shards.manifest["sources"]]}
        corpus = TRAINED_ON_VALID_TEXT.get(name)  # the same files and fraction as the model's training run?
        shard_info["training_split"] = corpus is not None and corpus["val_fraction"] == shard_info["val_fraction"] \
            and [str(f) for f in expand_inputs(corpus["inputs"])] == shard_info["source_paths"]
    return ModelReport(name, source or name, desc, vocab=len(emb), distinct=int(distinct.sum()),
                       duplicate_bytes=sum(bool(re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok.id_to_piece(i)))
                                           for i in duplicates),
                       duplicate_unseen=sum(i not in seen for i in duplicates),
                       eval_chars=len(eval_text(eval_chars)) if shards is None else 0, eval_tokens=len(tokens),
                       calib_tokens=0 if calib is None else calib.numel(), calib_stories=stories,
                       ppl_rows=ppl_rows, emb_rows=emb_rows, seconds=time.perf_counter() - started,
                       context=cfg.block_size, shards=shard_info, bos_id=tok.bos_id)


# ------------------------------------------------------------------------------- rendering
def _f(x, fmt: str, missing: str = "n/a") -> str:
    return missing if x is None else format(x, fmt)


def perplexity_table(report: ModelReport) -> str:
    lines = ["| format | perplexity | vs fp32 | linear weight bytes | bits/weight (all linear) | "
             "bits/weight (quantized layers) | weights quantized | kept fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report.ppl_rows:
        if r["ppl"] is None:
            lines.append(f"| {r['format']} | n/a | n/a | n/a | n/a | n/a | 0% | {r['kept']} ({r['note']}) |")
            continue
        rel = "-" if r["format"] == "fp32" else f"{100 * r['rel']:+.3f}%"
        quantized = "all (cast)" if r["qweights"] is None else f"{100 * r['qweights'] / r['weights']:.1f}%"
        lines.append(f"| {r['format']} | {r['ppl']:.4f} | {rel} | {r['bytes']:,} | {r['bpw']:.2f} | "
                     f"{_f(r['qbpw'], '.2f', '-')} | {quantized} | {r['kept']} |")
    return "\n".join(lines)


def embedding_table(report: ModelReport) -> str:
    lines = [f"| format | NN@{NEIGHBOURS} overlap, all {report.vocab} tokens | NN@{NEIGHBOURS} overlap, "
             f"{report.distinct} distinct tokens | relative Frobenius error | bits/weight | note |",
             "|---|---|---|---|---|---|"]
    for r in report.emb_rows:
        lines.append(f"| {r['format']} | {_f(r.get('overlap'), '.4f')} | {_f(r.get('overlap_distinct'), '.4f')} | "
                     f"{_f(r.get('rel_err'), '.5f')} | "
                     f"{_f(r['bpw'], '.2f')} | {r['note']} |")
    return "\n".join(lines)


INTRO = """\
# Quantization quality

What each weight format of `emergence.quant` costs in model quality, measured two ways.
**Perplexity**: exp(mean next-token cross-entropy, from `model(input_ids)` logits in fp32) on
held-out text, text the model was not trained on; each model's section says exactly which: for
a model trained on the TinyStories train split, the start of the TinyStories *validation*
split; for a model trained with `emergence train` on token shards, the validation split that
`emergence prepare` held out of those shards. The tokens are read in non-overlapping windows of
the model's context, so that every token is predicted exactly once. fp32, bf16 and fp16 cast
the whole model; the other formats replace the linear layers through `quantize_model` (token
embeddings, norms and a tied output head stay fp32), and a layer whose shape a format cannot
take stays fp32 and is named in the "kept fp32" column. `int4-gptq` is calibrated on
{calib_seqs} sequences of up to {calib_len} tokens from the start of the model's *train* text
(its section says which), never on the evaluation text. Bytes are
those of the linear layers' stored buffers (codes and scales, as checkpoints store them; kept
layers at 4 bytes per weight; ternary codes are stored unpacked, one int8 per weight), and
bits/weight = 8 x bytes / weights. **Embedding space** (do semantically similar tokens remain
close?): the token-embedding matrix E (V x D) is quantized with each format's own quantizer as
if it were a linear weight (rows = tokens, groups and blocks along D); for every token its {k}
nearest neighbours by cosine similarity (itself excluded) are found before and after, and the
table gives the mean overlap |NN_before & NN_after| / {k} over all V tokens and the relative
error ||E - E_q||_F / ||E||_F. Tokens that training (almost) never saw end up with almost the same
vector, and among such near-duplicates the neighbour order is decided by rounding noise, so the
overlap is also given over the "distinct" tokens only (those whose most similar other token has
cosine < {dup}), with neighbours searched among them. Everything is deterministic (fixed slices,
no sampling, no random seed involved); torch ran on {threads} CPU thread{plural}."""


def fp32_row(rep: ModelReport) -> dict:
    return next((r for r in rep.ppl_rows if r["format"] == "fp32"), {})


def prepare_command(rep: ModelReport) -> list[str]:
    """The `emergence prepare` command that makes a shards-evaluated model's shards again."""
    sh = rep.shards
    return [".venv/bin/emergence", "prepare", *sh["source_paths"], "--tokenizer", rep.source,
            "--out", sh["folder"], "--val-fraction", str(sh["val_fraction"])]


def text_evaluation(rep: ModelReport, eval_chars: int, calib_seqs: int) -> str:
    """What a model evaluated on the TinyStories validation text is measured on and calibrated with."""
    first = ("each starting with BOS" if rep.bos_id is not None
             else "each starting with the token before it (the text's first token is context only)")
    text = (f"**Evaluation text**: the start of the TinyStories *validation* split (`{VALID_TEXT}`, cut at the last "
            f"paragraph break before character {eval_chars:,}: {rep.eval_chars:,} characters), tokenized by the "
            f"model's tokenizer: {rep.eval_tokens:,} tokens, in non-overlapping windows of {rep.context} tokens "
            f"{first}, so that every text token is predicted exactly once ({fp32_row(rep).get('tokens', 0):,} "
            f"predictions).")
    if rep.calib_tokens:
        text += (f" **GPTQ calibration**: {rep.calib_tokens:,} tokens ({calib_seqs} sequences of "
                 f"{rep.calib_tokens // calib_seqs}) cut from the first {rep.calib_stories} whole stories of the "
                 f"TinyStories *train* split (`{TRAIN_TEXT}`, BOS before each story, as llama2.c trains).")
    return text


def shards_evaluation(rep: ModelReport, calib_seqs: int) -> str:
    """What a model evaluated on its prepared val split is measured on and calibrated with."""
    sh, ctx, n = rep.shards, rep.context, rep.eval_tokens
    predicted = fp32_row(rep).get("tokens", n - 1)
    full, rest = divmod(n - 1, ctx)
    text = (f"**Evaluation text**: the model's own held-out validation split, the `val` split of the token shards "
            f"in `{sh['folder']}`, prepared by `emergence {shlex.join(prepare_command(rep)[1:])}` (tokenizer hash "
            f"{sh['hash']}, checked equal to the model tokenizer's fingerprint)"
            + (": the same files, tokenizer and fraction as the model's training run, so this is the split it "
               "was validated on while training and never trained on" if sh["training_split"] else "")
            + f". Its {n:,} tokens are the held-out end of each source file, in this order: ")
    if sh["sources"] is None:
        text += f"the last {sh['val_fraction']:.0%} or so of the tokens of each of " + \
                ", ".join(f"`{p}`" for p in sh["source_paths"]) + ". "
    else:
        parts = []
        for src in sh["sources"]:
            total = src["val_tokens"] + src["train_tokens"]
            if src["cut"]:
                parts.append(f"the last {src['val_tokens']:,} tokens of `{src['path']}` (one document, cut at "
                             f"{src['train_tokens'] / total:.0%} of its {total:,} tokens)")
            else:
                parts.append(f"the last {src['val_documents']:,} of the {src['documents']:,} documents of "
                             f"`{src['path']}` ({src['val_tokens']:,} tokens)")
        text += "; ".join(parts) + ". "
    text += (f"Every held-out document (or held-out tail of a cut one) ends with EOS (id {sh['eos_id']}), which is "
             f"predicted like any other token; "
             + ("the tokenizer adds no BOS, and none is added here. " if sh["bos_id"] is None
                else f"BOS (id {sh['bos_id']}) starts every document, as the tokenizer adds it. ")
             + f"The stream is read as training reads it: non-overlapping windows of {ctx + 1} tokens with stride "
               f"{ctx}, the split's first token context only, so {predicted:,} tokens are predicted exactly once "
               f"({full} full windows" + (f" and a last one of {rest}" if rest else "") + ").")
    if "full_windows" in fp32_row(rep):
        loss, ppl, count = fp32_row(rep)["full_windows"]
        text += (f" Over the {count} full windows alone, as `emergence train` evaluates, fp32 gives mean loss "
                 f"{loss:.4f}, perplexity {ppl:.2f}.")
    valid = [src for src in (sh["sources"] or []) if Path(src["path"]).resolve() == VALID_TEXT.resolve()]
    if valid:
        text += (f" The TinyStories validation text that a TinyStories-trained model is evaluated on (`{VALID_TEXT.name}`) "
                 f"is one of this model's training files: its first {valid[0]['train_tokens']:,} tokens were "
                 f"training data, so that text is not held out for this model, and only its last "
                 f"{valid[0]['val_tokens']:,} tokens (in the split above) are used.")
    if rep.calib_tokens:
        reached, start, names = rep.calib_tokens, 0, []
        for src in sh["sources"] or []:
            if start < reached and src["train_tokens"]:
                names.append(f"`{src['path']}`")
            start += src["train_tokens"]
        text += (f" **GPTQ calibration**: the first {rep.calib_tokens:,} tokens of the same shards' *train* split "
                 f"({sh['train_tokens']:,} tokens), cut into {calib_seqs} sequences of "
                 f"{rep.calib_tokens // calib_seqs}: they reach into its first {rep.calib_stories} documents"
                 + (f", from {' and '.join(names)}" if names else "") + ", with the EOS after each, as trained.")
    return text


def render(reports: list[ModelReport], *, eval_chars: int, calib_seqs: int, threads: int,
           command: str, seconds: float) -> str:
    parts = [INTRO.format(calib_seqs=calib_seqs, calib_len=CALIB_LEN, k=NEIGHBOURS, dup=DUPLICATE_COS,
                          threads=threads, plural="" if threads == 1 else "s")]
    for rep in reports:
        seen_in = (f"the tokenized train sample ({TRAIN_TEXT.name})" if rep.shards is None
                   else f"the train split ({rep.shards['train_tokens']:,} tokens)")
        dup = (f"{rep.vocab - rep.distinct} of the {rep.vocab} token embeddings are near-duplicates (cosine >= "
               f"{DUPLICATE_COS} to another token)"
               + ((f": {rep.duplicate_bytes} of them byte-fallback tokens (<0x..>), and " if rep.duplicate_bytes
                   else ": ") + f"{rep.duplicate_unseen} never occur in {seen_in}." if rep.distinct < rep.vocab
                  else "."))
        evaluation = (text_evaluation(rep, eval_chars, calib_seqs) if rep.shards is None
                      else shards_evaluation(rep, calib_seqs))
        if not rep.calib_tokens:
            evaluation += " No GPTQ row."
        parts.append(f"## {rep.name}\n\n{rep.description}.\n\n{evaluation}\n\n{dup}")
        heading = "TinyStories validation text" if rep.shards is None else "its held-out validation split"
        parts.append(f"### Perplexity on {heading}\n\n" + perplexity_table(rep))
        parts.append("### Token-embedding space\n\n" + embedding_table(rep))
    today = datetime.date.today().isoformat()
    prepare = "".join(f"`{shlex.join(prepare_command(rep))}`, then " for rep in reports if rep.shards)
    each = "".join(f"{rep.name} {rep.seconds:.0f} s, " for rep in reports) if len(reports) > 1 else ""
    parts.append(f"How to reproduce: {prepare}`{command}` ({seconds:.0f} s{': ' + each if each else ' '}on "
                 f"{os.cpu_count()} CPU cores, {today}, torch {torch.__version__}).")
    return "\n\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", metavar="PATH_OR_NAME",
                    help=f"a model for emergence.load (repeatable; default: {DEFAULT_MODEL})")
    ap.add_argument("--eval-shards", action="append", default=[], metavar="MODEL=DIR",
                    help="evaluate MODEL (as given to --model) on the val split of the token shards `emergence "
                         "prepare` wrote to DIR, and calibrate its GPTQ rows on their train split (repeatable; "
                         "the shards' tokenizer must be the model's)")
    ap.add_argument("--formats", default=",".join(SPEC_BY_NAME),
                    help="comma-separated rows (default: all): " + ", ".join(SPEC_BY_NAME))
    ap.add_argument("--eval-chars", type=int, default=EVAL_CHARS, help="validation characters (default %(default)s)")
    ap.add_argument("--calib-seqs", type=int, default=CALIB_SEQS, help="GPTQ calibration sequences (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    ap.add_argument("--out", default=str(DOC), help="markdown file to write ('' to only print; default %(default)s)")
    args = ap.parse_args(argv)
    unknown = [f for f in args.formats.split(",") if f not in SPEC_BY_NAME]
    if unknown:
        ap.error(f"unknown format(s) {', '.join(unknown)} (known: {', '.join(SPEC_BY_NAME)})")
    specs = [SPEC_BY_NAME[f] for f in args.formats.split(",")]
    if specs[0].name != "fp32" and "fp32" not in args.formats.split(","):
        specs.insert(0, SPEC_BY_NAME["fp32"])  # the reference every row is compared with
    models = args.model or [DEFAULT_MODEL]
    labels = {name: Path(name).name if Path(name).exists() else name for name in models}
    shard_dirs = {}
    for pair in args.eval_shards:
        model, sep, folder = pair.partition("=")
        if not sep or not model or not folder:
            ap.error(f"--eval-shards takes MODEL=DIR, got {pair!r}")
        if model not in models:
            ap.error(f"--eval-shards names {model!r}, which is not a --model ({', '.join(models)})")
        shard_dirs[model] = folder
    for name in models:
        if labels[name] in TRAINED_ON_VALID_TEXT and name not in shard_dirs:
            ap.error(f"{name} was trained on the TinyStories validation text, so it is not held out for it; evaluate it "
                     f"on its own validation split: {shlex.join(training_prepare(labels[name]))}, then "
                     f"--eval-shards {name}=DIR")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    lms, shards = {}, {}
    for name in models:  # every model and its shards checked before the first long evaluation
        lms[name] = emergence.load(name, device="cpu", dtype="fp32", backend="eager")
        if name in shard_dirs:
            try:
                shards[name] = TokenShards(shard_dirs[name])
                shards[name].check_tokenizer(lms[name].tokenizer)
            except (InvalidArgument, CheckpointError) as e:
                ap.error(f"--eval-shards {name}={shard_dirs[name]}: {e}")
    reports = []
    for name in models:
        reports.append(evaluate(lms[name], labels[name], specs, eval_chars=args.eval_chars,
                                calib_seqs=args.calib_seqs, shards=shards.get(name), source=name,
                                progress=lambda line: print(line, file=sys.stderr, flush=True)))
    seconds = time.perf_counter() - started

    command = shlex.join([".venv/bin/python", "bench/quant_quality.py",
                          *(argv if argv is not None else sys.argv[1:])])
    text = render(reports, eval_chars=args.eval_chars, calib_seqs=args.calib_seqs, threads=args.threads,
                  command=command, seconds=seconds)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
