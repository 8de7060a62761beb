"""Speculative decoding (speculative.py): the rejection scheme keeps the target's distribution
(chi-square on a tiny vocabulary, position by position), greedy output is the target's own token
for token on both backends and for drafts that agree fully, partly or hardly at all, stops,
budgets and logprobs are those of plain decoding, rows it cannot serve fall back to plain
decoding, `emergence generate --draft` and a Modelfile's DRAFT line use it, and a draft with
another tokenizer is refused in one line.

References: the target's plain decoding (the decode batch, itself checked against transformers),
and the distributions the scheme must reproduce.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import emergence
from emergence.cli import main
from emergence.errors import InvalidArgument
from emergence.speculative import accept

PROMPTS = ["Once upon a time", "Lily saw a big dog", "The sun was hot and"]


@pytest.fixture(scope="module")
def lm():
    return emergence.load(device="cpu")


def noisy_copy(lm, scale: float, seed: int = 0):
    """A draft: the target's weights plus Gaussian noise (scale 0: the target itself)."""
    draft = copy.deepcopy(lm)
    draft.model = copy.deepcopy(lm.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return draft


# -------------------------------------------------------------------- the rejection scheme
def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_the_rejection_scheme_emits_the_targets_distribution_at_every_position():
    # Target distributions p_0..p_3 and draft distributions q_0..q_2 that differ from them, on 5
    # tokens; the draft's tokens drawn from q. Each emitted position must follow p, whatever q.
    # 20,000 rounds: the chi-square of each position's counts (4 degrees of freedom) stays below
    # 18.47, its 0.1% critical value (the seeds are fixed: the test is deterministic).
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.1], [0.05, 0.05, 0.3, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2],
                      [0.7, 0.1, 0.1, 0.05, 0.05]])
    q = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]])
    counts = torch.zeros(4, 5)
    reached = torch.zeros(4)
    accepted = 0
    for _ in range(20_000):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(3)]
        j, token = accept(p, q, drafts, greedy=False, generator=g)
        accepted += j
        for i, t in enumerate(drafts[:j] + [token]):
            counts[i, t] += 1
            reached[i] += 1
    for i in range(4):
        assert chi_square(counts[i], p[i]) < 18.47, (i, counts[i] / reached[i], p[i])
    # acceptance at position 0 is sum(min(p, q)) = 0.1 + 0.1 + 0.1 + 0.1 + 0.1 = 0.5
    assert abs(reached[1] / 20_000 - 0.5) < 0.02
    assert reached[3] > 1000  # all three accepted often enough for the bonus token to be tested


def test_greedy_acceptance_is_the_argmax():
    p = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    assert accept(p, torch.zeros(2, 3), [1, 0], greedy=True) == (2, 2)  # both are argmaxes; then p_2's
    assert accept(p, torch.zeros(2, 3), [1, 2], greedy=True) == (1, 0)  # the second is not: p_1's argmax
    assert accept(p, torch.zeros(2, 3), [0, 0], greedy=True) == (0, 1)


# ------------------------------------------------------------------------- on the model
@pytest.mark.parametrize("backend,scale,k", [("auto", 0.0, 4), ("auto", 0.05, 3), ("auto", 0.05, 8),
                                             ("auto", 3.0, 1), ("eager", 0.05, 3)])
def test_greedy_output_is_the_targets_own(lm, backend, scale, k):
    lm = copy.copy(lm)
    lm.backend = backend
    draft = noisy_copy(lm, scale)
    draft.backend = backend
    speculator = lm.speculator(draft, k=k)
    for prompt in PROMPTS if backend == "auto" else PROMPTS[:1]:  # (the eager forward is the slow one)
        plain = lm.complete(prompt, temperature=0, max_new_tokens=60, ignore_eos=True)
        drafted = lm.complete(prompt, temperature=0, max_new_tokens=60, ignore_eos=True, draft=speculator)
        assert drafted.token_ids == plain.token_ids and drafted.text == plain.text
        assert drafted.finish_reason == plain.finish_reason == "length"
    if scale == 0:
        assert speculator.acceptance == 1.0 and speculator.rounds == 3 * 12  # 59 tokens after the first, 5 a round
    elif scale == 3.0:
        assert speculator.acceptance < 0.5
    else:
        assert 0.2 < speculator.acceptance < 1.0


def test_stops_budgets_and_logprobs_are_those_of_plain_decoding(lm):
    speculator = lm.speculator(noisy_copy(lm, 0.05), k=4)
    stop_id = lm.complete(PROMPTS[0], temperature=0, max_new_tokens=30).token_ids[12]  # an end token met mid-story
    finishes = []
    for options in ({"max_new_tokens": 7}, {"max_new_tokens": 80, "stop": ["."]}, {"max_new_tokens": 100},
                    {"max_new_tokens": 80, "stop_token_ids": [stop_id]}, {"max_new_tokens": 30, "logprobs": 2}):
        for prompt in PROMPTS:
            plain = lm.complete(prompt, temperature=0, **options)
            drafted = lm.complete(prompt, temperature=0, **options, draft=speculator)
            assert (drafted.token_ids, drafted.text, drafted.finish_reason) == \
                   (plain.token_ids, plain.text, plain.finish_reason), options
            finishes.append((plain.finish_reason, bool(options.get("stop"))))
            if options.get("logprobs"):
                for a, b in zip(drafted.logprobs, plain.logprobs):
                    assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= 1e-4
                    assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert ("stop", True) in finishes and ("stop", False) in finishes  # stop strings and end tokens were met


def test_sampling_with_a_seed_is_reproducible_and_a_perfect_draft_is_always_accepted(lm):
    speculator = lm.speculator(noisy_copy(lm, 0.0), k=4)
    a = lm.complete(PROMPTS[0], temperature=0.9, top_p=0.95, seed=7, max_new_tokens=50, ignore_eos=True,
                    draft=speculator)
    b = lm.complete(PROMPTS[0], temperature=0.9, top_p=0.95, seed=7, max_new_tokens=50, ignore_eos=True,
                    draft=lm.speculator(noisy_copy(lm, 0.0), k=4))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 50
    assert speculator.acceptance > 0.95  # q equals p up to rounding: only ties of u * q and p reject


def test_rows_it_cannot_serve_decode_plainly(lm):
    speculator = lm.speculator(noisy_copy(lm, 0.05), k=4)
    options = {"temperature": 0, "max_new_tokens": 40, "repetition_penalty": 1.3}
    assert lm.complete(PROMPTS[0], **options, draft=speculator).token_ids == lm.complete(PROMPTS[0], **options).token_ids
    assert speculator.rounds == 0


def test_a_draft_with_another_tokenizer_is_refused(lm):
    other = emergence.load("emergence-6m")
    with pytest.raises(InvalidArgument, match="tokenizer differs"):
        lm.speculator(other)


# -------------------------------------------------------------------------------- the CLI
def test_generate_with_draft_prints_the_plain_output_and_the_acceptance(capsys, tmp_path, lm):
    from emergence.weights.hf import save_hf

    folder = tmp_path / "draft"
    save_hf(noisy_copy(lm, 0.05).model, folder)
    lm.tokenizer.save(folder)
    args = ["generate", "Once upon a time", "--temperature", "0", "--max-new-tokens", "40", "--json"]
    assert main(args) in (0, None)
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--draft", str(folder), "--draft-tokens", "3"]) in (0, None)
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["token_ids"] == plain["token_ids"] and drafted["text"] == plain["text"]
    spec = drafted["speculative"]
    assert spec["draft_tokens"] == 3 and 0 < spec["drafted"] <= 3 * spec["rounds"]
    assert 0 < spec["acceptance"] <= 1 and spec["accepted"] == round(spec["acceptance"] * spec["drafted"])
    # the draft in bf16 beside an fp32 target: still the target's own greedy tokens
    assert main(args + ["--draft", str(folder), "--draft-dtype", "bf16"]) in (0, None)
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["token_ids"] == plain["token_ids"] and drafted["speculative"]["rounds"] > 0
    assert main(args + ["--draft", str(folder), "--draft-dtype", "fp8"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown dtype 'fp8'" in err


def test_a_modelfile_draft_line_is_kept_and_used(capsys, tmp_path, lm, monkeypatch):
    from emergence.weights.hf import save_hf

    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "home"))
    folder = tmp_path / "draft"
    save_hf(noisy_copy(lm, 0.05).model, folder)
    lm.tokenizer.save(folder)
    (tmp_path / "Modelfile").write_text(f"FROM stories260K\nDRAFT {folder}\nPARAMETER temperature 0\n")
    assert main(["create", "fast", "-f", str(tmp_path / "Modelfile")]) in (0, None)
    capsys.readouterr()
    assert main(["show", "fast", "--modelfile"]) in (0, None)
    assert f"DRAFT {folder}" in capsys.readouterr().out
    assert main(["generate", "Once upon a time", "--model", "fast", "--max-new-tokens", "30", "--json"]) in (0, None)
    drafted = json.loads(capsys.readouterr().out)
    assert drafted["speculative"]["rounds"] > 0
    assert drafted["token_ids"] == lm.complete("Once upon a time", temperature=0, max_new_tokens=30).token_ids
    (tmp_path / "Bad").write_text("FROM stories260K\nDRAFT no-such-model\n")
    assert main(["create", "bad", "-f", str(tmp_path / "Bad")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model at 'no-such-model'" in err


# ----------------------------------------------------------------------------- the server
def test_the_server_drafts_for_a_lone_request_and_steps_with_others(lm):
    import http.client
    import threading

    from emergence.serve.app import Server, serve_in_thread

    speculator = lm.speculator(noisy_copy(lm, 0.05), k=4)
    app = Server(lm, "m", slots=4, draft=speculator)
    server, thread = serve_in_thread(app, port=0)
    port = server.server_address[1]

    def complete(prompt: str, out: dict | None = None) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"model": "m", "prompt": prompt, "max_tokens": 60,
                                                            "temperature": 0, "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        text = json.loads(conn.getresponse().read())["choices"][0]["text"]
        if out is not None:
            out[prompt] = text
        return text

    try:
        expected = {p: lm.complete(p, temperature=0, max_new_tokens=60, ignore_eos=True).text for p in PROMPTS}
        assert complete(PROMPTS[0]) == expected[PROMPTS[0]]  # alone: drafted
        alone_rounds = speculator.rounds
        assert alone_rounds > 0
        results: dict[str, str] = {}
        threads = [threading.Thread(target=complete, args=(p, results)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == expected  # together (and alone again as the others finish)
        assert app.engine.active == 0 and app.engine.cache.num_used == 0 and not speculator.owed
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        app.close()


def test_the_committed_benchmark_and_the_readmes_table_agree():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_speculative import render_table

    result = json.loads((root / "bench" / "results" / "speculative.json").read_text())
    greedy = [r for r in result["rows"] if r["temperature"] == 0]
    assert greedy and all(r["identical_to_plain"] for r in greedy)  # greedy drafted output = the target's own
    for r in result["rows"]:
        assert 0 <= r["acceptance"] <= 1 and 1 <= r["tokens_per_round"] <= r["k"] + 1
        assert r["speedup"] == pytest.approx(r["drafted_tok_s"] / r["plain_tok_s"], rel=1e-6)
    assert result["best_at_temperature_0"] == max(greedy, key=lambda r: r["speedup"])
    readme = (root / "README.md").read_text()
    assert render_table(result) in readme
    assert f"speeds emergence-6m up {result['best_at_temperature_0']['speedup']:.2f}x" in readme  # the feature row


def test_a_draft_with_a_shorter_context_drafts_nothing_past_its_end(lm):
    # A draft that holds 40 tokens. A prompt of 40 or more: no round can draft (k = 0), each
    # emits the target's next token. A shorter one: rounds draft until the draft's context ends.
    draft = noisy_copy(lm, 0.05)
    draft.model.config = copy.copy(draft.model.config)
    draft.model.config.block_size = 40
    long_prompt = lm.tokenizer.encode(" ".join(PROMPTS * 4))
    assert len(long_prompt) >= 40
    for prompt, drafting in ((long_prompt, False), (PROMPTS[0], True)):
        speculator = lm.speculator(draft, k=4)
        plain = lm.complete(prompt, temperature=0, max_new_tokens=30, ignore_eos=True)
        drafted = lm.complete(prompt, temperature=0, max_new_tokens=30, ignore_eos=True, draft=speculator)
        assert drafted.token_ids == plain.token_ids
        if drafting:
            assert 0 < speculator.drafted < 4 * speculator.rounds
        else:
            assert speculator.drafted == 0 and speculator.rounds == 29  # the first token came from the prefill
