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

from .api import LanguageModel, load, resolve_dtype
from .errors import EmergenceError, InvalidArgument
from .generate import Completion, TokenLogprob, generate, stream
from .sampling import SamplingParams


# ------------------------------------------------------------------------------ arguments
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="HF-layout folder, llama2.c .bin (with --tokenizer), or packaged model name; default: the shipped model")
    p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (required for llama2.c .bin checkpoints)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", "-t", type=float, default=d.temperature, help="0 = greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--min-p", type=float, default=d.min_p)
    g.add_argument("--typical-p", type=float, default=d.typical_p)
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    g.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS", help="add BIAS to token ID's logit")
    g.add_argument("--max-new-tokens", "-n", type=int, default=d.max_new_tokens)
    g.add_argument("--seed", type=int, default=None, help="same seed, same output")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-id", action="append", type=int, default=[], help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    g.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")


def _sampling(args: argparse.Namespace, logprobs: int | None = None) -> SamplingParams:
    bias = {}
    for item in args.logit_bias:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise InvalidArgument(f"--logit-bias takes ID=BIAS, got {item!r}") from None
    return SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        typical_p=args.typical_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, logit_bias=bias,
        max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos, seed=args.seed, logprobs=logprobs)


def _load(args: argparse.Namespace) -> LanguageModel:
    return load(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype)


# --------------------------------------------------------------------------------- verbs
def cmd_generate(args: argparse.Namespace) -> None:
    logprobs = args.logprobs if args.logprobs is not None else (0 if args.json else None)
    params = _sampling(args, logprobs)  # validate before the (slower) model load
    lm = _load(args)
    prompt = args.prompt if args.prompt is not None else ""
    if args.stream:
        for chunk in stream(lm.model, lm.tokenizer, prompt, params, truncate=args.truncate):
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
    completion = generate(lm.model, lm.tokenizer, [prompt], params, truncate=args.truncate)[0]
    if args.json:
        print(json.dumps(_completion_json(lm, completion), ensure_ascii=False))
    else:
        print(completion.text)


def _logprob_json(lm: LanguageModel, lp: TokenLogprob) -> dict:
    piece = lm.tokenizer.id_to_piece
    return {"token_id": lp.token_id, "token": piece(lp.token_id), "logprob": lp.logprob,
            "top": [{"token_id": t, "token": piece(t), "logprob": v} for t, v in lp.top]}


def _completion_json(lm: LanguageModel, c: Completion) -> dict:
    return {"text": c.text, "token_ids": c.token_ids,
            "logprobs": [_logprob_json(lm, lp) for lp in (c.logprobs or [])],
            "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens}


def cmd_chat(args: argparse.Namespace) -> None:
    params = _sampling(args)
    lm = _load(args)
    template = _chat_template(args.model, args.chat_template)
    if template is None:
        _chat(lm, params)
    else:
        _chat_with_template(lm, params, template, policy=args.context_policy)


def _chat_template(model: str | None, override: str | None):
    """The model's own chat template (HF folder or GGUF metadata) or the override; None for
    a base model without one (it chats by plain continuation)."""
    from .api import _locate
    from .chat import find_model_template, resolve_chat_template

    found = find_model_template(_locate(model))
    if override is None and found is None:
        return None
    return resolve_chat_template(found, override=override)


def _chat_with_template(lm: LanguageModel, params: SamplingParams, template, *, policy: str,
                        system: str | None = None) -> None:
    """A conversation rendered by the chat template; when it outgrows the context, `policy`
    drops or condenses the oldest turns (said on stderr), never the latest message."""
    from .chat import fit_context

    print(f"chatting with {lm.config.name} ({template.name} template; context policy {policy}). "
          "Ctrl-D or /exit ends.", file=sys.stderr)
    messages = [{"role": "system", "content": system}] if system else []
    stop = tuple(dict.fromkeys((*params.stop, *template.stop)))
    reserve = min(params.max_new_tokens, lm.config.block_size // 2)
    while (line := _read_line()) is not None:
        messages.append({"role": "user", "content": line})
        fit = fit_context(messages, lm.tokenizer, template, context_window=lm.config.block_size, reserve=reserve,
                          policy=policy)
        if fit.dropped:
            print(f"({fit.describe()})", file=sys.stderr)
        reply = ""
        for piece in lm.stream(fit.token_ids, **{**_fields(params), "stop": stop}):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


def _read_line() -> str | None:
    """The user's next line, or None at end of input or /exit."""
    try:
        line = input("> ")
    except EOFError:
        print(file=sys.stderr)
        return None
    return None if line.strip() in ("/exit", "/quit") else line


def _chat(lm: LanguageModel, params: SamplingParams, transcript: str = "") -> None:
    """Read lines from stdin and continue `transcript` + each line, printing the replies."""
    print(f"chatting with {lm.config.name} as plain continuation (a base model: the conversation is "
          "continued as text). Ctrl-D or /exit ends.", file=sys.stderr)
    while (line := _read_line()) is not None:
        transcript += line
        reply = ""
        for piece in lm.stream(transcript, truncate=True, **_fields(params)):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        transcript += reply + "\n"


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in params.__dataclass_fields__}


def cmd_info(args: argparse.Namespace) -> None:
    from .quant import quantized_modules

    lm = load(args.model_path, tokenizer=args.tokenizer, device="cpu", dtype=args.dtype)
    c = lm.config
    weights = {id(p): p for p in lm.model.parameters()}.values()
    quantized = quantized_modules(lm.model)  # their weights are packed buffers, not parameters
    info = {
        "name": c.name, "architecture": c.family,
        "parameters": sum(p.numel() for p in weights) + sum(m.in_features * m.out_features for m in quantized.values()),
        "dtype": str(next(iter(weights)).dtype).removeprefix("torch."),
        "quantization": ", ".join(sorted({m.format for m in quantized.values()})) or None,
        "bytes": sum(p.numel() * p.element_size() for p in weights)
        + sum(b.numel() * b.element_size() for m in quantized.values() for b in m.buffers()),
        "context_length": c.block_size,
        "layers": c.n_layer, "heads": c.n_head, "kv_heads": c.n_kv_head, "embedding": c.n_embd,
        "mlp": f"{c.mlp} ({c.intermediate_size})", "norm": c.norm, "position": c.position,
        "rope_theta": c.rope_theta if c.position == "rope" else None, "sliding_window": c.sliding_window,
        "tied_embeddings": c.tie_embeddings, "vocab_size": c.vocab_size,
    }
    if args.json:
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
        if dst.is_dir():
            raise InvalidArgument(f"{dst} is a folder; a GGUF output is a file")
        lm = load(args.src, tokenizer=args.tokenizer, device="cpu", dtype=dtype)
        save_gguf(lm.model, lm.tokenizer, dst, file_type)
        print(f"wrote {dst} ({lm.config.family}, GGUF {file_type})")
        return
    if args.type is not None:
        raise InvalidArgument("--type applies to a GGUF output (DST ending in .gguf)")
    lm = load(args.src, tokenizer=args.tokenizer, device="cpu", dtype=dtype)
    if dst.exists() and not dst.is_dir():
        raise InvalidArgument(f"{dst} exists and is not a folder")
    save_hf(lm.model, dst, max_shard_bytes=args.max_shard_mb * 2**20 if args.max_shard_mb else None)
    lm.tokenizer.save(dst)
    print(f"wrote {dst} ({lm.config.family}, {str(next(lm.model.parameters()).dtype).removeprefix('torch.')})")


def cmd_quantize(args: argparse.Namespace) -> None:
    import os
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
    out = Path(args.out)
    existing_parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing_parent.is_dir():
        raise InvalidArgument(f"--out {out}: {existing_parent} exists and is not a folder")
    if not os.access(existing_parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--out {out}: {existing_parent} is not writable")

    lm = load(args.model, tokenizer=args.tokenizer, device="cpu")
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
    """A tokenizer file or folder, or the tokenizer of a model (path or packaged name)."""
    from .api import _locate
    from .tokenizer import Tokenizer

    path = Path(spec)
    if path.exists():
        return Tokenizer.load(path)
    return Tokenizer.load(_locate(spec))


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
    from .train.trainer import TrainConfig, load_train_config, train

    settings = load_train_config(args.train_config) if args.train_config else {}
    for name in (*_TRAIN_FLAGS, "compile", "fsdp", "save_best"):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    settings.update(data=args.data, out=args.out)
    if args.no_progress:
        settings["progress"] = False
    if args.config is None and settings.get("init") is None and not args.resume:
        raise InvalidArgument("pretrain needs --config PRESET_OR_JSON (or --init MODEL, or --resume)")
    tc = TrainConfig(**settings)
    train(args.config, tc, resume=args.resume)


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
    from .store import Modelfile, Store

    entry = Store().get(args.name)
    m, d = entry.manifest, entry.manifest.details
    if args.modelfile:
        print(Modelfile(str(entry.model_path), m.parameters, m.system, m.template).to_text(), end="")
        return
    if args.json:
        print(json.dumps({**m.to_json(), "path": str(entry.model_path), "size": entry.size()}, ensure_ascii=False))
        return
    print("  Model")
    for key, value in (("name", str(entry.name)), ("architecture", d.architecture),
                       ("parameters", f"{d.parameter_count:,}"), ("context length", f"{d.context_length:,}"),
                       ("format", d.format), ("layout", d.layout), ("source", m.source), ("created", m.created),
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

    _report("imported", Store().import_model(args.path, args.name))


def cmd_cp(args: argparse.Namespace) -> None:
    from .store import ModelName, Store

    entry = Store().copy(args.src, args.dst)
    print(f"copied {ModelName.parse(args.src)} to {entry.name}")


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
    from .store import Store, sampling_defaults, with_system

    entry = None if Path(args.name).exists() else Store().find(args.name)  # a path wins, as in load()
    settings = _run_settings(args, sampling_defaults(entry) if entry is not None else {})
    params = _sampling(settings)
    system = entry.manifest.system if entry is not None else None
    lm = load(args.name, device=args.device, dtype=args.dtype)
    if args.prompt is None:
        template = _chat_template(args.name, entry.manifest.template if entry is not None else None)
        if template is None:
            _chat(lm, params, with_system(system, ""))
        else:
            _chat_with_template(lm, params, template, policy="drop-oldest", system=system)
        return
    for piece in lm.stream(with_system(system, args.prompt), truncate=settings.truncate, **_fields(params)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _sampling_flag_defaults() -> dict:
    """The sampling flags' destinations and their defaults (as `generate` has them)."""
    p = argparse.ArgumentParser(add_help=False)
    _add_sampling_args(p)
    return vars(p.parse_args([]))


def _run_settings(args: argparse.Namespace, stored: dict) -> argparse.Namespace:
    """Sampling flags for `run`: the generate defaults, then the entry's stored defaults, then
    the flags given on this command line (a given --stop replaces the stored stop list)."""
    values = _sampling_flag_defaults()
    values.update({k: list(v) if k == "stop" else v for k, v in stored.items()})
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    return argparse.Namespace(**values)


# TrainConfig fields settable by a flag of the same name (None: keep the file's or the default).
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


def cmd_serve(args: argparse.Namespace) -> None:
    from .serve.app import run_server

    if not 0 <= args.port <= 65535:
        raise InvalidArgument(f"--port must be in [0, 65535], got {args.port}")
    run_server(args.model, host=args.host, port=args.port, api_key=args.api_key, slots=args.slots,
               max_queue=args.max_queue, context_policy=args.context_policy, chat_template=args.chat_template,
               device=args.device, dtype=args.dtype)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "generate": (cmd_generate, "complete a prompt"),
    "chat": (cmd_chat, "interactive conversation"),
    "info": (cmd_info, "describe a model"),
    "convert": (cmd_convert, "convert a checkpoint: HF layout, GGUF or llama2.c -> HF layout or GGUF (DST.gguf)"),
    "quantize": (cmd_quantize, "quantize a model's linear layers (int8, int4, GPTQ, nf4, ternary, ggml blocks)"),
    "prepare": (cmd_prepare, "tokenize text files into memory-mapped token shards for pretraining"),
    "train-tokenizer": (cmd_train_tokenizer, "train a byte-level BPE tokenizer on text files"),
    "pretrain": (cmd_pretrain, "train a model from scratch on prepared token shards (torchrun for several processes)"),
    "list": (cmd_list, "list the models in the local store ($EMERGENCE_HOME, default ~/.emergence)"),
    "show": (cmd_show, "describe a model of the store: details, default parameters, system prompt, template"),
    "create": (cmd_create, "create a store model from a Modelfile (FROM, PARAMETER, SYSTEM, TEMPLATE)"),
    "import": (cmd_import, "copy an HF-layout folder or a GGUF file into the store under a name"),
    "cp": (cmd_cp, "copy a store model to a new name"),
    "rm": (cmd_rm, "remove models from the store"),
    "run": (cmd_run, "answer a prompt (or chat) with a store model, its default parameters and system prompt"),
    "serve": (cmd_serve, "serve a model over an OpenAI-compatible HTTP API with continuous batching"),
}



class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other bad input: one line on stderr, exit status 1."""

    def error(self, message: str):
        print(f"emergence: error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emergence", description="Run and study language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parsers = {name: sub.add_parser(name, help=help_) for name, (_, help_) in COMMANDS.items()}

    g = parsers["generate"]
    g.add_argument("prompt", nargs="?", default=None, help="text to continue (default: empty, i.e. BOS only)")
    _add_model_args(g)
    _add_sampling_args(g)
    g.add_argument("--stream", action="store_true", help="print text as it is generated")
    g.add_argument("--json", action="store_true", help='print {"text", "token_ids", "logprobs"}')
    g.add_argument("--logprobs", type=int, default=None, metavar="N", help="include N top alternatives per token")

    c = parsers["chat"]
    _add_model_args(c)
    _add_sampling_args(c)
    c.add_argument("--chat-template", default=None,
                   help="built-in name (chatml, llama2, llama3, mistral, phi3, vicuna, plain) or Jinja text "
                        "(default: the model's own; a base model without one continues plain text)")
    c.add_argument("--context-policy", default="drop-oldest", choices=("drop-oldest", "condense", "error"),
                   help="what a conversation longer than the context loses (default %(default)s)")

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
    v.add_argument("--type", default=None, help="GGUF tensor type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
                   "q4_k, q5_k or q6_k (default: the model's dtype)")

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
    r.add_argument("--config", default=None, metavar="PRESET_OR_JSON", help="model preset name or config JSON")
    r.add_argument("--data", required=True, metavar="DIR", help="folder written by `emergence prepare`")
    r.add_argument("--out", required=True, metavar="DIR", help="run folder: checkpoint, metrics, final model")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    r.add_argument("--train-config", default=None, metavar="JSON", help="training settings file (flags override)")
    r.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    r.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: shard with FSDP2")
    r.add_argument("--save-best", action="store_true", default=None, help="keep OUT/best at the lowest val loss")
    r.add_argument("--no-progress", action="store_true", help="no live progress line")
    for name, (kind, help_) in _TRAIN_FLAGS.items():
        r.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_)
    _add_store_args(parsers)
    return parser


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="store name, packaged model, HF folder or GGUF file (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default %(default)s)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot")
    p.add_argument("--context-policy", default="drop-oldest", choices=("drop-oldest", "condense", "error"),
                   help="what a chat longer than the context loses")
    p.add_argument("--chat-template", default=None,
                   help="built-in name (chatml, llama2, llama3, mistral, phi3, vicuna, plain) or Jinja text")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)


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
    cp = parsers["cp"]
    cp.add_argument("src", metavar="SRC")
    cp.add_argument("dst", metavar="DST")
    parsers["rm"].add_argument("names", nargs="+", metavar="NAME")
    run = parsers["run"]
    run.description = ("Answer PROMPT once, or chat when there is none, with the model's stored default "
                       "parameters and its system prompt as a text prefix; sampling flags override the stored "
                       "values (a flag's default is the stored value, else generate's default).")
    run.add_argument("name", metavar="NAME", help="a store model (or any model --model takes)")
    run.add_argument("prompt", nargs="?", default=None, help="answer this once (default: interactive chat)")
    run.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    run.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")
    _add_sampling_args(run)
    # Unset flags are None, so that the model's stored defaults apply (see _run_settings).
    run.set_defaults(**{k: None for k in _sampling_flag_defaults()})


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
