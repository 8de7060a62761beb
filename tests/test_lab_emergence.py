"""`emergence lab emergence` (emergence.lab.abilities): the repeated n-gram rate on sequences
counted by hand; the teacher-forced metrics against transformers' log-probabilities of the same
saved policy; exact match against search-train's own greedy evaluation (another code path);
the command end to end on a quick search-train run and a tiny scaling-sweep folder; bad input."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from emergence.cli import main
from emergence.lab import abilities
from emergence.problems import load_problems


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from emergence.search.train import run

    out = tmp_path_factory.mktemp("st") / "run"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(out, "quick", device="cpu", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return out


def test_repeated_ngram_rate_counts_earlier_occurrences():
    assert abilities.repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 1234 again, of 5
    assert abilities.repeated_ngram_rate([5, 5, 5, 5, 5, 5]) == pytest.approx(2 / 3)  # 3 grams, 2 repeats
    assert abilities.repeated_ngram_rate(list(range(10))) == 0.0
    assert abilities.repeated_ngram_rate([1, 2, 3]) == 0.0  # no 4-gram at all


def test_teacher_forced_metrics_equal_transformers_log_probabilities(quick_run):
    import emergence
    from transformers import AutoModelForCausalLM

    from emergence.problems import solution_text

    folder = quick_run / "policies" / "L" / "model"
    lm = emergence.load(str(folder), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for row in load_problems(quick_run / "problems" / "heldout.jsonl")[:6]:
        ids, first, answer = abilities.solution_targets(lm.tokenizer, row)
        assert lm.tokenizer.decode(ids[first:]) == solution_text(row)
        assert lm.tokenizer.decode([ids[i] for i in answer]).strip() == str(row["answer"])
        got = abilities.teacher_forced(lm.model, lm.tokenizer, row)
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        target = torch.tensor(ids[1:])
        tok = logp.gather(1, target[:, None])[:, 0][first - 1:]
        assert got["tokens"] == len(ids) - first
        assert got["logp_per_token"] == pytest.approx(tok.mean().item(), abs=1e-4)
        assert got["solution_logp"] == pytest.approx(tok.sum().item(), abs=1e-3)
        acc = (logp.argmax(-1) == target)[first - 1:].float().mean().item()
        assert got["token_accuracy"] == pytest.approx(acc, abs=1e-6)


def test_exact_match_equals_search_trains_greedy_evaluation(quick_run):
    import emergence

    summary = json.loads((quick_run / "summary.json").read_text())
    rows = load_problems(quick_run / "problems" / "heldout.jsonl")
    for p in summary["policies"]:
        lm = emergence.load(str(quick_run / "policies" / p["name"] / "model"), device="cpu")
        res = abilities.arithmetic(lm, rows, max_tokens=summary["settings"]["max_tokens"])
        assert res["overall"]["exact_match"] == pytest.approx(p["greedy"]["accuracy"])
        assert {d: v["exact_match"] for d, v in res["by_difficulty"].items()} == pytest.approx(
            p["greedy"]["by_difficulty"])


def test_lab_emergence_command_writes_every_part(quick_run, tmp_path, capsys):
    # a scaling-sweep folder in miniature: two "students" (the run's S and M, same tokenizer as the
    # teacher L), the best of two learning rates per size picked from runs.csv
    lab = tmp_path / "lab"
    (lab / "runs").mkdir(parents=True)
    rows = [("size", "size-S-a", 1, 32, 2, 100, 1.0), ("size", "size-S-b", 1, 32, 2, 100, 2.0),
            ("size", "size-M-a", 1, 48, 2, 200, 1.5), ("isoflop", "iso-x", 1, 48, 2, 200, 0.1)]
    with open(lab / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "key", "n_layer", "n_embd", "n_head", "params", "val_loss"])
        w.writerows(rows)
    (lab / "runs" / "size-S-a").symlink_to(quick_run / "policies" / "S", target_is_directory=True)
    (lab / "runs" / "size-M-a").symlink_to(quick_run / "policies" / "M", target_is_directory=True)
    (lab / "setting.json").write_text(json.dumps({"teacher": str(quick_run / "policies" / "L" / "model")}))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        code = main(["lab", "emergence", "--out", str(out), "--run", str(quick_run), "--per-difficulty", "1",
                     "--students", str(lab), "--samples", "2"])
    finally:
        torch.set_num_threads(threads)
    assert code in (None, 0)
    result = json.loads((out / "emergence.json").read_text())
    assert list(result["arithmetic"]) == ["S", "M", "L"] and result["problems"] == 8
    assert list(result["stories"]) == ["1x32", "1x48"]  # the best lr of each size; isoFLOP runs left out
    for r in result["stories"].values():
        assert r["teacher_logp_per_token"] < 0 and 0 <= r["repeated_4gram_rate"] <= 1
    for r in result["arithmetic"].values():
        o = r["overall"]
        assert 0 <= o["solution_prob"] <= 1 and 0 <= o["token_accuracy"] <= 1 and o["logp_per_token"] < 0
    assert (out / "emergence.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "emergence.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 3 * 9 + 2
    assert "exact match" in capsys.readouterr().out
    before = (out / "models" / "arithmetic-S.json").stat().st_mtime_ns
    main(["lab", "emergence", "--out", str(out), "--run", str(quick_run), "--per-difficulty", "1"])
    assert (out / "models" / "arithmetic-S.json").stat().st_mtime_ns == before  # a rerun keeps finished models


def test_lab_emergence_bad_input_one_line(tmp_path, capsys):
    assert main(["lab", "emergence", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run" in err[0]
    assert main(["lab", "emergence", "--out", str(tmp_path / "o"), "--run", str(tmp_path)]) != 0
    assert "search-train" in capsys.readouterr().err
    assert main(["lab", "emergence", "--out", str(tmp_path / "o"), "--students", str(tmp_path)]) != 0
    assert "lab scaling" in capsys.readouterr().err


def test_the_committed_lab_page_quotes_the_committed_results():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = json.loads((root / "bench" / "results" / "lab_emergence.json").read_text())
    page = (root / "docs" / "lab.md").read_text()
    for name, r in result["arithmetic"].items():
        o = r["overall"]
        lo, hi = o["exact_ci95"]
        row = (f"| {name} | {r['params']:,} | {100 * o['exact_match']:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}] | "
               f"{100 * o['token_accuracy']:.2f}% | {o['logp_per_token']:.3f} | {o['solution_prob']:.3f} |")
        assert row in page, row
    scores = [r["teacher_logp_per_token"] for r in result["stories"].values()]  # smallest student first
    for value in (scores[0], scores[-1], max(scores)):
        assert f"{value:.2f}" in page
