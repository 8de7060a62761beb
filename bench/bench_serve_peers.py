"""Serving throughput and latency against the peers, same weights, same clients, same run.

Engines, each serving the same GGUF file (exported with `emergence convert`, F32) on loopback:

- emergence: `emergence serve FILE --slots 16` (continuous batching over the paged KV cache);
- llama.cpp's own `llama-server -t 2 --parallel 16 --cont-batching`, built here from the
  llama.cpp source that the llama-cpp-python 0.3.36 sdist vendors (`pip download --no-binary
  :all:`, CMake's `llama-server` target, AMX off as the Makefile builds it): nothing beyond PyPI;
- llama-cpp-python's own server (`python -m llama_cpp.server`, one request at a time), when its
  extra packages are installed (`pip install 'llama-cpp-python[server]'`).

Per engine and round: C clients (16) each send R (2) non-streaming completions of 64 tokens
(temperature 0, ignore_eos): generated tokens/s over the run and the request latency p50/p99;
then the same with streaming, for the time to first token p50/p99. Rounds alternate the
engines; medians over rounds. Models: emergence-6m and the smollm2-135m architecture with
random weights.

Before those, per engine and round, the time to first token of a fresh server's first request
(streamed, 2 tokens), and for emergence also started with --no-warmup (Server.warm_up: without
it, a server's first stream pays one-time costs). The load's warm-up is whole completions, so
its streams come to a server that has not streamed before unless the server warmed itself up.

Then a burst, per engine and round: C clients, each its own process (no client waits on another's
GIL), send one streamed 2-token completion at the same instant, BURSTS (10) times: the time to
first token p50/p99 of each burst, medians over bursts. It isolates how a server takes in a wave
of requests at once (each wave of the load above starts as one).

For emergence the run also splits a token's cost, from an in-process server whose engine
counts the seconds its forward passes and its whole loop take: the model's forward passes
(prefills included), the rest of the engine's loop (admission, sampling, stop rules,
detokenization, handing chunks over), and what is left of the wall time per token (HTTP, JSON,
the event loop, the clients on the same 2 cores), and measures its HTTP layer's own time per
request: the ASGI app (uvicorn's parsing aside) called in-process with the engine answering at
once, whole and streamed. The smollm2-135m-shaped model carries GPT-2's
BPE vocabulary (50,257 rows; a GGUF vocabulary must be BPE or SentencePiece). Last, the time an
empty parallel region takes after 0, 2, 20 and 100 ms of idleness (waking the OpenMP workers).

    python bench/bench_serve_peers.py [--rounds 5] [--bursts 10] [--models emergence-6m,smollm2-135m]

Writes bench/results/serve_peers.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from llama_cpp_source import llama_cpp_binary  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
PROMPTS = ["Once upon a time", "One day", "Tom and Lily", "The little dog", "A big red ball", "In the park",
           "Mom said", "The sun was", "There was a girl", "The cat and the bird", "Ben had a toy",
           "It was a rainy day", "Sara found a box", "The old man", "A small boat", "The king"]


# ------------------------------------------------------------------------------ the peers
def llama_server() -> Path:
    """llama-server from the llama-cpp-python sdist's vendored llama.cpp (built once, cached)."""
    return llama_cpp_binary("llama-server", LLAMA_CPP_PYTHON)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, path: str = "/v1/models", timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def start(engine: str, gguf: Path, clients: int, context: int, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    if engine == "emergence":
        cmd = [sys.executable, "-m", "emergence", "serve", str(gguf), "--port", str(port), "--slots", str(clients),
               *extra]
    elif engine == "llama-server":
        cmd = [str(llama_server()), "-m", str(gguf), "--port", str(port), "-t", "2", "--parallel", str(clients),
               "--cont-batching", "-c", str(clients * context), "--log-disable"]
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port), "--n_threads", "2",
               "--n_ctx", str(context)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_ready(port, proc)
    return proc, port


def served_model(port: int) -> str:
    """The model id the server answers to (each names a GGUF file its own way)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v1/models")
    return json.loads(conn.getresponse().read())["data"][0]["id"]


# --------------------------------------------------------------------------- the clients
def one(port: int, model: str, prompt: str, tokens: int, stream: bool) -> tuple[float, float | None, int]:
    """(latency, time to first token or None, tokens generated) of one completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    sent = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    first, count = None, 0
    if stream:
        for line in resp:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                event = json.loads(line[6:])
                if event.get("choices") and event["choices"][0].get("text"):
                    first = first or time.perf_counter() - sent
                    count += 1
    else:
        count = json.loads(resp.read())["usage"]["completion_tokens"]
    conn.close()
    return time.perf_counter() - sent, first, count


def load(port: int, model: str, clients: int, requests: int, tokens: int, stream: bool) -> dict:
    results, errors = [], []

    def client(k: int) -> None:
        try:
            for r in range(requests):
                results.append(one(port, model, PROMPTS[(k * requests + r) % len(PROMPTS)], tokens, stream))
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed: {errors[0]}")
    latencies = sorted(r[0] for r in results)
    firsts = sorted(r[1] for r in results if r[1] is not None)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    return {"tok_s": sum(r[2] for r in results) / wall, "latency_p50": pct(latencies, 0.5),
            "latency_p99": pct(latencies, 0.99), "ttft_p50": pct(firsts, 0.5), "ttft_p99": pct(firsts, 0.99)}


def _burst_client(args: tuple) -> float:
    """One client of a burst (in its own process): waits for the common start, then one
    streamed completion; its time to first token."""
    port, model, prompt, start_at = args
    while time.perf_counter() < start_at:
        time.sleep(0.0005)
    return one(port, model, prompt, 2, True)[1]


def burst(pool, port: int, model: str, clients: int) -> tuple[float, float]:
    """(p50, p99) time to first token of `clients` streamed requests sent at one instant."""
    start_at = time.perf_counter() + 0.05  # (perf_counter is the machine's monotonic clock in every process)
    firsts = sorted(pool.map(_burst_client, [(port, model, PROMPTS[k % len(PROMPTS)], start_at)
                                             for k in range(clients)]))
    return firsts[len(firsts) // 2], firsts[min(len(firsts) - 1, int(0.99 * len(firsts)))]


# ------------------------------------------------------------------------- the breakdown
def emergence_breakdown(gguf: Path, clients: int, requests: int, tokens: int) -> dict:
    """Seconds per generated token, from an in-process server: the model's forward passes, the
    rest of the engine's loop, and the remainder of the wall time (HTTP, JSON, event loop, clients)."""
    import emergence
    from emergence.serve.app import Server, serve_in_thread

    app = Server(emergence.load(str(gguf)), "bench", slots=clients)
    server, _ = serve_in_thread(app)
    try:
        engine = app.engine
        load(server.server_address[1], "bench", clients, 1, 8, False)  # warm-up
        forward0, busy0, tokens0 = engine.batch.forward_seconds, engine.busy_seconds, engine.generated
        started = time.perf_counter()
        load(server.server_address[1], "bench", clients, requests, tokens, False)
        wall = time.perf_counter() - started
        n = engine.generated - tokens0
        forward, busy = engine.batch.forward_seconds - forward0, engine.busy_seconds - busy0
    finally:
        server.shutdown()
        app.close()
    return {"tokens": n, "wall_ms_per_token": 1e3 * wall / n, "forward_ms_per_token": 1e3 * forward / n,
            "engine_rest_ms_per_token": 1e3 * (busy - forward) / n,
            "http_and_rest_ms_per_token": 1e3 * (wall - busy) / n,
            "http_layer_us_per_request": http_layer_cost(gguf)}


def http_layer_cost(gguf: Path, n: int = 300) -> dict:
    """Microseconds of the event loop's time per request in the ASGI app (Host checks, FastAPI's
    routing and validation, sampling options, tokenizing, submitting, the response), whole and
    streamed, called in-process with the engine replaced by one that answers at once (two
    tokens); uvicorn's socket and parsing work is not in it."""
    import asyncio

    import emergence
    from emergence.generate import Chunk
    from emergence.serve.app import Server
    from emergence.serve.engine import Request

    server = Server(emergence.load(str(gguf)), "bench", slots=4)

    def answered(prompt, params, *, sink=None, tags=None, adapter=None):
        requests = [Request(list(prompt), p, sink, t, adapter=adapter) for p, t in zip(params, tags)]
        for r in requests:
            r._put(Chunk(" Once", [1], [], None))
            r._put(Chunk(" upon", [2], [], "length"))
            r._end()
        return requests

    server.engine.submit_choices = answered
    out = {}
    try:
        for kind, stream in (("whole", False), ("streamed", True)):
            body = json.dumps({"model": "bench", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0,
                               "stream": stream}).encode()
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
                     "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000),
                     "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())]}

            async def request() -> None:
                parts = [{"type": "http.request", "body": body, "more_body": False}]

                async def receive():
                    if parts:
                        return parts.pop()
                    await asyncio.sleep(60)  # (a disconnect never comes)

                async def send(message) -> None:
                    pass

                await server.app({**scope, "state": {}}, receive, send)

            async def timed() -> float:
                for _ in range(50):
                    await request()
                started = time.perf_counter()
                for _ in range(n):
                    await request()
                return (time.perf_counter() - started) / n

            out[kind] = 1e6 * asyncio.run(timed())
    finally:
        server.close()
    return out


def team_wake_us(gaps=(0.0, 0.002, 0.02, 0.1), n: int = 25) -> dict:
    """Microseconds of an empty parallel region on this thread's OpenMP team
    (kernels.wake_thread_team) after each idle gap: the wait for idle workers to wake, which an
    idle serving engine's first forward pass paid before the engine woke its team while requests
    arrive (engine.py). Medians of n."""
    from emergence.kernels import gemv_extension, wake_thread_team

    if gemv_extension() is None:
        return {}
    out = {}
    for gap in gaps:
        wake_thread_team()
        times = []
        for _ in range(n):
            time.sleep(gap)
            started = time.perf_counter()
            wake_thread_team()
            times.append(1e6 * (time.perf_counter() - started))
        out[f"{1e3 * gap:g} ms"] = statistics.median(times)
    return out


# ------------------------------------------------------------------------------ the models
def smollm2_folder(folder: Path) -> Path:
    """The smollm2-135m architecture with random weights and GPT-2's byte-level BPE tokenizer
    (a GGUF vocabulary must be BPE), so 50,257 vocabulary rows where SmolLM2 has 49,152."""
    import dataclasses

    import torch

    from emergence.config import Config
    from emergence.model import Transformer
    from emergence.tokenizer import Tokenizer
    from emergence.weights.hf import save_hf

    tokenizer = Tokenizer.load(ROOT.parent / "shared" / "data" / "gpt2_tokenizer")
    torch.manual_seed(0)
    config = dataclasses.replace(Config.from_name("smollm2-135m"), vocab_size=tokenizer.vocab_size,
                                 bos_token_id=None, eos_token_id=tokenizer.eos_id)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_hf(model, folder)
    tokenizer.save(folder)
    return folder


def models(names: list[str], folder: Path) -> dict[str, Path]:
    out = {}
    for name in names:
        gguf = folder / f"{name}.gguf"
        source = str(smollm2_folder(folder / "smollm2")) if name == "smollm2-135m" else name
        subprocess.run([sys.executable, "-m", "emergence", "convert", source, str(gguf), "--type", "f32", "--force"],
                       check=True, stdout=subprocess.DEVNULL)
        out[name] = gguf
    return out


def main() -> int:
    from provenance import commit, machine, result_path  # bench/ is on the path; STEM_amd.json on an AMD CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="emergence-6m,smollm2-135m")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2, help="completions per client, one after the other")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--bursts", type=int, default=10, help="bursts per engine and round")
    parser.add_argument("--out", default=result_path("serve_peers"))
    args = parser.parse_args()
    engines = ["emergence", "llama-server"]
    try:
        import llama_cpp.server.app  # noqa: F401
        engines.append("llama-cpp-python")
    except ImportError:
        print("(llama_cpp.server's extra packages are not installed: its column is left out)")
    llama_server()
    sys.path.insert(0, str(ROOT / "bench"))

    result = {"command": " ".join(sys.argv), "commit": commit(), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
              "machine": machine(), "clients": args.clients, "requests": args.requests,
              "tokens": args.tokens, "bursts": args.bursts, "models": {}}
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(args.clients)  # before any thread or model: cheap forks
    with tempfile.TemporaryDirectory() as tmp:
        for name, gguf in models(args.models.split(","), Path(tmp)).items():
            context = 512
            samples: dict[str, list[dict]] = {e: [] for e in engines}
            for r in range(args.rounds):
                for engine in engines if r % 2 == 0 else engines[::-1]:
                    if engine == "emergence":  # its first stream without the server's warm-up
                        proc, port = start(engine, gguf, args.clients, context, "--no-warmup")
                        try:
                            cold_first = one(port, served_model(port), PROMPTS[0], 2, True)[1]
                        finally:
                            proc.terminate()
                            proc.wait(timeout=60)
                    proc, port = start(engine, gguf, args.clients, context)
                    try:
                        model = served_model(port)
                        first = one(port, model, PROMPTS[0], 2, True)[1]  # the server's first stream
                        load(port, model, args.clients, 1, 8, False)  # warm-up
                        whole = load(port, model, args.clients, args.requests, args.tokens, stream=False)
                        streamed = load(port, model, args.clients, args.requests, args.tokens, stream=True)
                        bursts = [burst(pool, port, model, args.clients) for _ in range(args.bursts)]
                    finally:
                        proc.terminate()
                        proc.wait(timeout=60)
                    row = {"tok_s": whole["tok_s"], "latency_p50": whole["latency_p50"],
                           "latency_p99": whole["latency_p99"], "ttft_p50": streamed["ttft_p50"],
                           "ttft_p99": streamed["ttft_p99"], "stream_tok_s": streamed["tok_s"],
                           "burst_ttft_p50": statistics.median(b[0] for b in bursts),
                           "burst_ttft_p99": statistics.median(b[1] for b in bursts), "first_ttft": first}
                    if engine == "emergence":
                        row["first_ttft_no_warmup"] = cold_first
                    samples[engine].append(row)
                    print(f"{name} round {r + 1} {engine}: {row['tok_s']:.0f} tok/s, latency p50 "
                          f"{row['latency_p50']:.2f} s, TTFT p50/p99 {row['ttft_p50']:.3f}/{row['ttft_p99']:.3f} s, "
                          f"burst TTFT p50/p99 {row['burst_ttft_p50']:.3f}/{row['burst_ttft_p99']:.3f} s",
                          flush=True)
            medians = {e: {k: statistics.median(s[k] for s in rows) for k in rows[0]} for e, rows in samples.items()}
            breakdown = emergence_breakdown(gguf, args.clients, args.requests, args.tokens)
            result["models"][name] = {"medians": medians, "rounds": samples, "emergence_breakdown": breakdown}
            peer = medians["llama-server"]
            print(f"\n{name}: emergence / llama-server throughput {medians['emergence']['tok_s'] / peer['tok_s']:.2f}x; "
                  f"emergence per token (ms) and HTTP layer per request (us): "
                  f"{json.dumps(breakdown, default=float, indent=None)}\n", flush=True)
    result["team_wake_us"] = team_wake_us()
    print(f"an empty parallel region after an idle gap (us): {json.dumps(result['team_wake_us'])}")
    print("| model | engine | tok/s | vs llama-server | latency p50 / p99 (s) | TTFT p50 / p99 (s) |")
    print("|---|---|---|---|---|---|")
    for name, data in result["models"].items():
        peer = data["medians"]["llama-server"]["tok_s"]
        for engine, m in data["medians"].items():
            print(f"| {name} | {engine} | {m['tok_s']:.0f} | {m['tok_s'] / peer:.2f}x | {m['latency_p50']:.2f} / "
                  f"{m['latency_p99']:.2f} | {m['ttft_p50']:.3f} / {m['ttft_p99']:.3f} |")
    pool.close()
    pool.join()
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
