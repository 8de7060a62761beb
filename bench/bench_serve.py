"""Serving throughput: continuous batching vs strictly sequential serving, same server, same requests.

A server (emergence.serve, in a subprocess so that the clients do not share its interpreter) is
sent the same set of streaming /v1/completions requests twice:

- batched: C concurrent clients, each sending its R requests one after the other; the engine
  decodes every active request together (slots = C);
- sequential: the same C x R requests one at a time, each sent when the previous one is done.

Reported per mode: generated tokens/s over the whole run (tokens counted by the server's
usage), time to first token (TTFT: from sending a request to its first streamed token; median
and p90) and, for the sequential run, the TTFT the requests would see if all of them had arrived
at once and been served one by one (from the start of the run: the queueing that batching saves).

    python bench/bench_serve.py [--model emergence-6m] [--clients 16] [--requests 4] [--tokens 64]
    python bench/bench_serve.py --smoke          # a tiny run, nothing written

Temperature 0. Timings on a shared machine are noisy: rounds alternate the two modes and the
medians over rounds are reported with the range.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

OPENINGS = ["Once upon a time", "One day", "Tom and Lily", "The little dog", "A big red ball", "In the park",
            "Mom said", "The sun was", "There was a girl", "The cat and the bird", "Ben had a toy",
            "It was a rainy day", "Sara found a box", "The old man", "A small boat", "The king"]

SERVER = r"""
import sys, time, torch, emergence
from emergence.serve.app import Server, serve_in_thread
if int(sys.argv[4]) > 0:
    torch.set_num_threads(int(sys.argv[4]))
lm = emergence.load(sys.argv[1] if sys.argv[1] != "-" else None, device=sys.argv[3])
app = Server(lm, "bench", slots=int(sys.argv[2]))
server, thread = serve_in_thread(app, port=0)
print(server.server_address[1], flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
server.shutdown()
server.server_close()
app.close()
"""


def start_server(model: str | None, slots: int, device: str, threads: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, model or "-", str(slots), device, str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the server did not start (said {line!r})")
    return proc, int(line)


def one_request(port: int, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; its send time, first-token time, end time and token count."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    sent = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first = None
    tokens = None
    done = False
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            done = True
            break
        event = json.loads(payload)
        if event.get("choices") and first is None:
            first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    conn.close()
    if not done or tokens is None or first is None:
        raise RuntimeError("a stream ended early")
    return {"sent": sent, "first": first, "end": time.perf_counter(), "tokens": tokens}


def run_batched(port: int, jobs: list[list[tuple[str, int]]]) -> dict:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(requests: list[tuple[str, int]]) -> None:
        try:
            for prompt, max_tokens in requests:
                r = one_request(port, prompt, max_tokens)
                with lock:
                    results.append(r)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(j,)) for j in jobs]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return summarize(results, start, time.perf_counter())


def run_sequential(port: int, jobs: list[list[tuple[str, int]]]) -> dict:
    # the order a one-at-a-time server would take them in: each client's first request, then the seconds...
    order = [job[r] for r in range(max(len(j) for j in jobs)) for job in jobs if r < len(job)]
    start = time.perf_counter()
    results = [one_request(port, prompt, max_tokens) for prompt, max_tokens in order]
    out = summarize(results, start, time.perf_counter())
    queued = sorted(r["first"] - start for r in results)
    out["ttft_if_all_queued_s"] = {"median": statistics.median(queued), "p90": percentile(queued, 90)}
    return out


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[dict], start: float, end: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["first"] - r["sent"] for r in results]
    return {"requests": len(results), "tokens": tokens, "seconds": end - start, "tok_s": tokens / (end - start),
            "ttft_s": {"median": statistics.median(ttft), "p90": percentile(ttft, 90)}}


def make_jobs(clients: int, requests: int, tokens: int) -> list[list[tuple[str, int]]]:
    return [[(f"{OPENINGS[c % len(OPENINGS)]}" + ("," if r % 2 else "") + " " * (r // 2), tokens)
             for r in range(requests)] for c in range(clients)]


def main() -> int:
    from provenance import result_path  # bench/ is on the path: STEM.json, STEM_amd.json on an AMD CPU
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model name or path (default: the shipped stories260K)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client, one after the other")
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs both modes")
    parser.add_argument("--device", default="cpu", help="the server's device: cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the server (default 0: torch's own choice)")
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/serve.json, or "
                        "serve_MODEL.json for --model; --smoke writes nothing unless given)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run: 4 clients x 1 request x 8 tokens")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.requests, args.tokens, args.rounds = 4, 1, 8, 1
    default_out = result_path("serve" if args.model is None else f"serve_{Path(args.model).name}")
    out = args.out or (None if args.smoke else default_out)

    import torch

    jobs = make_jobs(args.clients, args.requests, args.tokens)
    proc, port = start_server(args.model, args.clients, args.device, args.threads)
    try:
        one_request(port, "Once upon a time", 8)  # warm up (first-call allocations, kernels)
        rounds = []
        for i in range(args.rounds):
            first, second = ("sequential", "batched") if i % 2 == 0 else ("batched", "sequential")
            r = {}
            for mode in (first, second):
                r[mode] = (run_batched if mode == "batched" else run_sequential)(port, jobs)
                print(f"round {i + 1} {mode}: {r[mode]['tokens']} tokens in {r[mode]['seconds']:.2f}s = "
                      f"{r[mode]['tok_s']:.0f} tok/s, TTFT median {1000 * r[mode]['ttft_s']['median']:.1f} ms",
                      flush=True)
            rounds.append(r)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)

    def med(mode: str, *keys: str) -> float:
        values = []
        for r in rounds:
            v = r[mode]
            for k in keys:
                v = v[k]
            values.append(v)
        return statistics.median(values)

    seq, bat = med("sequential", "tok_s"), med("batched", "tok_s")
    ratios = [r["batched"]["tok_s"] / r["sequential"]["tok_s"] for r in rounds]
    model = args.model or "stories260K"
    print(f"\n{model}, {args.clients} clients x {args.requests} requests x {args.tokens} tokens, temperature 0, "
          f"device {args.device}; torch {torch.__version__}, {os.cpu_count()} CPUs; medians over {args.rounds} "
          f"round(s)\n")
    print("| mode | tok/s | TTFT median (ms) | TTFT p90 (ms) |")
    print("|---|---|---|---|")
    for mode in ("sequential", "batched"):
        print(f"| {mode} | {med(mode, 'tok_s'):.0f} | {1000 * med(mode, 'ttft_s', 'median'):.1f} | "
              f"{1000 * med(mode, 'ttft_s', 'p90'):.1f} |")
    queued = (1000 * med("sequential", "ttft_if_all_queued_s", "median"),
              1000 * med("sequential", "ttft_if_all_queued_s", "p90"))
    print(f"| sequential, all requests queued at once | | {queued[0]:.0f} | {queued[1]:.0f} |")
    print(f"\nbatched / sequential throughput: {bat / seq:.2f}x (rounds: "
          f"{', '.join(f'{x:.2f}x' for x in ratios)}; issue target >= 4x at 16 clients)")

    if out:
        results = {"model": model, "clients": args.clients, "requests_per_client": args.requests,
                   "max_tokens": args.tokens, "device": args.device, "torch": torch.__version__,
                   "cpus": os.cpu_count(), "machine": platform.machine(), "rounds": rounds,
                   "median": {"sequential_tok_s": seq, "batched_tok_s": bat, "ratio": bat / seq,
                              "ratio_range": [min(ratios), max(ratios)]}}
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from provenance import write_result

        write_result(Path(out), results, "bench/bench_serve.py", sys.argv[1:], torch.get_num_threads())
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
