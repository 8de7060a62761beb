"""generate() and stream(): prompts in, completions out, through one decode batch.

The prompts are prefilled together and decoded as the rows of one `DecodeBatch`
(decode.py), over a paged KV cache sized for them; each row keeps its own sampling
parameters, random generator, stop rules and incremental detokenizer, so a prompt gets the
same tokens in a batch as alone. Finished rows leave the batch at once. `generate` returns
whole completions; `stream` yields text as it becomes final (never half a UTF-8 character,
never the start of a stop string). Prompts whose parameters ask for `num_beams` > 1 run a
beam search (beam.py) over a decode batch of their own and return `num_return_sequences`
completions each, best first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .beam import BeamGroup, Hypothesis, beam_search, check_beam_params
from .decode import Chunk, DecodeBatch, TokenLogprob, end_ids, new_row
from .errors import InvalidArgument
from .model import Transformer
from .sampling import SamplingParams
from .speculative import Speculator, eligible, speculative_row
from .tokenizer import Tokenizer

__all__ = ["Chunk", "Completion", "TokenLogprob", "decode_steps", "generate", "prepare_prompt", "stream"]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    score: float | None = None  # beam search: sum of log-probs / generated length ** length_penalty


def prepare_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int], block_size: int, max_new_tokens: int,
                   truncate: bool = False, *, source: bool = False, source_vocab: int | None = None) -> list[int]:
    """Token ids of a prompt, checked against the context. source: the prompt goes to an
    encoder (T5), which reads all of its context and, like T5's tokenizer, ends text with EOS."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if source and isinstance(prompt, str) and tokenizer.eos_id is not None and ids[-1:] != [tokenizer.eos_id]:
        ids.append(tokenizer.eos_id)
    if not ids:
        # Start a document: with BOS, or (GPT-2 style, where EOS separates documents) after EOS.
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise InvalidArgument("empty prompt and the tokenizer has neither BOS nor EOS to start from")
        ids = [start]
    if len(ids) > block_size if source else len(ids) >= block_size:
        if not truncate:
            where = "the encoder's context of" if source else "the context window of"
            raise InvalidArgument(f"prompt of {len(ids)} tokens does not fit {where} {block_size} "
                                  "(--truncate, or truncate=True, keeps its end)")
        keep = block_size if source else (max(block_size - max_new_tokens, 1) if max_new_tokens < block_size
                                          else block_size // 2)
        ids = ids[-keep:]
    # an encoder's source may hold the model's sentinel ids, past the tokenizer's (T5's <extra_id_N>)
    vocab = max(tokenizer.vocab_size, source_vocab or 0) if source else tokenizer.vocab_size
    if any(t < 0 or t >= vocab for t in ids):
        raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
    return ids


def decode_steps(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                 params: Sequence[SamplingParams], *, backend: str = "auto",
                 draft: Speculator | None = None) -> Iterator[tuple[int, Chunk]]:
    """Yield (prompt index, chunk) for every token generated, until every sequence has finished.
    With a `draft` (speculative.py), the prompts whose parameters allow it are decoded
    speculatively, one after the other; the others as one batch."""
    config = model.config
    device = model.device
    eos = end_ids(config, tokenizer)
    rows = [new_row(i, prompt, p, config, tokenizer, eos, device) for i, (prompt, p) in enumerate(zip(prompts, params))]
    for row in rows:
        if row.max_new <= 0:
            yield row.tag, Chunk("", [], [], "length")
    rows = [r for r in rows if r.max_new > 0]
    if draft is not None:
        for row in [r for r in rows if eligible(r.params)]:
            yield from speculative_row(model, tokenizer, row, draft, backend)
        rows = [r for r in rows if not eligible(r.params)]
    if not rows:
        return
    batch = DecodeBatch.for_rows(model, tokenizer, rows, backend=backend)
    batch.admit(rows)
    while batch.rows:
        for row, chunk in batch.step():
            yield row.tag, chunk


def constrained(tokenizer: Tokenizer, params: SamplingParams, json_schema: Mapping[str, Any] | str | None = None,
                regex: str | None = None, grammar: str | None = None) -> SamplingParams:
    """params with the structured-output constraint asked for (structured.py), if any."""
    if json_schema is None and regex is None and grammar is None:
        return params
    from .structured import compile_constraint

    constraint = compile_constraint(tokenizer, json_schema=json_schema, regex=regex, grammar=grammar)
    return dataclasses.replace(params, constraint=constraint)


def generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]],
             params: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
             truncate: bool = False, backend: str = "auto", json_schema: Mapping[str, Any] | str | None = None,
             regex: str | None = None, grammar: str | None = None, draft: Speculator | None = None) -> list[Completion]:
    """Complete every prompt (batched); the result for each equals what it gets alone (with a
    `draft`, speculative.py: greedy output identical, sampled output of the same distribution).

    One completion per prompt, in order; a prompt searched with beams gives its
    `num_return_sequences` best, best first (transformers' prompt-major order).

    json_schema / regex / grammar (a Lark grammar's text): every completion is constrained to
    match it (structured.py); one that runs out of max_new_tokens first ends with "length".
    Per-prompt constraints go in each SamplingParams' `constraint`."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    if json_schema is not None or regex is not None or grammar is not None:
        from .structured import compile_constraint

        constraint = compile_constraint(tokenizer, json_schema=json_schema, regex=regex, grammar=grammar)
        params = [dataclasses.replace(sp, constraint=constraint) for sp in params]
    for sp in params:
        check_beam_params(sp)
    source = model.config.is_encoder_decoder
    ids = [prepare_prompt(tokenizer, p, model.config.block_size, sp.max_new_tokens, truncate, source=source,
                          source_vocab=model.config.vocab_size) for p, sp in zip(prompts, params)]
    out: list[Completion | list[Completion]] = [Completion("", [], "length", len(i), [] if sp.logprobs is not None
                                                           else None) for i, sp in zip(ids, params)]
    searched = [i for i, sp in enumerate(params) if sp.num_beams > 1]
    if searched:
        found = beam_generate(model, tokenizer, [ids[i] for i in searched], [params[i] for i in searched],
                              backend=backend)
        for i, completions in zip(searched, found):
            out[i] = completions
    sampled = [i for i, sp in enumerate(params) if sp.num_beams == 1]
    steps = decode_steps(model, tokenizer, [ids[i] for i in sampled], [params[i] for i in sampled], backend=backend,
                         draft=draft)
    for j, chunk in steps:
        c = out[sampled[j]]
        c.text += chunk.text
        c.token_ids += chunk.token_ids
        if c.logprobs is not None:
            c.logprobs += chunk.logprobs
        if chunk.finish_reason:
            c.finish_reason = chunk.finish_reason
    return [c for item in out for c in (item if isinstance(item, list) else [item])]


def beam_generate(model: Transformer, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                  params: Sequence[SamplingParams], *, backend: str = "auto") -> list[list[Completion]]:
    """Beam search for every prompt in one decode batch: each prompt's best
    `num_return_sequences` completions, best first."""
    config = model.config
    device = model.device
    eos = end_ids(config, tokenizer)
    groups, first_rows = [], []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        row = new_row(i, prompt, p, config, tokenizer, eos, device)
        groups.append(BeamGroup(p, [row], [0.0], done=row.max_new <= 0))
        if row.max_new > 0:
            first_rows.append(row)
    if first_rows:
        # room for every beam of every prompt to reach its budget
        sized = [r for r in first_rows for _ in range(r.params.num_beams)]
        batch = DecodeBatch.for_rows(model, tokenizer, sized, backend=backend)
        batch.admit(first_rows)
        beam_search(batch, [g for g in groups if not g.done], tokenizer)
    results = []
    for group, prompt in zip(groups, prompts):
        hypotheses = group.finished[:group.params.num_return_sequences]
        results.append([_completion(h, group, len(prompt), tokenizer) for h in hypotheses]
                       or [Completion("", [], "length", len(prompt))])
    return results


def _completion(h: Hypothesis, group: BeamGroup, prompt_tokens: int, tokenizer: Tokenizer) -> Completion:
    """A finished hypothesis as a completion (without its end token), the text cut at a stop string."""
    ids = h.token_ids
    text = tokenizer.decode(ids)
    cuts = [i for i in (text.find(s) for s in group.params.stop) if i >= 0]
    if cuts:
        text = text[:min(cuts)]
    return Completion(text, ids, h.finish_reason, prompt_tokens, None, h.score)


def stream(model: Transformer, tokenizer: Tokenizer, prompt: str | Sequence[int],
           params: SamplingParams = SamplingParams(), *, truncate: bool = False,
           backend: str = "auto", json_schema: Mapping[str, Any] | str | None = None, regex: str | None = None,
           grammar: str | None = None, draft: Speculator | None = None) -> Iterator[Chunk]:
    """Yield chunks of one completion as they become final (constrained, or drafted, as
    `generate` says)."""
    params = constrained(tokenizer, params, json_schema, regex, grammar)
    if params.num_beams > 1:  # a beam search knows its result only at the end
        c = generate(model, tokenizer, [prompt], params, truncate=truncate, backend=backend)[0]
        yield Chunk(c.text, c.token_ids, [], c.finish_reason)
        return
    ids = prepare_prompt(tokenizer, prompt, model.config.block_size, params.max_new_tokens, truncate,
                         source=model.config.is_encoder_decoder, source_vocab=model.config.vocab_size)
    for _, chunk in decode_steps(model, tokenizer, [ids], [params], backend=backend, draft=draft):
        yield chunk
