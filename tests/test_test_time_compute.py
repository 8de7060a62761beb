"""bench/test_time_compute.py (docs/test_time_compute.md, the headline): its --smoke run end to end
in a subprocess, as users run it, then checked against values the search code does not produce:
every policy's greedy solutions equal transformers' greedy decoding of the same saved model; the
headline's pick is recomputed from the CSV (the best run of the small policy within the large
one's FLOPs); the CSV agrees with the per-problem records; self_correct's budget-0 answer is its
first attempt's and its FLOPs never fall with the budget; compute-optimal's fitting problems
are none of the run's."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_module
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("ttc")
    work = out / "work"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "test_time_compute.py"), "--smoke", "--out-dir",
                           str(out), "--work", str(work)], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "test_time_compute.json").read_text())
    with open(out / "test_time_compute.csv") as f:
        rows = list(csv.DictReader(f))
    records = json.loads((out / "records.json").read_text())
    return {"out": out, "work": work, "result": result, "csv": rows, "records": records}


def _module():
    return bench_module("test_time_compute")


def test_smoke_writes_every_run_the_plots_and_the_page(smoke):
    r, out = smoke["result"], smoke["out"]
    strategies = {v["job"]["strategy"] for v in r["runs"].values()}
    assert strategies == {"greedy", "majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts",
                          "self_correct", "compute_optimal", "revisions"}
    (rev,) = [v["job"] for v in r["runs"].values() if v["job"]["strategy"] == "revisions"]
    assert rev["policy"] == "S" and rev["model"] == "S-rev"  # S's revision model, one of S's strategies
    assert {v["job"]["policy"] for v in r["runs"].values()} == {"S", "M", "L", "GRPO"}
    assert r["problems"] == 16 and r["params"]["S"] < r["params"]["M"] < r["params"]["L"]
    for name in ("test_time_compute.png", "budget.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "headline.md").read_text()
    assert page.startswith(_module().MARK_START) and page.rstrip().endswith(_module().MARK_END)
    assert r["commit"] and r["machine"]["cores"] >= 1


def test_greedy_answers_equal_transformers_greedy_decoding(smoke):
    """Each policy's greedy run (DecodeBatch through search.LocalPolicy) against transformers'
    generate(do_sample=False) on the same saved model and prompt, problem by problem."""
    from transformers import AutoModelForCausalLM

    from emergence.problems import extract_answer, load_problems
    from emergence.search.prompt import format_prompt, trim_solution
    import emergence

    run = smoke["work"] / "run"
    held = load_problems(run / "problems" / "heldout.jsonl")
    p = smoke["result"]["settings"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for name in ("S", "L"):
            folder = run / "policies" / name / "model"
            hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
            tok = emergence.load(str(folder), device="cpu").tokenizer
            recs = smoke["records"][f"{name}-greedy-n1"]
            assert len(recs) == smoke["result"]["problems"]
            for rec in recs:
                row = next(x for x in held if x["source"] == rec["source"])
                ids = tok.encode(format_prompt(row["question"]))
                with torch.no_grad():
                    room = hf.config.max_position_embeddings - len(ids)  # the search stops at the context's end
                    gen = hf.generate(torch.tensor([ids]), max_new_tokens=min(p["max_tokens"], room), do_sample=False,
                                      eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
                new = gen[0, len(ids):].tolist()
                if tok.eos_id in new:
                    new = new[:new.index(tok.eos_id)]
                text = trim_solution(tok.decode(new))
                assert rec["text"] == text, (name, rec["source"])
                expected = extract_answer(text)
                assert rec["answer"] == expected
                assert rec["correct"] == (expected is not None and expected == row["answer"])
    finally:
        torch.set_num_threads(threads)


def test_headline_pick_is_the_best_small_run_within_the_large_greedy_flops(smoke):
    rows, r = smoke["csv"], smoke["result"]
    for h in r["headline"]:
        panel = h["panel"]
        large = next(x for x in rows if x["policy"] == r["large"] and x["strategy"] == "greedy"
                     and x["difficulty"] == panel)
        budget = float(large["flops_per_problem"])
        assert h["large"]["accuracy"] == pytest.approx(float(large["accuracy"]), abs=1e-4)
        within = [x for x in rows if x["policy"] == "S" and x["difficulty"] == panel
                  and x["strategy"] != "compute_optimal" and float(x["flops_per_problem"]) <= budget * (1 + 1e-3)]
        if not within:
            assert h["small_best"] is None
            continue
        best = max(float(x["accuracy"]) for x in within)
        assert h["small_best"]["accuracy"] == pytest.approx(best, abs=1e-4)
        assert h["small_best"]["flops"] <= budget * (1 + 1e-3)


def test_csv_agrees_with_the_records(smoke):
    rows, records = smoke["csv"], smoke["records"]
    for key, recs in records.items():
        policy, strategy = key.split("-")[0], key.split("-")[1]
        if strategy == "self_correct":
            continue
        n = int(key.split("-n")[1].split("-")[0])
        for panel in ["all", *sorted({str(x["difficulty"]) for x in recs})]:
            sub = [x for x in recs if panel == "all" or str(x["difficulty"]) == panel]
            row = next(x for x in rows if x["policy"] == policy and x["strategy"] == strategy and int(x["n"]) == n
                       and x["difficulty"] == panel)
            assert int(row["correct"]) == sum(x["answer"] is not None and x["answer"] == x["expected"] for x in sub)
            assert int(row["problems"]) == len(sub)
            assert float(row["flops_per_problem"]) == pytest.approx(sum(x["flops"] for x in sub) / len(sub),
                                                                    rel=1e-3)


def test_self_correct_budget_zero_is_the_first_attempt_and_flops_grow(smoke):
    for key, recs in smoke["records"].items():
        if "self_correct" not in key:
            continue
        for rec in recs:
            assert len(rec["answers_by_round"]) == smoke["result"]["settings"]["budget"] + 1
            flops = rec["flops_by_round"]
            assert all(a <= b for a, b in zip(flops, flops[1:]))
            assert flops[-1] == pytest.approx(rec["flops"], rel=1e-9)
            if rec.get("accepted") and rec.get("rounds") == 0:  # accepted at once: every budget answers the same
                assert len(set(map(str, rec["answers_by_round"]))) == 1


def test_fitting_problems_are_none_of_the_runs():
    mod = _module()
    rows = mod.fit_problems(dict(mod.SMOKE, fit_per_difficulty=3), avoid=set())
    assert len(rows) == 24 and sorted({r["difficulty"] for r in rows}) == list(range(1, 9))
    from emergence.problems import generate_problems

    taken = {r["question"] for r in generate_problems(200, (1, 8), seed=0)}
    again = mod.fit_problems(dict(mod.SMOKE, fit_per_difficulty=3), avoid=taken | {rows[0]["question"]})
    assert rows[0]["question"] not in {r["question"] for r in again}
    assert not taken & {r["question"] for r in again}


def test_search_verifiers_trains_on_a_fresh_split_and_keeps_the_runs_stages(smoke, tmp_path):
    """bench/search_verifiers.py on the smoke's quick run: the new verifier split shares no question
    with the run, the policies are the run's (not retrained), the held-out samples the same."""
    sv = bench_module("search_verifiers")
    from emergence.problems import load_problems

    run, out = smoke["work"] / "run", tmp_path / "v"
    threads = torch.get_num_threads()
    try:
        assert sv.main(["--run", str(run), "--out", str(out), "--problems", "12", "--setting", "quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    fresh = {r["question"] for r in load_problems(out / "problems" / "verifier.jsonl")}
    taken = {r["question"] for s in ("train", "verifier", "heldout") for r in load_problems(run / "problems" / f"{s}.jsonl")}
    assert len(fresh) == 12 and not fresh & taken
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["rm_init"] == "S" and summary["verifiers"]["prm"]["init"] == "S"
    assert summary["data"]["samples-verifier"]["samples"] == 12 * summary["settings"]["samples_per_problem"]
    before = json.loads((run / "summary.json").read_text())
    assert [p["val_loss"] for p in summary["policies"]] == [p["val_loss"] for p in before["policies"]]
    assert summary["data"]["labels-heldout"] == before["data"]["labels-heldout"]
    assert (out / "prm" / "model.safetensors").is_file()
    assert sv.main(["--run", str(run), "--out", str(out)]) == 2  # an existing folder is refused, not overwritten


def test_the_committed_headline_is_the_committed_results_rendered():
    """docs/test_time_compute.md's headline section is render(bench/results/test_time_compute.json),
    and the committed CSV holds the same accuracies as the JSON."""
    mod = _module()
    result = json.loads(mod.RESULTS.read_text())
    page = mod.DOC.read_text()
    block = page[page.index(mod.MARK_START):page.index(mod.MARK_END) + len(mod.MARK_END)]
    assert block == mod.render(result)
    with open(mod.CSV) as f:
        rows = list(csv.DictReader(f))
    for key, run in result["runs"].items():
        if run["job"]["strategy"] == "self_correct":
            continue
        row = next(x for x in rows if x["policy"] == run["job"]["policy"] and x["strategy"] == run["job"]["strategy"]
                   and int(x["n"]) == run["job"]["n"] and x["difficulty"] == "all")
        assert int(row["correct"]) == run["summary"]["correct"] and int(row["problems"]) == result["problems"]
