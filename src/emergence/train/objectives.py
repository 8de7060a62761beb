"""Training objectives as pure functions: what a batch of ids is turned into, and the loss.

- Next-token prediction (GPT-2, LLaMA): `next_token_batch` cuts a window of T+1 ids into
  inputs and targets shifted by one; `next_token_loss` is the mean cross-entropy.
- T5 span corruption: `random_spans_noise_mask` picks spans covering `noise_density` of
  the tokens with mean length `mean_noise_span_length`; `span_corruption` replaces each span
  of the input by one sentinel id and makes the target the sentinels followed by the spans
  they hide, exactly as T5's `span_corruption` preprocessor does (Raffel et al. 2020, 3.1.4).
  A decoder-only model learns it as a prefix LM: `span_corruption_batch` concatenates input
  and target and masks the loss on the input part; an encoder-decoder (T5) reads the inputs
  with its encoder and predicts the targets with its decoder (`span_corruption_seq2seq_batch`).

Everything here is deterministic given its arguments (randomness comes in as a Generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import InvalidArgument
from ..model import IGNORE_INDEX  # targets with this id add nothing to the loss


class Batch(NamedTuple):
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64; IGNORE_INDEX where no prediction is scored


def next_token_batch(windows: torch.Tensor) -> Batch:
    """windows (B, T+1) -> inputs windows[:, :-1], targets windows[:, 1:]."""
    return Batch(windows[:, :-1], windows[:, 1:])


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), skipping IGNORE_INDEX.

    Computed in fp32 whatever the logits' dtype: a bf16 log-softmax over a large vocabulary
    loses the small probabilities the loss is made of. Under autocast, cross_entropy is one of
    the ops autocast itself runs in fp32, so no copy of the logits is made here (on a GPU
    that copy of a (B, T, V) tensor costs as much as the softmax).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if not torch.is_autocast_enabled(flat.device.type):
        flat = flat.float()
    return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX).float()


# ------------------------------------------------------------------- T5 span corruption
def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Split num_items into num_segments non-empty runs at random -> run lengths (num_segments,)."""
    # Mark num_segments - 1 of the num_items - 1 gaps between items as run boundaries.
    is_boundary = torch.zeros(num_items - 1, dtype=torch.bool)
    is_boundary[torch.randperm(num_items - 1, generator=generator)[:num_segments - 1]] = True
    segment_id = torch.cat([torch.zeros(1, dtype=torch.long), is_boundary.long().cumsum(0)])
    return torch.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                            *, generator: torch.Generator) -> torch.Tensor:
    """T5's noise mask (bool, (length,)): round(length * density) noise tokens (at least 1,
    at most length - 1) in round(noise / mean_span) spans, alternating with non-noise runs;
    the sequence always starts with non-noise."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    keep_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    interleaved = torch.stack([keep_lengths, noise_lengths], dim=1).reshape(-1)  # keep, noise, keep, noise...
    return torch.repeat_interleave(torch.arange(2 * num_spans) % 2 == 1, interleaved)


def span_corruption(tokens: Sequence[int], noise_mask: Sequence[bool], sentinel_ids: Sequence[int]
                    ) -> tuple[list[int], list[int]]:
    """(inputs, targets): each noise span becomes the next sentinel in the inputs; the targets
    list each sentinel followed by the tokens it replaced.

    tokens [a b c d e f], mask [0 1 1 0 0 1], sentinels [S0 S1] -> inputs [a S0 d e S1],
    targets [S0 b c S1 f].
    """
    if len(tokens) != len(noise_mask):
        raise ValueError(f"{len(tokens)} tokens but a mask of {len(noise_mask)}")
    inputs, targets, span = [], [], -1
    for i, (tok, noise) in enumerate(zip(tokens, noise_mask)):
        if noise:
            if i == 0 or not noise_mask[i - 1]:  # a span starts: one sentinel stands for all of it
                span += 1
                if span >= len(sentinel_ids):
                    raise ValueError(f"{span + 1} noise spans but only {len(sentinel_ids)} sentinel ids")
                inputs.append(sentinel_ids[span])
                targets.append(sentinel_ids[span])
            targets.append(tok)
        else:
            inputs.append(tok)
    return inputs, targets


def t5_sentinel_ids(vocab_size: int, count: int = 100) -> list[int]:
    """T5's convention: <extra_id_0> is the last id of the vocabulary, <extra_id_1> the one before..."""
    return [vocab_size - 1 - i for i in range(count)]


def span_corruption_batch(windows: torch.Tensor, sentinel_ids: Sequence[int], eos_id: int, *,
                          generator: torch.Generator | Sequence[torch.Generator], noise_density: float = 0.15,
                          mean_noise_span_length: float = 3.0, pad_id: int = 0) -> Batch:
    """windows (B, L) -> a prefix-LM batch for a decoder: each row is [inputs, EOS, targets, EOS]
    (padded to one length), and only the target part (after the first EOS) is scored.

    `generator` draws the masks: one for the whole batch, or one per row (so that a row's
    mask does not depend on which batch, or which data-parallel rank, it lands in)."""
    generators = [generator] * len(windows) if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != len(windows):
        raise ValueError(f"{len(windows)} rows but {len(generators)} generators")
    rows, scored = [], []
    for window, generator in zip(windows.tolist(), generators):
        mask = random_spans_noise_mask(len(window), noise_density, mean_noise_span_length, generator=generator)
        inp, tgt = span_corruption(window, mask.tolist(), sentinel_ids)
        rows.append(inp + [eos_id] + tgt + [eos_id])
        scored.append(len(inp) + 1)  # positions >= this are predicted
    width = max(map(len, rows))
    seq = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), IGNORE_INDEX, dtype=torch.long)
    for r, (row, start) in enumerate(zip(rows, scored)):
        seq[r, :len(row)] = torch.tensor(row)
        # position p predicts token p + 1; score predictions of tokens start .. len(row)-1
        targets[r, start - 1:len(row) - 1] = seq[r, start:len(row)]
    return Batch(seq[:, :-1], targets)


class Seq2SeqBatch(NamedTuple):
    inputs: torch.Tensor  # (B, S) the encoder's source, right-padded
    targets: torch.Tensor  # (B, T) what the decoder predicts; IGNORE_INDEX on padding
    decoder_inputs: torch.Tensor  # (B, T) the targets shifted right behind the decoder's start token
    source_mask: torch.Tensor  # (B, S) 1 = source token, 0 = padding


def seq2seq_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], start_id: int, pad_id: int = 0
                  ) -> Seq2SeqBatch:
    """(source, target) id lists -> a teacher-forcing batch: the decoder reads
    [start, t0, .., t(n-2)] and predicts [t0, .., t(n-1)] (T5's shift_right)."""
    S, T = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs)
    inputs = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), S, dtype=torch.long)
    targets = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    decoder_inputs = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    for r, (source, target) in enumerate(pairs):
        inputs[r, :len(source)], mask[r, :len(source)] = torch.tensor(source, dtype=torch.long), 1
        targets[r, :len(target)] = torch.tensor(target, dtype=torch.long)
        decoder_inputs[r, :len(target)] = torch.tensor([start_id, *target[:-1]], dtype=torch.long)
    return Seq2SeqBatch(inputs, targets, decoder_inputs, mask)


def span_corruption_seq2seq_batch(windows: torch.Tensor, sentinel_ids: Sequence[int], eos_id: int, start_id: int, *,
                                  generator: Sequence[torch.Generator], noise_density: float = 0.15,
                                  mean_noise_span_length: float = 3.0) -> Seq2SeqBatch:
    """windows (B, L) -> T5's span corruption: the source is the corrupted window + EOS, the
    target the sentinels and the spans they hide + EOS (one generator per row)."""
    pairs = []
    for window, g in zip(windows.tolist(), generator):
        mask = random_spans_noise_mask(len(window), noise_density, mean_noise_span_length, generator=g)
        inp, tgt = span_corruption(window, mask.tolist(), sentinel_ids)
        pairs.append((inp + [eos_id], tgt + [eos_id]))
    return seq2seq_batch(pairs, start_id, pad_id=eos_id)


def span_corruption_length(length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> int:
    """Tokens in [inputs, EOS, targets, EOS] for a window of `length`: length + 2 sentinels per span + 2."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return length + 2 * min(num_spans, num_noise, length - num_noise) + 2


OBJECTIVES = ("next-token", "span-corruption")


def window_length_for(objective: str, block_size: int, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> int:
    """How many corpus tokens one training row reads so that the model sees at most block_size."""
    if objective == "next-token":
        return block_size + 1
    length = block_size
    while span_corruption_length(length, noise_density, mean_noise_span_length) - 1 > block_size:
        length -= 1
    if length < 2:  # random_spans_noise_mask needs two tokens: one kept, one noise
        shortest = span_corruption_length(2, noise_density, mean_noise_span_length) - 1
        raise InvalidArgument(f"span corruption needs a context of at least {shortest} tokens, got {block_size}")
    return length
