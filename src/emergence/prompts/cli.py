"""`emergence prompt run PROGRAM.yaml`: run a prompt program and print its trace."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

from ..errors import InvalidArgument


def add_arguments(p: argparse.ArgumentParser, add_model_args: Callable[[argparse.ArgumentParser], None],
                  parser_class: type[argparse.ArgumentParser]) -> None:
    p.description = ("Prompt programs: zero-shot, few-shot, chain of thought, few-shot CoT, reframing, cascades "
                     "and self-consistency, written as YAML (see examples/prompts/).")
    sub = p.add_subparsers(dest="prompt_command", metavar="run", required=True, parser_class=parser_class)
    r = sub.add_parser("run", help="run a prompt program and print its trace", allow_abbrev=False)
    r.description = ("Run PROGRAM.yaml: each stage's rendered prompt, output, answer, token counts and time. "
                     "The calls go to a local model (--model) or an OpenAI-compatible server (--base-url).")
    r.add_argument("program", metavar="PROGRAM.yaml")
    r.add_argument("--input", "-i", action="append", default=[], metavar="KEY=VALUE",
                   help="a program input (repeatable; overrides --input-file)")
    r.add_argument("--input-file", default=None, metavar="ROW.json", help="a JSON object of inputs")
    add_model_args(r)
    r.add_argument("--base-url", default=None, metavar="URL",
                   help="an OpenAI-compatible server (http://host:port or .../v1) instead of a local model; "
                        "--model then names the served model (default: the first it lists)")
    r.add_argument("--api-key", default=None, metavar="KEY",
                   help="for --base-url (default: $EMERGENCE_API_KEY, then $OPENAI_API_KEY)")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server (default %(default)s)")
    r.add_argument("--seed", type=int, default=None, help="seed for sampled stages and random example selection (a stage's own seed wins)")
    r.add_argument("--max-tokens", type=int, default=None, help="cap every stage's completion at this many tokens")
    r.add_argument("--json", action="store_true", help="print the trace as JSON")


def inputs_from(args: argparse.Namespace) -> dict[str, str]:
    values: dict[str, str] = {}
    if args.input_file:
        try:
            with open(args.input_file, encoding="utf-8") as f:
                row = json.load(f)
        except OSError as e:
            raise InvalidArgument(f"cannot read --input-file {args.input_file}: {e.strerror}") from None
        except ValueError as e:
            raise InvalidArgument(f"--input-file {args.input_file} is not JSON: {e}") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"--input-file {args.input_file} must hold one JSON object of inputs")
        values.update({k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in row.items()})
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"--input takes KEY=VALUE, got {item!r}")
        values[key] = value
    return values


def run_command(args: argparse.Namespace) -> None:
    from .backends import HTTPBackend, LocalBackend
    from .yaml_io import load_program

    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidArgument(f"--max-tokens must be at least 1, got {args.max_tokens}")
    program = load_program(args.program)  # a bad program is reported before a model is loaded
    inputs = inputs_from(args)
    if args.base_url:
        if args.adapter or args.tokenizer:
            raise InvalidArgument("--adapter and --tokenizer apply to a local model, not to --base-url")
        key = args.api_key or os.environ.get("EMERGENCE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        backend = HTTPBackend(args.base_url, args.model, key, timeout=args.timeout)
    else:
        if args.api_key:
            raise InvalidArgument("--api-key goes with --base-url")
        from ..api import load
        from ..store import resolve_model

        source = resolve_model(args.model)
        backend = LocalBackend(load(source, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                                    adapter=args.adapter))
    trace = program.run(backend, inputs, seed=args.seed, max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps(trace.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(trace.format())
