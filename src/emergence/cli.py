"""The `emergence` command line: a table of verbs, each a function of parsed arguments.

Bad input (a missing model, an invalid sampling value, a corrupt file) ends with one line
on stderr and exit status 1; Ctrl-C ends with status 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .api import LanguageModel, load, require_decoder_only, resolve_dtype
from .errors import EmergenceError, InvalidArgument
from .files import check_output
from .generate import Completion, TokenLogprob, generate, stream
from .sampling import SamplingParams
from .speculative import DEFAULT_DRAFT_TOKENS

if TYPE_CHECKING:
    from .store import Entry, Source
    from .tokenizer import Tokenizer
    from .train.trainer import TrainConfig


# ------------------------------------------------------------------------------ arguments
MODEL_HELP = ("a Hugging Face layout folder, a GGUF file, a llama2.c .bin (with --tokenizer), a model in the store "
              "(emergence list) or a packaged model (stories260K, emergence-6m); default: the shipped model")
DRAFT_DTYPE_HELP = ("the draft's weights: fp32, bf16 or fp16 (default: --dtype); a bf16 draft reads half the "
                    "bytes a step, and the target still checks every token")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=MODEL_HELP)
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (required for llama2.c .bin checkpoints)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")
    p.add_argument("--adapter", default=None, metavar="DIR", help="apply a LoRA/DoRA adapter folder (PEFT format)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags. Unset ones are None: a store model's PARAMETERs apply, then these defaults."""
    d = SamplingParams()
    g = p.add_argument_group("sampling (a flag left out takes the store model's PARAMETER, else the default shown)")
    g.add_argument("--temperature", "-t", type=float, help=f"0 = greedy (default {d.temperature})")
    g.add_argument("--top-k", type=int, help="0 = off (default)")
    g.add_argument("--top-p", type=float, help=f"(default {d.top_p})")
    g.add_argument("--min-p", type=float, help=f"(default {d.min_p})")
    g.add_argument("--typical-p", type=float, help=f"(default {d.typical_p})")
    g.add_argument("--repetition-penalty", type=float, help=f"(default {d.repetition_penalty})")
    g.add_argument("--presence-penalty", type=float, help=f"(default {d.presence_penalty})")
    g.add_argument("--frequency-penalty", type=float, help=f"(default {d.frequency_penalty})")
    g.add_argument("--logit-bias", action="append", metavar="ID=BIAS", help="add BIAS to token ID's logit")
    g.add_argument("--max-new-tokens", "-n", type=int, help=f"(default {d.max_new_tokens})")
    g.add_argument("--seed", type=int, help="same seed, same output")
    g.add_argument("--stop", action="append", help="stop string (repeatable; replaces the model's stop list)")
    g.add_argument("--stop-token-id", action="append", type=int, help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="keep going past end-of-sequence tokens")
    g.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    g.add_argument("--no-repeat-ngram-size", type=int, help="ban repeating any n-gram of this size (0 = off)")
    b = p.add_argument_group("beam search (transformers' meanings)")
    b.add_argument("--num-beams", type=int, help="beams per prompt (default 1: no beam search)")
    b.add_argument("--length-penalty", type=float, help="score = log-prob sum / length ** this (default 1.0)")
    b.add_argument("--early-stopping", choices=("true", "false", "never"),
                   help="stop when num_beams hypotheses are done (true), when none can improve (false, default), "
                        "or by the canonical bound (never)")
    b.add_argument("--num-return-sequences", type=int, help="best hypotheses to print (<= --num-beams)")


# sampling flag -> SamplingParams field, where the names differ
_FLAG_FIELDS = {"stop_token_id": "stop_token_ids"}


def _sampling(args: argparse.Namespace, stored: dict | None = None, logprobs: int | None = None) -> SamplingParams:
    """SamplingParams: the defaults, then a store model's PARAMETERs (`stored`), then the flags given."""
    values = dict(stored or {})
    for flag in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "max_new_tokens", "seed", "stop", "stop_token_id", "ignore_eos",
                 "no_repeat_ngram_size", "num_beams", "length_penalty", "num_return_sequences"):
        value = getattr(args, flag)
        if value is not None:
            values[_FLAG_FIELDS.get(flag, flag)] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "early_stopping", None) is not None:
        values["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    bias = {}
    for item in args.logit_bias or []:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise InvalidArgument(f"--logit-bias takes ID=BIAS, got {item!r}") from None
    if bias:
        values["logit_bias"] = bias
    return SamplingParams(**values, logprobs=logprobs)


def _load(args: argparse.Namespace, source: Source) -> LanguageModel:
    return load(source, tokenizer=getattr(args, "tokenizer", None), device=args.device, dtype=args.dtype,
                adapter=getattr(args, "adapter", None))


# --------------------------------------------------------------------------------- verbs
def cmd_generate(args: argparse.Namespace) -> None:
    """Complete a prompt; a store model's PARAMETERs are the defaults and its SYSTEM prefixes the
    prompt (as `run` does)."""
    from .store import resolve_model, with_system

    source = resolve_model(args.model)  # a missing model is reported before the sampling values
    beams = (args.num_beams or 1) > 1  # a beam search reports each hypothesis' score, not per-token logprobs
    logprobs = args.logprobs if args.logprobs is not None else (0 if args.json and not beams else None)
    params = _sampling(args, source.parameters, logprobs)
    lm = _load(args, source)
    params = _constrained(args, lm, params)
    draft = _speculator(args, lm, source)
    prompt = with_system(source.system, args.prompt if args.prompt is not None else "")
    if args.stream:
        for chunk in stream(lm.model, lm.tokenizer, prompt, params, truncate=args.truncate, backend=lm.backend,
                            draft=draft):
            if args.json:
                print(json.dumps({"text": chunk.text, "token_ids": chunk.token_ids,
                                  "logprobs": [_logprob_json(lm, lp) for lp in chunk.logprobs],
                                  "finish_reason": chunk.finish_reason}, ensure_ascii=False), flush=True)
            else:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        if not args.json:
            sys.stdout.write("\n")
        return
    # one completion, or a beam search's num_return_sequences best, best first
    for completion in generate(lm.model, lm.tokenizer, [prompt], params, truncate=args.truncate, backend=lm.backend,
                               draft=draft):
        if args.json:
            record = _completion_json(lm, completion)
            if draft is not None:
                record["speculative"] = {"draft_tokens": draft.k, "rounds": draft.rounds, "drafted": draft.drafted,
                                         "accepted": draft.accepted, "acceptance": round(draft.acceptance, 4)}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(completion.text)


def _speculator(args: argparse.Namespace, lm: LanguageModel, source: Source):
    """The speculator of --draft MODEL, or of the store model's DRAFT line; None without either."""
    from .store import resolve_model

    name = getattr(args, "draft", None) or source.draft  # (`run` has no --draft: a store model's DRAFT only)
    if name is None:
        return None
    draft = load(resolve_model(name), device=args.device, dtype=getattr(args, "draft_dtype", None) or args.dtype)
    return lm.speculator(draft, k=getattr(args, "draft_tokens", DEFAULT_DRAFT_TOKENS))


def _constrained(args: argparse.Namespace, lm: LanguageModel, params: SamplingParams) -> SamplingParams:
    """params constrained by --json-schema FILE, --regex R or --grammar FILE (structured output)."""
    from .generate import constrained

    def read(path: str, what: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read the {what} {path}: {e.strerror if isinstance(e, OSError) else e}") \
                from None

    schema, regex, grammar = (getattr(args, name, None) for name in ("json_schema", "regex", "grammar"))
    schema = read(schema, "JSON schema") if schema is not None else None  # (`run` has no such flags)
    grammar = read(grammar, "grammar") if grammar is not None else None
    return constrained(lm.tokenizer, params, json_schema=schema, regex=regex, grammar=grammar)


def _logprob_json(lm: LanguageModel, lp: TokenLogprob) -> dict:
    piece = lm.tokenizer.id_to_piece
    return {"token_id": lp.token_id, "token": piece(lp.token_id), "logprob": lp.logprob,
            "top": [{"token_id": t, "token": piece(t), "logprob": v} for t, v in lp.top]}


def _completion_json(lm: LanguageModel, c: Completion) -> dict:
    return {"text": c.text, "token_ids": c.token_ids,
            "logprobs": [_logprob_json(lm, lp) for lp in (c.logprobs or [])],
            "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
            **({"score": c.score} if c.score is not None else {})}


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive conversation (repl.ChatSession): the model's chat template, --chat-template,
    a store model's TEMPLATE, or the plain User:/Assistant: transcript for a base model."""
    from .chat import find_model_template, resolve_chat_template
    from .repl import ChatSession
    from .store import resolve_model

    source = resolve_model(args.model)
    params = _sampling(args, source.parameters)
    lm = _load(args, source)
    adapter = getattr(args, "adapter", None)
    own = find_model_template(adapter) if adapter else None  # what the adapter was tuned with
    template = resolve_chat_template(own or find_model_template(source.path),
                                     override=args.chat_template or source.template,
                                     missing="plain")
    ChatSession(lm, params, template, policy=args.context_policy, system=source.system).run()


def cmd_info(args: argparse.Namespace) -> None:
    from .config import SWITCH_FAMILIES, Config
    from .kernels.fused_decode import unsupported
    from .quant import quantized_modules
    from .quant.linear import GGMLEmbedding

    lm = load(args.model_path, tokenizer=args.tokenizer, device="cpu", dtype=args.dtype)
    c = lm.config
    if c.is_encoder_decoder:
        info = {"name": c.name, "architecture": "t5 (encoder-decoder)", "parameters": lm.model.num_parameters(),
                "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."), "context_length": c.block_size,
                "encoder_layers": c.n_encoder_layer, "decoder_layers": c.n_layer, "heads": c.n_head,
                "embedding": c.n_embd, "head_dim": c.head_dim, "mlp": f"{c.mlp} ({c.intermediate_size})",
                "relative_buckets": f"{c.num_buckets} (max distance {c.max_distance})",
                "head": ("tied, scaled by d_model ** -0.5" if c.scale_head else "tied") if c.tie_embeddings else "untied",
                "vocab_size": c.vocab_size}
        _print_info(info, args.json)
        return
    weights = {id(p): p for p in lm.model.parameters()}.values()
    # packed layers (their weights are buffers, not parameters), each counted once: a tied head
    # reads its quantized embedding's blocks
    quantized = list(quantized_modules(lm.model).values()) + [m for m in lm.model.modules()
                                                             if isinstance(m, GGMLEmbedding)]
    packed = {}
    for m in quantized:
        size = m.num_embeddings * m.embedding_dim if isinstance(m, GGMLEmbedding) else m.in_features * m.out_features
        first = next(m.buffers())
        packed.setdefault(first.data_ptr(), (size, sum(b.numel() * b.element_size() for b in m.buffers())))
    dequantized = getattr(lm.model, "gguf_dequantized", {})
    info = {
        "name": c.name, "architecture": c.family,
        "parameters": sum(p.numel() for p in weights) + sum(size for size, _ in packed.values()),
        "dtype": str(lm.model.dtype).removeprefix("torch."),
        "quantization": ", ".join(sorted({m.format for m in quantized})) or None,
        "dequantized": (f"{len(dequantized)} GGUF tensors ({', '.join(sorted(set(dequantized.values())))}) to "
                        f"{str(lm.model.dtype).removeprefix('torch.')}: {', '.join(dequantized)}")
        if dequantized else None,
        "bytes": sum(p.numel() * p.element_size() for p in weights) + sum(n for _, n in packed.values()),
        "context_length": c.block_size,
        "layers": c.n_layer, "heads": c.n_head, "kv_heads": c.n_kv_head, "embedding": c.n_embd,
        "mlp": f"{c.mlp} ({c.intermediate_size})", "norm": c.norm, "position": c.position,
        "rope_theta": c.rope_theta if c.position == "rope" else None, "sliding_window": c.sliding_window,
        "tied_embeddings": c.tie_embeddings, "vocab_size": c.vocab_size,
        "family_switches": ", ".join(f"{k}={getattr(c, k)}" for k in SWITCH_FAMILIES
                                     if getattr(c, k) != Config.__dataclass_fields__[k].default) or None,
        "decode": "native" if (why := unsupported(lm.model)) is None else f"eager ({why})",
    }
    _print_info(info, args.json)


def _latent_model(args: argparse.Namespace) -> LanguageModel:
    from .store import resolve_model

    lm = _load(args, resolve_model(args.model))
    require_decoder_only(lm.config, f"emergence {args.command}")
    return lm


def cmd_embed(args: argparse.Namespace) -> None:
    from .latent import embed

    lm = _latent_model(args)
    rows = []
    for text in args.texts:
        vector = embed(lm.model, lm.tokenizer, text, layer=args.layer, pooling=args.pooling)
        rows.append({"text": text, "layer": args.layer, "pooling": args.pooling,
                     "embedding": [round(v, 6) for v in vector.tolist()] if vector.dim() == 1
                     else [[round(v, 6) for v in row] for row in vector.tolist()]})
    if args.json:
        print(json.dumps(rows))
        return
    for row in rows:
        v = row["embedding"]
        shape = f"{len(v)}" if not v or not isinstance(v[0], list) else f"{len(v)} x {len(v[0])}"
        head = v if not v or not isinstance(v[0], list) else v[-1]
        print(f"{row['text']!r} ({shape}): [{', '.join(f'{x:.4f}' for x in head[:8])}{', ...' if len(head) > 8 else ''}]")


def cmd_neighbors(args: argparse.Namespace) -> None:
    from .latent import neighbors

    lm = _latent_model(args)
    found = neighbors(lm.model, lm.tokenizer, args.word, args.k)
    if args.json:
        print(json.dumps([{"token_id": n.token_id, "piece": n.piece, "cosine": n.cosine} for n in found]))
        return
    for n in found:
        print(f"{n.cosine:7.4f}  {n.piece!r} ({n.token_id})")


def cmd_context(args: argparse.Namespace) -> None:
    from .latent import contextual

    lm = _latent_model(args)
    if len(args.contexts) != 2:
        raise InvalidArgument("give the word and exactly two contexts")
    c = contextual(lm.model, lm.tokenizer, args.word, *args.contexts)
    if args.json:
        print(json.dumps({"word": c.word, "contexts": c.contexts, "tokens": c.tokens, "cosine": c.cosine,
                          "distance": c.distance}))
        return
    print(f"{c.word!r} as {c.tokens[0]} in {c.contexts[0]!r} and as {c.tokens[1]} in {c.contexts[1]!r}")
    print("layer  cosine  distance")
    for i, (cos, dist) in enumerate(zip(c.cosine, c.distance)):
        print(f"{i:5}  {cos:6.3f}  {dist:8.3f}{'  (embeddings)' if i == 0 else ''}")


def cmd_lens(args: argparse.Namespace) -> None:
    from .latent import logit_lens

    lm = _latent_model(args)
    rows = logit_lens(lm.model, lm.tokenizer, args.prompt, args.k)
    if args.json:
        print(json.dumps([{"layer": r.layer, "tokens": [{"piece": t, "probability": p} for t, p in r.tokens]}
                          for r in rows]))
        return
    for r in rows:
        print(f"{r.layer:5}  " + "  ".join(f"{t!r} {p:.3f}" for t, p in r.tokens))


def _print_info(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info))
        return
    for key, value in info.items():
        if value is not None:
            print(f"{key:16} {value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{key:16} {value}")


def cmd_convert(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .weights.hf import save_hf

    dtype = resolve_dtype(args.dtype)
    if args.max_shard_mb is not None and args.max_shard_mb <= 0:
        raise InvalidArgument(f"--max-shard-mb must be positive, got {args.max_shard_mb}")
    dst = Path(args.dst)
    if dst.suffix == ".gguf":
        import torch

        from .weights.gguf_model import FILE_TYPES, save_gguf

        file_type = args.type or {None: "f32", torch.float32: "f32", torch.bfloat16: "bf16",
                                  torch.float16: "f16"}[dtype]
        if file_type not in FILE_TYPES:
            raise InvalidArgument(f"unknown GGUF type {file_type!r} (one of {', '.join(FILE_TYPES)})")
        check_output(dst, folder=False, force=args.force)
        lm = load(args.src, tokenizer=args.tokenizer, device="cpu", dtype=dtype)
        import warnings

        with warnings.catch_warnings(record=True) as caught:  # --force on a model not trained ternary
            warnings.simplefilter("always")
            save_gguf(lm.model, lm.tokenizer, dst, file_type, force=args.force)
        for w in caught:
            print(f"emergence: warning: {w.message}", file=sys.stderr)
        print(f"wrote {dst} ({lm.config.family}, GGUF {file_type})")
        return
    if args.type is not None:
        raise InvalidArgument("--type applies to a GGUF output (DST ending in .gguf)")
    check_output(dst, folder=True, force=args.force)
    lm = load(args.src, tokenizer=args.tokenizer, device="cpu", dtype=dtype, dequantize=True)  # HF holds floats
    save_hf(lm.model, dst, max_shard_bytes=args.max_shard_mb * 2**20 if args.max_shard_mb else None)
    lm.tokenizer.save(dst)
    print(f"wrote {dst} ({lm.config.family}, {str(next(lm.model.parameters()).dtype).removeprefix('torch.')})")


def cmd_quantize(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from .quant import model_bytes, quantizable_formats, quantize_model, quantized_modules, save_quantized

    if args.to not in quantizable_formats():
        raise InvalidArgument(f"unknown format {args.to!r} for --to (use {', '.join(quantizable_formats())})")
    if args.calibration is not None and args.to != "int4-gptq":
        raise InvalidArgument(f"--calibration is used by int4-gptq only, not {args.to}")
    if args.to == "int4-gptq" and args.calibration is None:
        raise InvalidArgument("int4-gptq needs --calibration TEXTFILE (text like the model's own)")
    text = None
    if args.calibration is not None:
        try:
            text = Path(args.calibration).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read --calibration {args.calibration}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
    out = check_output(args.out, folder=True, force=args.force)

    lm = load(args.model, tokenizer=args.tokenizer, device="cpu")
    require_decoder_only(lm.config, "emergence quantize")
    calibration = None
    if text is not None:
        # Sequences of at most 256 tokens (or the context window), each starting with BOS when there is one.
        ids = lm.tokenizer.encode(text, add_bos=False)
        bos = [lm.tokenizer.bos_id] if lm.tokenizer.bos_id is not None else []
        step = min(256, lm.config.block_size) - len(bos)
        calibration = [torch.tensor(bos + ids[i:i + step]) for i in range(0, len(ids), step)]
        if not ids:
            raise InvalidArgument(f"--calibration {args.calibration} holds no text")
    existing = quantized_modules(lm.model)
    if existing:
        raise InvalidArgument(f"{args.model or 'the model'} is already quantized "
                              f"({next(iter(existing.values())).format}); quantize a full-precision model")
    before = model_bytes(lm.model)
    quantize_model(lm.model, args.to, group_size=args.group_size, calibration=calibration, act_bits=args.act_bits,
                   skip=("lm_head", *args.skip))
    after = model_bytes(lm.model)
    save_quantized(lm.model, lm.tokenizer, out)
    layers = len(quantized_modules(lm.model))
    print(f"{lm.config.name} -> {args.to}: {layers} linear layers, {before:,} -> {after:,} bytes "
          f"({before / after:.2f}x smaller), wrote {out}")


def _tokenizer_for(spec: str) -> "Tokenizer":
    """A tokenizer file or folder, or the tokenizer of a model (path, store or packaged name)."""
    from .store import resolve_model
    from .tokenizer import Tokenizer

    path = Path(spec)
    if path.exists():
        return Tokenizer.load(path)
    return Tokenizer.load(resolve_model(spec).path)


def cmd_prepare(args: argparse.Namespace) -> None:
    from .data.shards import prepare_corpus

    tokenizer = _tokenizer_for(args.tokenizer)
    m = prepare_corpus(args.inputs, tokenizer, args.out, val_fraction=args.val_fraction,
                       invalid_utf8=args.invalid_utf8, shard_tokens=args.shard_tokens)
    splits = m["splits"]
    print(f"wrote {args.out}: {splits['train']['tokens']:,} train + {splits['val']['tokens']:,} val tokens "
          f"({m['dtype']}) from {len(m['sources'])} file(s), "
          f"{sum(s['documents'] for s in m['sources']):,} documents; tokenizer {m['tokenizer']['hash']}")


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    import time

    from .data.shards import expand_inputs, read_documents
    from .progress import human
    from .tokenizer import GPT2_EOT, Tokenizer

    start = time.perf_counter()
    docs, size = [], 0
    for path in expand_inputs(args.inputs):
        file_docs, invalid = read_documents(path, GPT2_EOT, args.invalid_utf8)
        if invalid:
            print(f"{path}: {invalid} invalid UTF-8 sequence(s) "
                  f"{'replaced by U+FFFD' if args.invalid_utf8 == 'replace' else 'skipped'}")
        docs += file_docs
        size += path.stat().st_size
    if not docs:
        raise InvalidArgument("the corpus is empty: no text to train a tokenizer on")
    tok = Tokenizer.train_bpe_from_texts(docs, args.vocab_size, show_progress=sys.stderr.isatty())
    tok.save(args.out)
    elapsed = time.perf_counter() - start
    print(f"trained a byte-level BPE of {tok.vocab_size:,} tokens on {len(docs):,} documents "
          f"({human(size)}B, {human(size / elapsed)}B/s); wrote {args.out} (tokenizer {tok.fingerprint()})")


def cmd_pretrain(args: argparse.Namespace) -> None:
    """A new run from the flags (and --train-config); --resume continues the run in --out with
    its saved settings, the flags given overriding only what may change (see trainer.resume)."""
    from .train.trainer import TrainConfig, load_train_config, saved_settings, train

    given = load_train_config(args.train_config) if args.train_config else {}
    for name in (*_TRAIN_FLAGS, "compile", "checkpoint_activations", "fsdp", "save_best", "data"):
        value = getattr(args, name)
        if value is not None:
            given[name] = value
    if args.no_progress:
        given["progress"] = False
    if args.resume:
        settings = {**saved_settings(args.out), **given, "out": args.out}
    else:
        if args.data is None:
            raise InvalidArgument("pretrain needs --data DIR (a folder written by `emergence prepare`)")
        if args.config is None and given.get("init") is None:
            raise InvalidArgument("pretrain needs --config PRESET_OR_JSON (or --init MODEL, or --resume)")
        settings = {**given, "out": args.out}
    train(args.config, TrainConfig(**settings), resume=args.resume)


# ------------------------------------------------------------------------- the model store
def cmd_list(args: argparse.Namespace) -> None:
    from .store import Store, ago, human_bytes, human_count

    rows = [(e, e.size()) for e in Store().entries()]
    if args.json:
        print(json.dumps([{"name": str(e.name), "architecture": e.manifest.details.architecture,
                           "parameter_count": e.manifest.details.parameter_count,
                           "format": e.manifest.details.format, "size": size, "modified": e.manifest.created}
                          for e, size in rows]))
        return
    table = [("NAME", "ARCHITECTURE", "PARAMETERS", "FORMAT", "SIZE", "MODIFIED")]
    table += [(str(e.name), e.manifest.details.architecture, human_count(e.manifest.details.parameter_count),
               e.manifest.details.format, human_bytes(size), ago(e.modified())) for e, size in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def cmd_show(args: argparse.Namespace) -> None:
    """A store model's details, default parameters, system prompt and template; for any other
    model (a packaged one, a path) its details as read from its files."""
    from .store import Modelfile, inspect_model, resolve_model

    source = resolve_model(args.name)
    entry = source.entry
    if entry is None:
        d = inspect_model(source.path)
        if args.modelfile:
            print(Modelfile(source.label).to_text(), end="")
            return
        if args.json:
            print(json.dumps({"name": source.name, "source": "packaged" if source.packaged else source.label,
                              "layout": d.layout, "format": d.format,
                              "details": {"architecture": d.architecture, "parameter_count": d.parameter_count,
                                          "context_length": d.context_length},
                              "parameters": {}, "system": None, "template": None, "path": str(source.path)}))
            return
        rows = [("name", source.name), ("architecture", d.architecture), ("parameters", f"{d.parameter_count:,}"),
                ("context length", f"{d.context_length:,}"), ("format", d.format), ("layout", d.layout),
                ("source", "packaged with emergence" if source.packaged else "a path (not in the store)"),
                ("path", str(source.path))]
        print("  Model")
        for key, value in rows:
            print(f"    {key:16}{value}")
        return
    m, d = entry.manifest, entry.manifest.details
    if args.modelfile:
        adapter = str(source.adapter) if source.adapter is not None else None  # its PEFT files sit in the entry
        print(Modelfile(str(entry.model_path), m.parameters, m.system, m.template, adapter=adapter,
                        draft=m.draft).to_text(), end="")
        return
    if args.json:
        print(json.dumps({**m.to_json(), "path": str(entry.model_path), "size": entry.size()}, ensure_ascii=False))
        return
    print("  Model")
    for key, value in (("name", str(entry.name)), ("architecture", d.architecture),
                       ("parameters", f"{d.parameter_count:,}"), ("context length", f"{d.context_length:,}"),
                       ("format", d.format), ("layout", d.layout), ("source", m.source),
                       *((("draft", m.draft),) if m.draft is not None else ()), ("created", m.created),
                       ("path", str(entry.model_path))):
        print(f"    {key:16}{value}")
    if m.parameters:
        print("\n  Parameters")
        for key, value in m.parameters.items():
            for v in (value if key == "stop" else [value]):
                print(f"    {key:20}{json.dumps(v, ensure_ascii=False) if isinstance(v, str) else v}")
    for title, text in (("System", m.system), ("Template", m.template)):
        if text is not None:
            print(f"\n  {title}")
            for line in text.splitlines() or [""]:
                print(f"    {line}")


def cmd_create(args: argparse.Namespace) -> None:
    from .store import ModelName, Store, read_modelfile

    ModelName.parse(args.name)  # a bad name is reported before the Modelfile
    entry = Store().create(args.name, read_modelfile(args.file))
    _report("created", entry)


def cmd_import(args: argparse.Namespace) -> None:
    from .store import Store

    _report("imported", Store().import_model(args.path, args.name, force=args.force))


def cmd_cp(args: argparse.Namespace) -> None:
    from .store import ModelName, Store

    entry = Store().copy(args.src, args.dst, force=args.force)
    print(f"copied {ModelName.parse(args.src)} to {entry.name}")


def cmd_verify(args: argparse.Namespace) -> None:
    from .store import Store, human_bytes

    store = Store()
    for name in args.names:
        entry = store.get(name)
        checked = entry.verify(full=True)
        print(f"{entry.name}: {len(entry.manifest.files)} files, {human_bytes(checked)} verified against the "
              f"manifest's sha256")


def cmd_rm(args: argparse.Namespace) -> None:
    from .store import Store

    store = Store()
    for name in args.names:  # every name must exist before anything is removed
        store.entry_folder(name)
    for name in args.names:
        print(f"deleted {store.remove(name)}")


def _report(verb: str, entry: "Entry") -> None:
    from .store import human_bytes, human_count

    d = entry.manifest.details
    print(f"{verb} {entry.name} from {entry.manifest.source} ({d.architecture}, "
          f"{human_count(d.parameter_count)} parameters, {d.format}, {human_bytes(entry.size())})")


def cmd_run(args: argparse.Namespace) -> None:
    """`run NAME PROMPT` is `generate --model NAME PROMPT --stream`; `run NAME` is `chat --model NAME`."""
    args.model = args.name
    if args.prompt is None:
        args.chat_template, args.context_policy = None, "drop-oldest"
        return cmd_chat(args)
    args.stream, args.json, args.logprobs = True, False, None
    return cmd_generate(args)


# TrainConfig fields settable by a flag of the same name (None: keep the file's or the default).
CHECKPOINT_ACTIVATIONS_HELP = ("keep each block's input for the backward pass and recompute the block there "
                               "(less memory, one more forward pass of each block)")
_TRAIN_FLAGS = {
    "init": (str, "continue pretraining this model (folder or packaged name) instead of a random init"),
    "objective": (str, "next-token or span-corruption"), "context": (int, "tokens per row (default: block_size)"),
    "batch_size": (int, "rows per micro-batch per rank"), "grad_accum": (int, "micro-batches per step"),
    "max_steps": (int, "optimizer steps"), "lr": (float, "peak learning rate"), "min_lr": (float, "final lr"),
    "warmup_steps": (int, "linear warmup steps"), "schedule": (str, "cosine, wsd or constant"),
    "decay_fraction": (float, "wsd: share of steps spent decaying"), "weight_decay": (float, "AdamW decay"),
    "beta1": (float, None), "beta2": (float, None), "grad_clip": (float, "max grad norm, 0 = off"),
    "dtype": (str, "auto, bf16 (autocast) or fp32"), "eval_every": (int, "steps between evaluations"),
    "eval_batches": (int, "validation batches per evaluation"), "sample_every": (int, "steps between samples"),
    "sample_tokens": (int, None), "checkpoint_every": (int, "steps between checkpoints"),
    "log_every": (int, "steps between throughput measurements"), "seed": (int, None),
    "device": (str, "auto, cpu or cuda"),
}


def cmd_finetune(args: argparse.Namespace) -> None:
    """Instruction-tune MODEL on JSONL rows (finetune/run.py); --resume continues the run in --out."""
    from .finetune.run import FinetuneConfig, finetune

    method = "full" if args.full else "dora" if args.dora else "lora"
    targets = _targets(args)
    fc = FinetuneConfig(model=args.model, data=args.data or [], method=method, quantize=args.quantize,
                        chat_template=args.chat_template, pack=args.pack, truncate=args.truncate,
                        val_fraction=args.val_fraction, **{k: v for k, v in (
                            ("r", args.r), ("alpha", args.alpha), ("dropout", args.lora_dropout), ("targets", targets),
                            ("rslora", args.rslora or None), ("epochs", args.epochs)) if v is not None})
    defaults = {"lr": 2e-5 if method == "full" else 2e-4, "min_lr": 0.0, "warmup_steps": 10, "weight_decay": 0.0,
                "max_steps": 0, "batch_size": 8, "eval_every": 50, "checkpoint_every": 50}
    result = finetune(fc, _run_train_config(args, defaults, fc.data), resume=args.resume)
    if result.model_dir is not None:  # (rank 0 only)
        print(f"{'model' if method == 'full' else 'adapter'}: {result.model_dir}")


def _targets(args: argparse.Namespace) -> str | list[str] | None:
    """--target: None (the default), "all-linear", "re:REGEX" (a regular expression), or a comma-separated list."""
    targets = args.target
    if targets is not None and targets != "all-linear":
        targets = targets[3:] if targets.startswith("re:") else [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def _run_train_config(args: argparse.Namespace, defaults: dict, data: list[str]) -> "TrainConfig":
    """The loop's settings of a run on args.model (finetune, reward-model, dpo): the command's
    defaults, then a resumed run's saved settings, then --train-config, then the flags given."""
    from .train.trainer import TrainConfig, load_train_config, saved_settings

    given = load_train_config(args.train_config) if args.train_config else {}
    for name in (*_TRAIN_FLAGS, "compile", "checkpoint_activations", "fsdp", "save_best"):
        if name not in ("init", "objective") and getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.no_progress:
        given["progress"] = False
    settings = {**defaults, **(saved_settings(args.out) if args.resume else {}), **given, "out": args.out,
                "data": ",".join(data), "init": args.model}
    return TrainConfig(**settings)


def cmd_align(args: argparse.Namespace) -> None:
    """reward-model and dpo: train on preference pairs through the training loop (align/train.py)."""
    from .align.train import PreferenceConfig, train_preferences

    kind = args.command
    method = "lora" if args.lora else "dora" if args.dora else "full"
    optional = (("r", args.r), ("alpha", args.alpha), ("dropout", args.lora_dropout), ("targets", _targets(args)),
                ("rslora", args.rslora or None), ("epochs", args.epochs),
                ("center_rewards_coefficient", getattr(args, "center_rewards", None)),
                ("beta", getattr(args, "beta", None)), ("loss_type", getattr(args, "loss", None)),
                ("label_smoothing", getattr(args, "label_smoothing", None)))
    pc = PreferenceConfig(model=args.model, data=args.data or [], method=method, chat_template=args.chat_template,
                          val_fraction=args.val_fraction, **{k: v for k, v in optional if v is not None})
    lr = {"reward-model": 1e-5 if method == "full" else 1e-4, "dpo": 1e-6 if method == "full" else 5e-6}[kind]
    defaults = {"lr": lr, "min_lr": 0.0, "warmup_steps": 10, "weight_decay": 0.0, "max_steps": 0, "batch_size": 8,
                "eval_every": 50, "checkpoint_every": 50}
    result = train_preferences(kind, pc, _run_train_config(args, defaults, pc.data), resume=args.resume)
    if result.model_dir is not None:  # (rank 0 only)
        what = "reward model" if kind == "reward-model" else "model" if method == "full" else "adapter"
        print(f"{what}: {result.model_dir}")


def cmd_rl(args: argparse.Namespace) -> None:
    """GRPO or PPO on prompts with rewards from functions or a reward model (align/rl.py)."""
    from .align.rl import run_command

    run_command(args)


def cmd_merge(args: argparse.Namespace) -> None:
    """Fold an adapter into its base and write the result (finetune/merge.py)."""
    from .finetune.merge import merge_adapter

    result = merge_adapter(args.base, args.adapter, args.out, requantize=args.requantize, eval_file=args.eval,
                           force=args.force)
    if "ppl_merged" in result:
        change = 100 * (result["ppl_merged"] / result["ppl_adapter"] - 1)
        print(f"held-out perplexity: {result['ppl_adapter']:.3f} with the adapter unmerged, "
              f"{result['ppl_merged']:.3f} merged{f' and requantized to {args.requantize}' if args.requantize else ''} "
              f"({change:+.2f}%)")
    print(f"merged model written to {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve.app import run_server

    if not 0 <= args.port <= 65535:
        raise InvalidArgument(f"--port must be in [0, 65535], got {args.port}")
    import os

    kv_memory = parse_bytes(args.kv_memory, "--kv-memory") if args.kv_memory is not None else None
    if args.context is not None and args.context < 2:
        raise InvalidArgument(f"--context must be at least 2 tokens, got {args.context}")
    api_key = os.environ.get("EMERGENCE_API_KEY") or None
    if args.api_key_file is not None:
        try:
            api_key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"cannot read --api-key-file {args.api_key_file}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        if not api_key:
            raise InvalidArgument(f"--api-key-file {args.api_key_file} is empty")
    split = lambda text: tuple(t.strip() for t in (text or "").split(",") if t.strip())  # noqa: E731
    adapters = {}
    for item in args.adapter or []:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise InvalidArgument(f"--adapter takes NAME=DIR (a served model name and a PEFT adapter folder), got {item!r}")
        if name in adapters:
            raise InvalidArgument(f"--adapter {name} is given twice")
        adapters[name] = folder
    verifiers = {}
    for item in args.verifier or []:
        name, _, folder = item.partition("=") if "=" in item else ("default", "=", item)
        if not name or not folder:
            raise InvalidArgument(f"--verifier takes NAME=DIR or DIR (a reward model folder, named 'default'), "
                                  f"got {item!r}")
        if name in verifiers:
            raise InvalidArgument(f"--verifier {name} is given twice")
        verifiers[name] = folder
    run_server(args.model, adapters=adapters, verifiers=verifiers, verifier_kind=args.verifier_kind, host=args.host, port=args.port, api_key=api_key, slots=args.slots,
               max_queue=args.max_queue, context_policy=args.context_policy, chat_template=args.chat_template,
               device=args.device, dtype=args.dtype, context=args.context, kv_memory=kv_memory,
               allowed_hosts=split(args.allowed_hosts), allowed_origins=split(args.allowed_origins),
               insecure=args.insecure, prefix_caching=not args.no_prefix_caching, draft=args.draft,
               draft_tokens=args.draft_tokens, draft_dtype=args.draft_dtype, warmup=not args.no_warmup)


def cmd_lab(args: argparse.Namespace) -> None:
    """The lab's experiments (emergence.lab): a sweep in OUT, resumed where it stopped."""
    import dataclasses

    from .lab import scaling

    if args.experiment == "emergence":
        return _lab_emergence(args)
    setting = scaling.SETTINGS["full" if args.full else "quick"]
    changes = {}
    if args.teacher:
        changes["teacher"] = args.teacher
    if args.sizes:
        try:
            changes["sizes"] = tuple(tuple(int(v) for v in s.split("x")) for s in args.sizes.split(","))
        except ValueError:
            raise InvalidArgument(f"--sizes takes LAYERSxWIDTHxHEADS,... (e.g. 1x32x2,2x64x4), got {args.sizes!r}")
        if any(len(s) != 3 for s in changes["sizes"]):
            raise InvalidArgument(f"--sizes takes LAYERSxWIDTHxHEADS,... (e.g. 1x32x2,2x64x4), got {args.sizes!r}")
    if args.budgets:
        try:
            changes["budgets"] = tuple(float(b) for b in args.budgets.split(","))
        except ValueError:
            raise InvalidArgument(f"--budgets takes FLOPs,... (e.g. 1e11,3e11), got {args.budgets!r}")
    for name in ("train_rows", "lrs"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name) if name == "train_rows" else tuple(getattr(args, name))
    if args.experiment == "bitnet":
        from .lab import bitnet

        result = bitnet.sweep(dataclasses.replace(setting, **changes), args.out)
        print(f"floor (the teacher's entropy) {result['teacher_entropy']:.4f} nats/token")
        for row in result["sizes"]:
            print(f"{row['shape']} ({row['params']:,} non-embedding parameters): full precision {row['full']:.4f} "
                  f"(lr {row['full_lr']:g}), ternary {row['ternary']:.4f} (lr {row['ternary_lr']:g}), gap "
                  f"{row['gap']:+.4f}")
        print(f"written: {Path(args.out) / 'bitnet.csv'}, bitnet.json, bitnet.png")
        return
    fits = scaling.sweep(dataclasses.replace(setting, **changes), args.out)
    law = fits["L(N)"]["with_E_fixed_at_the_teacher_entropy"]
    free = fits["L(N)"]["fitted"]
    print(f"L(N) = E + A/N^alpha with E = teacher entropy {fits['teacher_entropy']:.4f}: alpha {law['alpha']:.3f}, "
          f"R^2 {law['r2']:.4f}; fitted freely: E {free['E']:.4f}, alpha {free['alpha']:.3f}, R^2 {free['r2']:.4f} "
          f"(sizes spanning {fits['L(N)']['span']:.0f}x)")
    if "L(D)" in fits:
        d = fits["L(D)"]["with_E_fixed_at_the_teacher_entropy"]
        print(f"L(D) at N = {fits['L(D)']['params']:,.0f}: beta {d['alpha']:.3f}, R^2 {d['r2']:.4f}")
    if "isoFLOP" in fits:
        print(f"compute-optimal N*(C) ~ C^{fits['isoFLOP']['N_opt_exponent']:.2f} (Chinchilla: about 0.5)")
    print(f"written: {Path(args.out) / 'runs.csv'}, fits.json, scaling.png")


def _lab_emergence(args: argparse.Namespace) -> None:
    """`lab emergence`: the arithmetic part over a search-train run, the stories part over a sweep."""
    from pathlib import Path

    from .lab import abilities
    from .problems import first_per_difficulty, load_problems

    if args.run is None and args.students is None:
        raise InvalidArgument("lab emergence needs --run RUN (search-train policies) or --students LAB_OUT, or both")
    if args.per_difficulty < 1 or args.samples < 1:
        raise InvalidArgument("--per-difficulty and --samples must be at least 1")
    policies, rows = [], []
    if args.run is not None:
        policies = abilities.policies_of(Path(args.run))
        rows = first_per_difficulty(load_problems(args.problems or Path(args.run) / "problems" / "heldout.jsonl"),
                                    args.per_difficulty)
    students, teacher = [], None
    if args.students is not None:
        students = abilities.best_students(Path(args.students))
        setting = json.loads((Path(args.students) / "setting.json").read_text())
        teacher = args.teacher or setting["teacher"]
    result = abilities.run(args.out, policies=policies, problems=rows, students=students, teacher=teacher,
                           samples=args.samples)
    for name, r in result["arithmetic"].items():
        o = r["overall"]
        print(f"{name} ({r['params']:,} parameters): exact match {o['exact_match']:.3f}, per-token accuracy "
              f"{o['token_accuracy']:.4f}, log-likelihood per token {o['logp_per_token']:.4f}, P(whole canonical "
              f"solution) {o['solution_prob']:.3f}")
    for name, r in result["stories"].items():
        print(f"student {name} ({r['params']:,} parameters): teacher log-likelihood per token "
              f"{r['teacher_logp_per_token']:.3f}, repeated 4-gram rate {r['repeated_4gram_rate']:.3f}")
    print(f"written: {Path(args.out) / 'emergence.csv'}, emergence.json, emergence.png")


def cmd_problems(args: argparse.Namespace) -> None:
    """Write generated multi-step arithmetic word problems as JSONL (problems.py)."""
    from .problems import difficulty_histogram, generate_problems, parse_steps_range, write_problems

    steps = parse_steps_range(args.steps)
    if args.n < 1:
        raise InvalidArgument(f"--n must be at least 1, got {args.n}")
    out = check_output(args.out, folder=False, force=args.force)
    rows = generate_problems(args.n, steps, seed=args.seed, templates=args.template)
    write_problems(rows, out)
    print(f"wrote {len(rows)} problems to {out} (seed {args.seed}); rows per difficulty: {difficulty_histogram(rows)}")



def cmd_eval(args: argparse.Namespace) -> None:
    """Score a model on a task file (harness.py): per-row results to --out, a summary table (or --json)."""
    from .harness import evaluate, load_program, load_task, write_items
    from .store import resolve_model

    if args.limit is not None and args.limit < 1:
        raise InvalidArgument(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise InvalidArgument(f"--batch-size must be at least 1, got {args.batch_size}")
    out = check_output(args.out, folder=False, force=args.force) if args.out else None
    program = load_program(args.program) if args.program is not None else None
    task = load_task(args.task, limit=args.limit)  # a bad task file is reported before the model loads
    if program is not None and task.output_type != "generate_until":
        raise InvalidArgument(f"{args.task}: --program answers generate_until tasks; {task.name} is {task.output_type}")
    lm = _load(args, resolve_model(args.model))
    result = evaluate(lm, task, batch_size=args.batch_size, program=program)
    if out is not None:
        write_items(result, out)
    print(json.dumps(result.to_json()) if args.json else result.table())


BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
              "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str, flag: str) -> int:
    """'2GiB', '512M', '1.5GB', '1000000' -> bytes (K, M, G and KiB, MiB, GiB are powers of 1024;
    KB, MB, GB powers of 1000)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in BYTE_UNITS or float(match.group(1)) <= 0:
        raise InvalidArgument(f"{flag} takes a positive size such as 2GiB, 512MiB or 1.5GB, got {text!r}")
    return int(float(match.group(1)) * BYTE_UNITS[unit])


def cmd_search(args: argparse.Namespace) -> None:
    """Test-time search strategies over a problem file (emergence.search)."""
    from .search.run import command

    command(args)


def cmd_search_train(args: argparse.Namespace) -> None:
    """Train the search policies and verifiers (emergence.search.train)."""
    from .search.train import command

    command(args)


def cmd_prompt(args: argparse.Namespace) -> None:
    """`prompt run PROGRAM.yaml`: a prompt program (emergence.prompts) and its trace."""
    from .prompts.cli import run_command

    run_command(args)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "generate": (cmd_generate, "complete a prompt"),
    "chat": (cmd_chat, "interactive conversation"),
    "info": (cmd_info, "describe a model"),
    "convert": (cmd_convert, "convert a checkpoint: HF layout, GGUF or llama2.c -> HF layout or GGUF (DST.gguf)"),
    "quantize": (cmd_quantize, "quantize a model's linear layers (int8, int4, GPTQ, nf4, ternary, ggml blocks)"),
    "prepare": (cmd_prepare, "tokenize text files into memory-mapped token shards for pretraining"),
    "train-tokenizer": (cmd_train_tokenizer, "train a byte-level BPE tokenizer on text files"),
    "pretrain": (cmd_pretrain, "train a model from scratch on prepared token shards (torchrun for several processes)"),
    "finetune": (cmd_finetune, "instruction-tune a model on JSONL rows: LoRA, DoRA, QLoRA or full fine-tuning"),
    "merge": (cmd_merge, "fold a LoRA/DoRA adapter into its base model and write the result"),
    "reward-model": (cmd_align, "train a reward model on preference pairs (saved as transformers' "
                                "*ForSequenceClassification)"),
    "dpo": (cmd_align, "align a model on preference pairs with DPO or IPO (full, LoRA or DoRA)"),
    "grpo": (cmd_rl, "GRPO: sample groups of completions, reward them (a function or a reward model), learn"),
    "ppo": (cmd_rl, "PPO with a value model: rewards from a reward model or a function, per-token KL, GAE"),
    "list": (cmd_list, "list the models in the local store ($EMERGENCE_HOME, default ~/.emergence)"),
    "show": (cmd_show, "describe a model: a store model's details, parameters, system prompt, template (or any model's details)"),
    "create": (cmd_create, "create a store model from a Modelfile (FROM, PARAMETER, SYSTEM, TEMPLATE)"),
    "import": (cmd_import, "copy an HF-layout folder or a GGUF file into the store under a name"),
    "cp": (cmd_cp, "copy a store model to a new name"),
    "rm": (cmd_rm, "remove models from the store"),
    "verify": (cmd_verify, "check store models' files against the sha256 their manifests record"),
    "run": (cmd_run, "answer a prompt (or chat) with a store model, its default parameters and system prompt"),
    "serve": (cmd_serve, "serve a model over an OpenAI-compatible HTTP API with continuous batching"),
    "embed": (cmd_embed, "token, word or sentence vectors from any layer (mean- or last-token pooled)"),
    "neighbors": (cmd_neighbors, "the tokens nearest a word by cosine similarity of their embeddings"),
    "context": (cmd_context, "one word in two contexts: how far apart its hidden states are, layer by layer"),
    "lens": (cmd_lens, "logit lens: the top next tokens read out of every layer's hidden state"),
    "lab": (cmd_lab, "the lab: `lab scaling` fits scaling laws against a teacher's known entropy"),
    "problems": (cmd_problems, "write multi-step arithmetic word problems (JSONL) with step-by-step solutions"),
    "eval": (cmd_eval, "score a model on a task file (lm-evaluation-harness format): multiple choice or generation"),
    "search": (cmd_search, "test-time search over a problem file: majority, best-of-N, beam search, DVTS, ..."),
    "search-train": (cmd_search_train, "train the policies (3 sizes), ORM and PRM that search uses, on generated "
                                       "arithmetic problems"),
    "prompt": (cmd_prompt, "prompt programs (zero-shot, few-shot, CoT, cascades...): prompt run PROGRAM.yaml"),
}



class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other bad input: one line on stderr, exit status 1."""

    def error(self, message: str):
        print(f"emergence: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emergence", description="Run and study language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # no abbreviated flags: `--api-key` must not quietly mean `--api-key-file`
    parsers = {name: sub.add_parser(name, help=help_, allow_abbrev=False) for name, (_, help_) in COMMANDS.items()}

    g = parsers["generate"]
    g.add_argument("prompt", nargs="?", default=None, help="text to continue (default: empty, i.e. BOS only)")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true", help='print {"text", "token_ids", "logprobs"}')
    g.add_argument("--logprobs", type=int, default=None, metavar="N", help="include N top alternatives per token")
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="speculative decoding: this smaller model (same tokenizer) proposes tokens that MODEL "
                        "checks in one pass; greedy output is unchanged, sampling keeps MODEL's distribution")
    g.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, metavar="K",
                   help="tokens the draft proposes per round (default %(default)s)")
    g.add_argument("--draft-dtype", default=None, metavar="DTYPE", help=DRAFT_DTYPE_HELP)
    s = g.add_argument_group("structured output (one of them: the output is constrained to match it)")
    s.add_argument("--json-schema", default=None, metavar="FILE", help="a JSON Schema file: the output is JSON valid under it")
    s.add_argument("--regex", default=None, metavar="R", help="a regular expression the whole output matches")
    s.add_argument("--grammar", default=None, metavar="FILE", help="a Lark grammar file (llguidance's dialect): the "
                                                                   "output is derived from its start rule")

    c = parsers["chat"]
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--chat-template", default=None,
                   help="built-in name (chatml, llama2, llama3, mistral, phi3, vicuna, plain) or Jinja text "
                        "(default: the model's own; a base model without one continues plain text)")
    c.add_argument("--context-policy", default="drop-oldest", choices=("drop-oldest", "condense", "error"),
                   help="what a conversation longer than the context loses (default %(default)s)")

    for name in ("embed", "neighbors", "context", "lens"):
        p = parsers[name]
        _add_model_args(p)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    parsers["embed"].add_argument("texts", nargs="+", metavar="TEXT", help="a token, a word or a sentence")
    parsers["embed"].add_argument("--layer", type=int, default=-1, help="0: the embeddings, i: block i's output, "
                                                                        "-1: the last (default)")
    parsers["embed"].add_argument("--pooling", default="mean", choices=["mean", "last", "none"],
                                  help="over the text's tokens (none: one vector per token)")
    parsers["neighbors"].add_argument("word")
    parsers["neighbors"].add_argument("--k", type=int, default=10, help="how many (default 10)")
    parsers["context"].add_argument("word")
    parsers["context"].add_argument("contexts", nargs="+", metavar="CONTEXT", help="two sentences holding the word")
    parsers["lens"].add_argument("prompt")
    parsers["lens"].add_argument("--k", type=int, default=5, help="tokens per layer (default 5)")

    i = parsers["info"]
    i.add_argument("model_path", nargs="?", default=None, metavar="MODEL")
    i.add_argument("--tokenizer", default=None)
    i.add_argument("--dtype", default=None)
    i.add_argument("--json", action="store_true")

    v = parsers["convert"]
    v.add_argument("src", metavar="SRC")
    v.add_argument("dst", metavar="DST")
    v.add_argument("--tokenizer", default=None, help="tokenizer .bin for a llama2.c SRC")
    v.add_argument("--dtype", default=None, help="fp32, bf16 or fp16")
    v.add_argument("--max-shard-mb", type=int, default=None, help="split the weights into shards of this size")
    v.add_argument("--force", action="store_true", help="replace a model already at DST; with --type tq1_0/tq2_0, "
                   "also round a model not trained ternary")
    v.add_argument("--type", default=None, help="GGUF tensor type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
                   "q4_k, q5_k, q6_k, or tq1_0, tq2_0 for a ternary model (default: the model's dtype)")

    q = parsers["quantize"]
    q.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF-layout folder, llama2.c .bin (with --tokenizer), or packaged model name; default: the shipped model")
    q.add_argument("--to", required=True, metavar="FORMAT",
                   help="int8, int4, int4-gptq, nf4, ternary, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k")
    q.add_argument("--out", required=True, metavar="PATH", help="folder to write the quantized checkpoint into")
    q.add_argument("--group-size", type=int, default=None, help="int4 group size: 32, 64 (default) or 128")
    q.add_argument("--calibration", default=None, metavar="TEXTFILE", help="calibration text for int4-gptq")
    q.add_argument("--act-bits", type=int, default=None, help="ternary only: 8 quantizes activations per token")
    q.add_argument("--skip", action="append", default=[], metavar="NAME",
                   help="keep layers of this name in full precision (e.g. down_proj; repeatable; lm_head always)")
    q.add_argument("--tokenizer", default=None, help="tokenizer .bin for a llama2.c MODEL")
    q.add_argument("--force", action="store_true", help="replace a model already in --out")

    p = parsers["prepare"]
    p.add_argument("inputs", nargs="+", metavar="TEXT_OR_JSONL", help="files, folders or glob patterns")
    p.add_argument("--tokenizer", required=True, metavar="TOK", help="tokenizer file/folder or a model's name or path")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="share of each file's tokens held out for validation (default %(default)s)")
    p.add_argument("--invalid-utf8", choices=("replace", "skip"), default="replace")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="ids per shard file")

    t = parsers["train-tokenizer"]
    t.add_argument("inputs", nargs="+", metavar="FILES")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N")
    t.add_argument("--out", required=True, metavar="DIR")
    t.add_argument("--invalid-utf8", choices=("replace", "skip"), default="replace")

    _add_serve_args(parsers["serve"])

    r = parsers["pretrain"]
    from .config import PRESETS

    r.description = ("Train a model from scratch (--config), or continue one (--init), on token shards; --resume "
                     "continues the run in --out with its own settings (flags may change max-steps and how it "
                     "reports: evaluation, samples, checkpoints, logging).")
    r.add_argument("--config", default=None, metavar="PRESET_OR_JSON",
                   help="a model config JSON, or a preset: " + ", ".join(sorted(PRESETS)))
    r.add_argument("--data", default=None, metavar="DIR",
                   help="folder written by `emergence prepare` (with --resume: the run's own, unless given)")
    r.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint, metrics, final model")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint, with its saved settings")
    r.add_argument("--train-config", default=None, metavar="JSON", help="training settings file (flags override)")
    r.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    r.add_argument("--checkpoint-activations", action="store_true", default=None, help=CHECKPOINT_ACTIVATIONS_HELP)
    r.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: shard with FSDP2")
    r.add_argument("--save-best", action="store_true", default=None, help="keep OUT/best at the lowest val loss")
    r.add_argument("--no-progress", action="store_true", help="no live progress line")
    for name, (kind, help_) in _TRAIN_FLAGS.items():
        r.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_)
    _add_finetune_args(parsers["finetune"], parsers["merge"])
    for kind in ("reward-model", "dpo"):
        _add_align_args(parsers[kind], kind)
    _add_store_args(parsers)
    _add_problems_args(parsers["problems"])
    lab = parsers["lab"]
    lab.add_argument("experiment", choices=["scaling", "emergence", "bitnet"],
                     help="scaling: L(N), L(D) and an isoFLOP sweep; emergence: abilities against size, exact match "
                          "beside per-token metrics (policies of a search-train run; students of a scaling sweep); "
                          "bitnet: BitNet b1.58 against full precision at every size, on the same tokens")
    lab.add_argument("--out", required=True, help="the sweep's folder (a rerun resumes it)")
    which = lab.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the 2-CPU-core setting (default)")
    which.add_argument("--full", action="store_true", help="the GPU setting")
    lab.add_argument("--teacher", help="a shipped model to sample the corpus from (stories260K, emergence-6m)")
    lab.add_argument("--sizes", help="student shapes LAYERSxWIDTHxHEADS, comma separated")
    lab.add_argument("--budgets", help="isoFLOP budgets in FLOPs, comma separated")
    lab.add_argument("--train-rows", type=int, help="training samples of one context each")
    lab.add_argument("--lrs", type=float, nargs="+", help="learning rates tried per size")
    lab.add_argument("--run", metavar="RUN", help="emergence: an `emergence search-train` folder (its policies and "
                     "held-out problems)")
    lab.add_argument("--problems", metavar="FILE.jsonl", help="emergence: problems (default RUN/problems/heldout.jsonl)")
    lab.add_argument("--per-difficulty", type=int, default=50, help="emergence: problems per difficulty (default 50)")
    lab.add_argument("--students", metavar="LAB_OUT", help="emergence: an `emergence lab scaling` folder whose "
                     "students' stories are graded (its teacher judges them)")
    lab.add_argument("--samples", type=int, default=16, help="emergence: stories per student (default 16)")
    from .search.run import add_arguments as _add_search_args

    _add_search_args(parsers["search"])
    from .search.train import add_arguments as _add_search_train_args

    _add_search_train_args(parsers["search-train"])
    _add_eval_args(parsers["eval"])
    from .align.rl import add_arguments as _add_rl_args

    _add_rl_args(parsers["grpo"], "grpo")
    _add_rl_args(parsers["ppo"], "ppo")
    from .prompts.cli import add_arguments as _add_prompt_args

    _add_prompt_args(parsers["prompt"], _add_model_args, _Parser)
    return parser


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.description = ("Score a model on the JSONL rows a task file names (a subset of lm-evaluation-harness' task "
                     "YAML): multiple-choice tasks by log-likelihood (acc, acc_norm, ...), generation tasks by "
                     "exact match, regex match, F1 or a checker function.")
    p.add_argument("--task", required=True, metavar="TASK.yaml", help="the task file")
    _add_model_args(p)
    p.add_argument("--program", default=None, metavar="P", help="a prompt program (emergence.prompts, a YAML file) "
                   "that answers each row of a generate_until task, the row's fields its inputs, in place of the "
                   "task's prompt and greedy completion")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N rows")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="sequences per forward pass when scoring choices (default %(default)s)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl", help="write every row's result here")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _add_problems_args(p: argparse.ArgumentParser) -> None:
    from .problems import TEMPLATES

    p.description = ("Generate arithmetic word problems of 1 to 8 steps, one JSON row each: question, answer, "
                     "steps ('Step k: a op b = c') and difficulty (the number of steps).")
    p.add_argument("--steps", default="1-8", metavar="K",
                   help="steps per problem: a number (3) or a range (1-8, spread evenly; default %(default)s)")
    p.add_argument("--n", type=int, default=100, metavar="N", help="problems to write (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same problems (default %(default)s)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write the problems")
    p.add_argument("--template", action="append", default=None, choices=sorted(TEMPLATES),
                   help="only this template (repeatable; default: all of them, in turn)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def _add_finetune_args(f: argparse.ArgumentParser, m: argparse.ArgumentParser) -> None:
    f.description = ("Fine-tune MODEL on JSONL rows: Alpaca {instruction, input, output}, chat {messages}, "
                     "ShareGPT {conversations} or {prompt, completion}. Chat-shaped rows are rendered with the "
                     "model's chat template (or --chat-template); the loss covers assistant tokens only.")
    f.add_argument("model", metavar="MODEL", help="folder, GGUF file, store name or packaged model")
    f.add_argument("--data", nargs="+", default=None, metavar="FILE.jsonl", help="training rows (several files allowed)")
    f.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint, metrics, OUT/adapter or OUT/model")
    how = f.add_mutually_exclusive_group()
    how.add_argument("--lora", action="store_true", help="train a LoRA adapter (the default)")
    how.add_argument("--dora", action="store_true", help="train a DoRA adapter (magnitude + direction)")
    how.add_argument("--full", action="store_true", help="train every weight")
    f.add_argument("--quantize", default=None, choices=("nf4", "int4", "int8", "q4_0"),
                   help="QLoRA: keep the frozen base in this format")
    _add_adapter_args(f)
    f.add_argument("--chat-template", default=None, help="built-in name, Jinja file or text (default: the model's)")
    f.add_argument("--pack", action="store_true", help="pack several rows into each context (no attention across)")
    f.add_argument("--truncate", action="store_true", help="cut rows longer than the context (default: drop them)")
    f.add_argument("--val-fraction", type=float, default=0.05, help="rows held out for eval loss and samples")
    f.add_argument("--epochs", type=float, default=None, help="passes over the rows when --max-steps is not given (1)")
    _add_loop_args(f)
    m.add_argument("base", metavar="BASE", help="the base model the adapter was trained on")
    m.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter folder")
    m.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    m.add_argument("--requantize", default=None, metavar="FORMAT",
                   help="a quantized base: dequantize, merge, and quantize again to FORMAT (e.g. nf4)")
    m.add_argument("--eval", default=None, metavar="TEXTFILE", help="held-out text: perplexity before and after")
    m.add_argument("--force", action="store_true", help="replace a model already in --out")


def _add_adapter_args(f: argparse.ArgumentParser) -> None:
    f.add_argument("--r", type=int, default=None, help="adapter rank (default 8)")
    f.add_argument("--alpha", type=float, default=None, help="adapter alpha (default 16): scaling alpha/r")
    f.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter's input (default 0.05)")
    f.add_argument("--target", default=None, metavar="NAMES",
                   help="q,k,v,o,gate,up,down (default: all of them), HF names (c_attn), all-linear, or re:REGEX")
    f.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")


def _add_loop_args(f: argparse.ArgumentParser) -> None:
    """The training loop's flags of a run on a model (finetune, reward-model, dpo)."""
    f.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    f.add_argument("--train-config", default=None, metavar="JSON", help="training settings file (flags override)")
    f.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    f.add_argument("--checkpoint-activations", action="store_true", default=None, help=CHECKPOINT_ACTIVATIONS_HELP)
    f.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: shard with FSDP2")
    f.add_argument("--save-best", action="store_true", default=None, help="keep OUT/best at the lowest val loss")
    f.add_argument("--no-progress", action="store_true", help="no live progress line")
    for name, (kind, help_) in _TRAIN_FLAGS.items():
        if name not in ("init", "objective"):
            f.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_)


def _add_align_args(p: argparse.ArgumentParser, kind: str) -> None:
    p.description = (("Train a reward model (MODEL's decoder with a scalar head; the Bradley-Terry loss) on "
                      if kind == "reward-model" else "Align MODEL with DPO (or IPO) on ") +
                     "JSONL preference rows {prompt, chosen, rejected[, margin]}, each a string or a chat message "
                     "list (rendered with the model's chat template or --chat-template); " +
                     ("each row is scored at its last token (a margin, if given, is the loss's). " if kind ==
                      "reward-model" else "the log-probs are the completions' (the reference's computed once, "
                      "cached in OUT). ") + "Rows whose chosen equals rejected are counted and skipped.")
    p.add_argument("model", metavar="MODEL", help="folder, GGUF file, store name or packaged model")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE.jsonl", help="preference rows (several files allowed)")
    out = "OUT/model (a *ForSequenceClassification folder)" if kind == "reward-model" else "OUT/model or OUT/adapter"
    p.add_argument("--out", required=True, metavar="DIR", help=f"run folder: checkpoint, metrics, {out}")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--full", action="store_true", help="train every weight (the default)")
    how.add_argument("--lora", action="store_true", help="train a LoRA adapter" + (
        " on the decoder (the score head trains in full; merged when saved)" if kind == "reward-model" else
        " (the reference is the base with the adapter off: no second copy of the weights)"))
    how.add_argument("--dora", action="store_true", help="train a DoRA adapter (magnitude + direction)")
    _add_adapter_args(p)
    p.add_argument("--chat-template", default=None, help="built-in name, Jinja file or text (default: the model's)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="pairs held out for evaluation")
    p.add_argument("--epochs", type=float, default=None, help="passes over the pairs when --max-steps is not given (1)")
    if kind == "reward-model":
        p.add_argument("--center-rewards", type=float, default=None, metavar="COEF",
                       help="add COEF * mean((r_chosen + r_rejected)^2): rewards centred on 0 (TRL's "
                            "center_rewards_coefficient, e.g. 0.01)")
    else:
        p.add_argument("--beta", type=float, default=None, help="the KL penalty's strength (default 0.1)")
        p.add_argument("--loss", default=None, choices=("sigmoid", "ipo"), help="DPO's sigmoid (default) or IPO")
        p.add_argument("--label-smoothing", type=float, default=None, metavar="EPS",
                       help="sigmoid: conservative DPO, labels flipped with probability EPS (default 0)")
    _add_loop_args(p)


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="store name, packaged model, HF folder or GGUF file (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="require 'Authorization: Bearer KEY' on every API request, KEY read from FILE (or set "
                        "EMERGENCE_API_KEY; never on the command line, where other users can read it)")
    p.add_argument("--allowed-hosts", default=None, metavar="H1,H2",
                   help="Host header names accepted besides the loopback names ('*': any)")
    p.add_argument("--allowed-origins", default=None, metavar="O1,O2",
                   help="browser origins allowed to call the API (CORS) besides the server's own ('*': any)")
    p.add_argument("--insecure", action="store_true",
                   help="allow serving beyond this machine (a non-loopback --host) without an API key")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default %(default)s)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="longest prompt + completion a request may have (default: the model's context window)")
    p.add_argument("--kv-memory", default=None, metavar="SIZE",
                   help="KV cache budget, e.g. 2GiB (default: room for every slot to hold a full context); "
                        "memory is taken as sequences grow, in blocks of 64 tokens")
    p.add_argument("--draft", default=None, metavar="MODEL",
                   help="speculative decoding for a request decoded alone: this smaller model (same tokenizer) "
                        "proposes tokens the served model checks in one pass (default: a store model's DRAFT)")
    p.add_argument("--draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, metavar="K",
                   help="tokens the draft proposes per round")
    p.add_argument("--draft-dtype", default=None, metavar="DTYPE", help=DRAFT_DTYPE_HELP)
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not keep the KV blocks of earlier prompts for requests that start the same way "
                        "(a shared system prompt, the conversation so far)")
    p.add_argument("--no-warmup", action="store_true",
                   help="start serving without first sending each generation route a two-token request "
                        "in-process (its first request then pays one-time costs)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot")
    p.add_argument("--context-policy", default="drop-oldest", choices=("drop-oldest", "condense", "error"),
                   help="what a chat longer than the context loses")
    p.add_argument("--chat-template", default=None,
                   help="built-in name (chatml, llama2, llama3, mistral, phi3, vicuna, plain) or Jinja text")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--adapter", action="append", default=None, metavar="NAME=DIR",
                   help="also serve MODEL with this LoRA/DoRA adapter as model NAME (repeatable; all share the "
                        "base weights, and one batch mixes them)")
    p.add_argument("--verifier", action="append", default=None, metavar="NAME=DIR",
                   help="load this reward model folder as the verifier NAME (DIR alone: 'default') for chat requests "
                        "with a 'search' field, which name it (repeatable)")
    p.add_argument("--verifier-kind", default="prm", choices=("prm", "orm"),
                   help="the verifiers score each step (prm) or the whole solution (orm) (default %(default)s)")


def _add_store_args(parsers: dict[str, argparse.ArgumentParser]) -> None:
    parsers["list"].add_argument("--json", action="store_true", help="one JSON array")
    s = parsers["show"]
    s.add_argument("name", metavar="NAME")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the manifest, with the path and size")
    fmt.add_argument("--modelfile", action="store_true", help="a Modelfile that recreates the model")
    c = parsers["create"]
    c.add_argument("name", metavar="NAME", help="name[:tag] (tag: latest by default)")
    c.add_argument("--file", "-f", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    i = parsers["import"]
    i.add_argument("path", metavar="PATH", help="HF-layout folder or GGUF file")
    i.add_argument("name", metavar="NAME", help="name[:tag]")
    i.add_argument("--force", action="store_true", help="replace a model of that name")
    cp = parsers["cp"]
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    cp.add_argument("--force", action="store_true", help="replace a model named DST")
    parsers["rm"].add_argument("names", nargs="+", metavar="NAME")
    parsers["verify"].add_argument("names", nargs="+", metavar="NAME")
    run = parsers["run"]
    run.description = ("Answer PROMPT once (as generate --stream), or chat when there is none (as chat), with the "
                       "model's stored PARAMETERs as defaults and its SYSTEM prompt; sampling flags override them.")
    run.add_argument("name", metavar="NAME", help="a store model (or any model --model takes)")
    run.add_argument("prompt", nargs="?", default=None, help="answer this once (default: interactive chat)")
    run.add_argument("--tokenizer", default=None, help="tokenizer .bin for a llama2.c checkpoint")
    run.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    run.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")
    _add_sampling_args(run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][0](args)
    except EmergenceError as e:
        print(f"emergence: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
