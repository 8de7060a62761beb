"""A bounded soak test of `emergence serve`: many clients mixing every kind of request for
minutes, on loopback only, and what must hold at the end.

A server (emergence.serve, in a subprocess) is sent, by C client threads for T seconds, a seeded
random mix of:

- completions and chat completions, streaming and not, at temperature 0 with 16 to 48 new
  tokens: each completed response must equal the single-user output, computed beforehand by
  the library in this process (`lm.complete`; the chat template rendered by emergence.chat);
- malformed requests (bad JSON, wrong types, an unknown model, a prompt over the context, a
  Host that is not allowed): each must get its 4xx;
- streams whose client disconnects after the first event: the slot must come back.

Checks, written to bench/results/soak.json with the counts: no 5xx and no transport error; no
response different from its single-user output; at the end no active row, no waiting request,
no KV block held; the server's resident memory (sampled every 2 s) grows less than 5% over the
second half of the run. `--warmup` seconds of the same load come first, their memory not judged:
a server's first thousands of requests grow its allocator's pools and worker threads (at smoke
size the whole run would be that). Exits 1 when a check fails.

    python bench/soak_serve.py [--clients 64] [--seconds 300] [--warmup 0] [--model emergence-6m] [--slots 16]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Once upon a time", "One day", "Tom and Lily", "The little dog", "A big red ball", "In the park",
           "Mom said", "The sun was", "There was a girl", "The cat and the bird", "Ben had a toy",
           "It was a rainy day", "Sara found a box", "The old man", "A small boat", "The king"]
LENGTHS = (16, 32, 48)
SERVER = r"""
import sys, emergence
from emergence.serve.app import Server, serve_in_thread
lm = emergence.load(sys.argv[1])
app = Server(lm, "soak", slots=int(sys.argv[2]), max_queue=4096)
server, thread = serve_in_thread(app, port=0)
print(server.server_address[1], flush=True)
sys.stdin.read()  # until the soak closes our stdin
server.shutdown()
app.close()
"""
BAD = [  # (path, body bytes, headers, expected status)
    ("/v1/completions", b'{"model": "soak", "prompt": ', {}, 400),
    ("/v1/completions", b'{"model": "soak", "prompt": "x", "temperature": "hot"}', {}, 400),
    ("/v1/chat/completions", b'{"model": "soak", "messages": []}', {}, 400),
    ("/v1/completions", b'{"model": "gpt-4", "prompt": "x"}', {}, 404),
    ("/v1/completions", json.dumps({"model": "soak", "prompt": "cat " * 700}).encode(), {}, 400),
    ("/v1/completions", b'{"model": "soak", "prompt": "x"}', {"Host": "evil.example"}, 403),
    ("/v1/chat/completions", b'{"model": "soak", "messages": [{"role": "wizard", "content": "x"}]}', {}, 400),
]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def expected_outputs(model: str) -> dict:
    """(kind, prompt, max_tokens) -> the single-user greedy text."""
    import emergence
    from emergence.chat import encode_prompt, find_model_template, resolve_chat_template
    from emergence.store import resolve_model

    lm = emergence.load(model)
    template = resolve_chat_template(find_model_template(resolve_model(model).path), missing="plain")
    out = {}
    for prompt in PROMPTS:
        for n in LENGTHS:
            out[("completion", prompt, n)] = lm.generate(prompt, temperature=0, max_new_tokens=n)
            messages = [{"role": "user", "content": prompt}]
            ids = encode_prompt(lm.tokenizer, template.render(messages, add_generation_prompt=True))
            out[("chat", prompt, n)] = lm.generate(ids, temperature=0, max_new_tokens=n, stop=template.stop)
    return out


class Soak:
    def __init__(self, port: int, expected: dict, seconds: float, seed: int) -> None:
        self.port, self.expected, self.deadline = port, expected, time.monotonic() + seconds
        self.seed = seed
        self.lock = threading.Lock()
        self.counts = {"completed": 0, "streamed": 0, "malformed": 0, "disconnected": 0}
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        with self.lock:
            if len(self.failures) < 50:
                self.failures.append(what)

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def client(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        while time.monotonic() < self.deadline:
            roll = rng.random()
            try:
                if roll < 0.1:
                    self.malformed(rng)
                elif roll < 0.2:
                    self.disconnect(rng)
                else:
                    self.generate(rng)
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.fail(f"client {k}: {type(e).__name__}: {e}")

    def generate(self, rng: random.Random) -> None:
        kind, prompt, n = rng.choice(("completion", "chat")), rng.choice(PROMPTS), rng.choice(LENGTHS)
        stream = rng.random() < 0.5
        if kind == "completion":
            path, body = "/v1/completions", {"prompt": prompt}
        else:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
        body.update(model="soak", max_tokens=n, temperature=0, stream=stream)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            self.fail(f"{path} answered {resp.status}: {resp.read()[:200]!r}")
            conn.close()
            return
        if stream:
            text = ""
            for line in resp:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.fail(f"{path} stream error: {event['error']}")
                        return
                    choice = event["choices"][0] if event["choices"] else {}
                    text += choice.get("text", "") if kind == "completion" else choice.get("delta", {}).get("content", "")
        else:
            answer = json.loads(resp.read())["choices"][0]
            text = answer["text"] if kind == "completion" else answer["message"]["content"]
        conn.close()
        if text != self.expected[(kind, prompt, n)]:
            self.fail(f"{kind} {prompt!r} x{n}: {text!r} != {self.expected[(kind, prompt, n)]!r}")
        self.count("streamed" if stream else "completed")

    def malformed(self, rng: random.Random) -> None:
        path, data, headers, status = rng.choice(BAD)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, data, {"Content-Type": "application/json", **headers})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status != status:
            self.fail(f"a malformed request to {path} answered {resp.status}, not {status}")
        self.count("malformed")

    def disconnect(self, rng: random.Random) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": "soak", "prompt": rng.choice(PROMPTS),
                                                            "max_tokens": 400, "temperature": 0, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.readline()  # the first event, then the client is gone
        conn.close()
        self.count("disconnected")


def main() -> int:
    from provenance import commit, machine, result_path  # bench/ is on the path; STEM_amd.json on an AMD CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--warmup", type=float, default=0, help="seconds of load before the judged run")
    parser.add_argument("--model", default="emergence-6m")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=result_path("soak"), help="'' writes nothing")
    args = parser.parse_args()

    print(f"computing the {len(PROMPTS) * len(LENGTHS) * 2} single-user outputs ...", flush=True)
    expected = expected_outputs(args.model)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, args.model, str(args.slots)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    soak = Soak(port, expected, args.warmup + args.seconds, args.seed)
    samples: list[tuple[float, int]] = []
    started = time.monotonic()
    threads = [threading.Thread(target=soak.client, args=(k,), daemon=True) for k in range(args.clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic() - started - args.warmup, rss_kib(proc.pid)))
        done = dict(soak.counts)
        print(f"\r{samples[-1][0]:5.0f}/{args.seconds:.0f} s  {sum(done.values()):6d} requests  "
              f"RSS {samples[-1][1] / 1024:6.1f} MiB  failures {len(soak.failures)}", end="", flush=True)
        time.sleep(2)
    print()
    for t in threads:
        t.join(timeout=600)
    time.sleep(1)  # the last disconnections reach the engine's next step
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.request("GET", "/metrics")
    metrics = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in conn.getresponse().read().decode().splitlines() if line and not line.startswith("#")}
    conn.close()
    proc.stdin.close()
    proc.wait(timeout=60)

    second_half = [rss for t, rss in samples if t >= args.seconds / 2] or [samples[-1][1]]
    judged = [s for s in samples if s[0] >= 0] or samples[-1:]
    growth = (max(second_half) - second_half[0]) / second_half[0]
    five_xx = sum(v for k, v in metrics.items() if k.startswith("emergence_requests_total") and 'status="5' in k)
    checks = {
        "no 5xx": five_xx == 0,
        "no failure (transport error, wrong status, output not the single-user one)": not soak.failures,
        "nothing left active or waiting": health["active"] == 0 and health["waiting"] == 0,
        "no KV block held": metrics["emergence_kv_blocks_used"] == 0,
        "RSS growth over the second half under 5%": growth < 0.05,
    }
    result = {"model": args.model, "clients": args.clients, "seconds": args.seconds, "warmup": args.warmup,
              "slots": args.slots, "counts": soak.counts,
              "requests_per_second": sum(soak.counts.values()) / (args.warmup + args.seconds),
              "generated_tokens": metrics["emergence_generated_tokens_total"], "server_5xx": five_xx,
              "failures": soak.failures, "rss_mib_first_last_max": [judged[0][1] / 1024, judged[-1][1] / 1024,
                                                                     max(s for _, s in judged) / 1024],
              "rss_growth_second_half": growth, "checks": checks, "command": " ".join(sys.argv),
              "commit": commit(), "machine": machine(),
              "date": time.strftime("%Y-%m-%d")}
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(json.dumps({k: result[k] for k in ("counts", "requests_per_second", "generated_tokens",
                                              "rss_growth_second_half")}))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
