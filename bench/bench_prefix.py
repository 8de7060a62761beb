"""Prefix caching: time to first token of a chat turn after a long shared history, warm against cold.

A server (emergence.serve in a subprocess, prefix caching on as by default) is sent chat
requests whose messages are a conversation of about H tokens (default 1,000: a system prompt
and turns of TinyStories text) followed by a short new user message. Per round:

- cold: a conversation the server has never seen (its history is prefilled whole);
- warm: the same conversation again with another new user message (only what follows the
  cached whole blocks of the history is prefilled).

The time to first token is the latency of a one-token completion (max_tokens 1, not
streamed: the request ends with its first token). Each response's
usage.prompt_tokens_details.cached_tokens is recorded, so the figures show what was reused.
Rounds alternate the two; medians over rounds with the range. Model: the smollm2-135m
architecture with random weights and GPT-2's BPE vocabulary (a context of 2,048; the shipped
emergence-6m holds only 512 tokens), fp32, 2 threads.

    python bench/bench_prefix.py [--rounds 7] [--history 1000]
    python bench/bench_prefix.py --smoke      # a tiny run, nothing written

Writes bench/results/prefix_cache.json; the README's figures are `render_line` of it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_serve import start_server  # noqa: E402
from bench_serve_peers import smollm2_folder  # noqa: E402
from provenance import result_path, write_result  # noqa: E402

STORIES = ROOT.parent / "shared" / "data" / "tinystories" / "valid"
QUESTIONS = ["What happened next?", "Who was the hero?", "Tell me more.", "Why was she sad?", "How did it end?",
             "Was the dog happy?", "Where did they go?", "What did Mom say?", "Say it again.", "Is that true?"]


def story_paragraphs() -> list[str]:
    files = sorted(p for p in STORIES.rglob("*") if p.is_file()) if STORIES.is_dir() else [STORIES]
    text = " ".join(p.read_text(encoding="utf-8", errors="replace") for p in files[:2])
    words = text.split()
    return [" ".join(words[i:i + 60]) for i in range(0, len(words) - 60, 60)]


def conversation(paragraphs: list[str], start: int, tokens: int, count) -> tuple[list[dict], int]:
    """A system prompt and user/assistant turns of story text, about `tokens` tokens long
    (`count` gives a message list's token count); the conversation and the next paragraph index."""
    messages = [{"role": "system", "content": "You are a storyteller. Answer in the style of the stories."}]
    i = start
    while count(messages) < tokens or messages[-1]["role"] != "assistant":  # the new question follows
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": paragraphs[i]})
        i += 1
    return messages, i


def first_token(port: int, messages: list[dict]) -> tuple[float, dict]:
    body = json.dumps({"model": "bench", "messages": messages, "max_tokens": 1, "temperature": 0}).encode()
    sent = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    took = time.perf_counter() - sent
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {payload[:200]!r}")
    return took, json.loads(payload)["usage"]


def render_line(result: dict) -> str:
    """The README's sentence of figures."""
    rounds = result["rounds"]
    history = [r["history_tokens"] for r in rounds]
    cached = [r["warm_cached_tokens"] for r in rounds]
    return (f"histories of {min(history):,}-{max(history):,} tokens; warm, {min(cached):,}-{max(cached):,} prompt tokens "
            f"came from the cache: time to first token {result['cold_ttft_ms']:,.0f} ms cold, "
            f"{result['warm_ttft_ms']:,.0f} ms warm, **{result['speedup_median']:.1f}x** lower (range "
            f"{result['speedup_range'][0]:.1f}-{result['speedup_range'][1]:.1f}x over {len(rounds)} rounds)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--history", type=int, default=1000, help="tokens of shared history (default %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 rounds of a 200-token history; nothing written")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/prefix_cache[_amd].json)")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.history = 2, 200
    from emergence.chat import resolve_chat_template
    from emergence.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = smollm2_folder(Path(tmp) / "smollm2")
        tokenizer = Tokenizer.load(folder)
        template = resolve_chat_template(None, missing="plain")
        count = lambda messages: len(tokenizer.encode(template.render(messages, add_generation_prompt=True)))  # noqa: E731
        paragraphs = story_paragraphs()
        proc, port = start_server(str(folder), 2, "cpu", args.threads)
        try:
            first_token(port, [{"role": "user", "content": "Hello"}])  # warm up the server's first request
            rows, at = [], 0
            for r in range(args.rounds):
                history, at = conversation(paragraphs, at, args.history, count)
                cold_q = history + [{"role": "user", "content": QUESTIONS[r % len(QUESTIONS)]}]
                warm_q = history + [{"role": "user", "content": QUESTIONS[(r + 1) % len(QUESTIONS)]}]
                cold, cold_usage = first_token(port, cold_q)
                warm, warm_usage = first_token(port, warm_q)
                rows.append({"history_tokens": count(history), "cold_s": cold, "warm_s": warm,
                             "cold_prompt_tokens": cold_usage["prompt_tokens"],
                             "cold_cached_tokens": cold_usage["prompt_tokens_details"]["cached_tokens"],
                             "warm_prompt_tokens": warm_usage["prompt_tokens"],
                             "warm_cached_tokens": warm_usage["prompt_tokens_details"]["cached_tokens"]})
                print(f"round {r + 1}/{args.rounds}: history {rows[-1]['history_tokens']} tokens, cold "
                      f"{1e3 * cold:.0f} ms, warm {1e3 * warm:.0f} ms ({rows[-1]['warm_cached_tokens']} of "
                      f"{rows[-1]['warm_prompt_tokens']} prompt tokens cached), {cold / warm:.1f}x", flush=True)
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)
    ratios = [row["cold_s"] / row["warm_s"] for row in rows]
    result = {"model": "smollm2-135m architecture, random weights, GPT-2 vocabulary, fp32", "rounds": rows,
              "history_tokens": args.history,
              "cold_ttft_ms": 1e3 * statistics.median(r["cold_s"] for r in rows),
              "warm_ttft_ms": 1e3 * statistics.median(r["warm_s"] for r in rows),
              "speedup_median": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}
    print(f"time to first token, {args.history}-token history: cold {result['cold_ttft_ms']:.0f} ms, warm "
          f"{result['warm_ttft_ms']:.0f} ms: {result['speedup_median']:.1f}x lower (range "
          f"{min(ratios):.1f}-{max(ratios):.1f}x over {len(rows)} rounds)")
    if not args.smoke or args.out:
        write_result(Path(args.out or ROOT / result_path("prefix_cache")), result,
                     "bench/bench_prefix.py", sys.argv[1:], args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
