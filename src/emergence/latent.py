"""A view into the latent space: what a model's vectors say about why prompting works.

    layer_states   tokens -> the residual stream after the embeddings and after every block
    embed          token, word or sentence vectors from any layer (mean- or last-token pooled)
    neighbors      the tokens nearest a word by cosine, in the input embedding table
    contextual     one word in two contexts: how far apart its hidden states are, layer by layer
    logit_lens     the top next tokens read out of every layer (final norm, then the output head)

The model stays pure (tokens -> logits): the per-layer states are caught by forward hooks on
its blocks, and the logit lens applies the model's own final norm and head to each of them, as
nostalgebraist's logit lens does. Layer numbering is transformers' `output_hidden_states`:
0 is the embedding output, i the output of block i (so a model of L blocks has L + 1 layers);
transformers' last entry has the final norm applied, ours does not (the lens applies it).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from .errors import InvalidArgument
from .model import Transformer
from .tokenizer import Tokenizer

POOLINGS = ("mean", "last", "none")


def layer_states(model: Transformer, ids: list[int]) -> torch.Tensor:
    """The residual stream of one sequence: (L + 1, T, D) float32, row 0 the embedding output
    (position embeddings added, Gemma's scaling applied), row i the output of block i."""
    if not ids:
        raise InvalidArgument("no tokens to read hidden states from")
    captured: list[torch.Tensor] = []
    me = threading.get_ident()  # a server's engine may run the same blocks in another thread meanwhile

    def keep(_module, args, output):
        if threading.get_ident() == me:
            captured.append(output.detach())

    def keep_input(_module, args):
        if threading.get_ident() == me and not captured:  # the first block's input: the embedding output
            captured.append(args[0].detach())

    hooks = [model.layers[0].register_forward_pre_hook(keep_input)]
    hooks += [block.register_forward_hook(keep) for block in model.layers]
    try:
        with torch.no_grad():
            model.hidden_states(torch.tensor([ids], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([s[0] for s in captured]).float().cpu()


def _layer(model: Transformer, layer: int) -> int:
    count = model.config.n_layer + 1
    if not -count <= layer < count:
        raise InvalidArgument(f"layer {layer} does not exist: the model has layers 0 (embeddings) to {count - 1}")
    return layer % count


def embed(model: Transformer, tokenizer: Tokenizer, text: str, *, layer: int = -1,
          pooling: str = "mean") -> torch.Tensor:
    """The vector of `text` at `layer` (0: embeddings, -1: the last block): pooled over its tokens
    by "mean" or "last" (D,), or one per token with "none" (T, D). A single token's vector is a
    token embedding, a word's the mean over its tokens, a sentence's the mean or the last token."""
    if pooling not in POOLINGS:
        raise InvalidArgument(f"unknown pooling {pooling!r}; use {', '.join(POOLINGS)}")
    ids = tokenizer.encode(text)
    if not ids:
        raise InvalidArgument(f"{text!r} has no tokens")
    states = layer_states(model, ids)[_layer(model, layer)]  # (T, D)
    return states.mean(dim=0) if pooling == "mean" else states[-1] if pooling == "last" else states


@dataclass
class Neighbor:
    token_id: int
    piece: str
    cosine: float


def as_in_a_sentence(tokenizer: Tokenizer, word: str) -> str:
    """`word` spelled as inside a sentence (" dog") unless that needs more tokens than alone:
    GPT-2-style vocabularies hold most words with their leading space."""
    spaced = " " + word.lstrip()
    return spaced if len(tokenizer.encode(spaced)) <= len(tokenizer.encode(word)) else word


def neighbors(model: Transformer, tokenizer: Tokenizer, word: str, k: int = 10) -> list[Neighbor]:
    """The k tokens whose input embeddings are nearest `word`'s (the mean of its tokens'
    embeddings) by cosine similarity, the word's own tokens left out (the word as_in_a_sentence)."""
    if k < 1:
        raise InvalidArgument(f"k must be at least 1, got {k}")
    ids = tokenizer.encode(as_in_a_sentence(tokenizer, word))
    if not ids:
        raise InvalidArgument(f"{word!r} has no tokens")
    emb = model.tok_embeddings  # an nn.Embedding, or a quantized GGUF's GGMLEmbedding
    table = (emb.weight if isinstance(emb, torch.nn.Embedding) else emb.dequantize()).detach().float().cpu()  # (V, D)
    query = table[ids].mean(dim=0)
    cos = torch.nn.functional.cosine_similarity(table, query[None], dim=-1)  # (V,)
    cos[ids] = -math.inf
    top = cos.topk(min(k, len(cos) - len(set(ids))))
    return [Neighbor(int(i), tokenizer.id_to_piece(int(i)), float(c)) for c, i in zip(top.values, top.indices)]


def word_tokens(tokenizer: Tokenizer, context: str, word: str) -> tuple[list[int], list[int]]:
    """(the context's token ids, the positions of the tokens that cover the first occurrence of
    `word` in it), found by the tokenizer's character offsets."""
    start = context.find(word)
    if start < 0:
        raise InvalidArgument(f"{word!r} does not occur in {context!r}")
    stop = start + len(word)
    encoding = tokenizer.backend.encode(context, add_special_tokens=False)
    positions = [i for i, (a, b) in enumerate(encoding.offsets) if a < stop and b > start]
    return list(encoding.ids), positions


@dataclass
class Contextual:
    word: str
    contexts: tuple[str, str]
    tokens: tuple[list[str], list[str]]  # the word's pieces in each context
    cosine: list[float]  # per layer, 0 (embeddings) to L
    distance: list[float]  # per layer: the Euclidean distance over the mean norm of the two vectors


def contextual(model: Transformer, tokenizer: Tokenizer, word: str, context_a: str, context_b: str) -> Contextual:
    """The same word in two contexts ("plane" flown, "plane" of geometry): the mean of its tokens'
    hidden states in each, compared layer by layer. At layer 0 the two are the same static
    embeddings (cosine 1 when the word has the same tokens in both); what the blocks add is context."""
    vectors, pieces = [], []
    for context in (context_a, context_b):
        ids, positions = word_tokens(tokenizer, context, word)
        vectors.append(layer_states(model, ids)[:, positions].mean(dim=1))  # (L + 1, D)
        pieces.append([tokenizer.id_to_piece(ids[p]) for p in positions])
    a, b = vectors
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    dist = (a - b).norm(dim=-1) / ((a.norm(dim=-1) + b.norm(dim=-1)) / 2).clamp(min=1e-12)
    return Contextual(word, (context_a, context_b), (pieces[0], pieces[1]), cos.tolist(), dist.tolist())


@dataclass
class LensRow:
    layer: int
    tokens: list[tuple[str, float]]  # (piece, probability), most likely first


def logit_lens(model: Transformer, tokenizer: Tokenizer, prompt: str | list[int], k: int = 5) -> list[LensRow]:
    """For every layer, the k most likely next tokens after the prompt's last token, read by
    applying the model's final norm and output head to that layer's hidden state. The last
    layer's row is the model's own prediction."""
    if k < 1:
        raise InvalidArgument(f"k must be at least 1, got {k}")
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    last = layer_states(model, ids)[:, -1]  # (L + 1, D)
    with torch.no_grad():
        h = last.to(device=model.device, dtype=model.dtype)
        probs = model.head(model.norm(h)).float().softmax(dim=-1).cpu()  # (L + 1, V)
    top = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [LensRow(i, [(tokenizer.id_to_piece(int(t)), float(p)) for p, t in zip(ps, ts)])
            for i, (ps, ts) in enumerate(zip(top.values, top.indices))]


def pca_2d(vectors: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the projection on the two principal components of the centred vectors
    (signs fixed so each component's largest coordinate is positive)."""
    if vectors.dim() != 2 or vectors.shape[0] < 2:
        raise InvalidArgument("a 2-D projection needs at least two vectors")
    x = vectors.double() - vectors.double().mean(dim=0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    out = x @ v[:2].T
    if out.shape[1] < 2:
        out = torch.cat([out, torch.zeros(len(out), 2 - out.shape[1], dtype=out.dtype)], dim=1)
    signs = torch.sign(out.gather(0, out.abs().argmax(dim=0, keepdim=True)))
    return (out * torch.where(signs == 0, 1.0, signs)).float()
