"""bench/revisions.py (docs/test_time_compute.md, "Sequential revisions"): its --smoke run end to
end in a subprocess, then its tables against run_search's own summaries (a parallel run's
accuracy and FLOPs, a sequential run's by N from summarize's by_budget) and the per-problem
records (attempt N's own answer; FLOPs never falling with N); and the committed section is the
committed results rendered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return bench_module("revisions")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("revisions")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "revisions.py"), "--smoke", "--out-dir", str(out),
                           "--work", str(out / "work")], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"out": out, "result": json.loads((out / "revisions.json").read_text()),
            "records": json.loads((out / "records.json").read_text())}


def test_smoke_runs_every_series_and_writes_the_plot_and_page(smoke):
    r, out, mod = smoke["result"], smoke["out"], _module()
    assert set(r["runs"]) == {j["key"] for j in mod.jobs(mod.SMOKE, ["S"])}
    widest = max(mod.SMOKE["windows"])
    assert set(r["tables"]["S"]["all"]) == set(mod.series_labels(mod.SMOKE)) | {f"revisions-w{widest}-last"}
    assert r["attempts"] == "sampled"  # search-train's default kind
    assert r["problems"] == 16 and r["revisers"]["S"]["revision_rows"] > 0
    run = out / "work" / "run"  # an empty RUN: only the stages revisions need were run (no L, no verifiers)
    assert sorted(p.name for p in (run / "policies").iterdir()) == ["S"] and not (run / "prm").exists()
    assert r["revisers"]["S"]["policy_greedy"] == json.loads((run / "stages" / "eval-S.json").read_text())["accuracy"]
    assert (out / "revisions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import csv

    with open(out / "revisions.csv") as f:  # the tables, flat
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(pts) for bins in r["tables"].values() for by in bins.values() for pts in by.values())
    for row in rows:
        pt = r["tables"][row["policy"]][row["difficulty"]][row["series"]][row["n"]]
        assert int(row["correct"]) == pt["correct"]
        assert float(row["accuracy"]) == pytest.approx(pt["accuracy"], abs=1e-4)
    page = (out / "revisions.md").read_text()
    _, _, start, end = mod.outputs("sampled")
    assert page.startswith(start) and page.rstrip().endswith(end)
    assert r["commit"] and r["machine"]["cores"] >= 1


def test_tables_agree_with_the_search_summaries_and_the_records(smoke):
    """Each table point against what run_search's own summary says (accuracy, by_budget), and the
    attempt-N series against the per-problem records."""
    r, records, mod = smoke["result"], smoke["records"], _module()
    ns = r["settings"]["ns"]
    for key, run in r["runs"].items():
        job = run["job"]
        for label, span in [("all", None), *mod.BINS.items()]:
            table = r["tables"]["S"][label]
            panels = [s for d, s in run["by_difficulty"].items() if span is None or span[0] <= int(d) <= span[1]]
            problems = sum(s["problems"] for s in panels)
            if job["strategy"] == "majority":
                pt = table[mod.series(job)][str(job["n"])]
                assert pt["correct"] == sum(s["correct"] for s in panels) and pt["problems"] == problems
                assert pt["flops"] == pytest.approx(sum(s["flops"] * s["problems"] for s in panels) / problems)
                continue
            for n in ns:  # a sequential run: the majority after n attempts, as summarize's by_budget counts it
                pt = table[mod.series(job)][str(n)]
                assert pt["correct"] == sum(s["by_budget"][n - 1]["correct"] for s in panels)
                assert pt["flops"] == pytest.approx(sum(s["by_budget"][n - 1]["flops"] * s["problems"]
                                                        for s in panels) / problems)
                kept = [x for x in records[key] if span is None or span[0] <= x["difficulty"] <= span[1]]
                last = table[mod.series(job) + "-last"][str(n)]
                assert last["correct"] == sum(len(x["attempt_answers"]) >= n and x["attempt_answers"][n - 1]
                                              == x["expected"] for x in kept)
    for key in [k for k, run in r["runs"].items() if run["job"]["strategy"] == "revisions"]:
        for x in records[key]:
            assert x["answers_by_round"][-1] == x["answer"] and x["flops_by_round"][-1] == pytest.approx(x["flops"])
            assert x["answers_by_round"][0] == x["attempt_answers"][0]  # one attempt: its own answer
            spent = x["flops_by_round"]  # FLOPs never fall with N (a prompt past the context costs none)
            assert spent[0] > 0 and all(b >= a for a, b in zip(spent, spent[1:]))


def test_the_committed_sections_are_the_committed_results_rendered():
    from emergence.search.revise import ATTEMPTS

    mod = _module()
    page = mod.DOC.read_text()
    found = 0
    for kind in ATTEMPTS:
        path, png, start, end = mod.outputs(kind)
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        assert result["attempts"] == kind and png.is_file()
        assert page[page.index(start):page.index(end) + len(end)] == mod.render(result)
        found += 1
    assert found == len(ATTEMPTS)  # both kinds are measured and on the page
