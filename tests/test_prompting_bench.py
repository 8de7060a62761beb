"""bench/prompting.py: its generated data, its format family, its scoring, and its --smoke run end to end.

The smoke run (a tiny extraction model, 3 steps of instruction tuning, a few items per cell, and
search-train's quick policies) runs as users run it, in a subprocess, into tmp_path; the test
then checks the JSON against the generated data: answers in their summaries, the format families
apart, k examples in a k-shot prompt, a result for every cell."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "prompting.py"
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


@pytest.fixture(scope="module")
def pb():
    spec = importlib.util.spec_from_file_location("prompting_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))  # its `provenance` import
    spec.loader.exec_module(module)
    return module


def _iso(date: str) -> str:
    m = re.fullmatch(r"([A-Z][a-z]+) (\d{1,2}), (\d{4})", date)
    assert m, date
    return f"{m.group(3)}-{MONTHS.index(m.group(1)) + 1:02d}-{int(m.group(2)):02d}"


def test_summaries_hold_their_answers(pb):
    rows = pb.summaries(300, 7)
    assert len({r["summary"] for r in rows}) == 300
    assert {r["template"] for r in rows} == {*range(len(pb.SUMMARY_TEMPLATES)),
                                             *(f"short-{i}" for i in range(len(pb.SHORT_TEMPLATES)))}
    for r in rows:
        for f in ("company", "date", "revenue"):
            assert r["summary"].count(r[f]) == 1, (f, r)
        assert r["iso"] == _iso(r["date"])
        assert re.fullmatch(r"\$\d+(\.\d)? (million|billion)", r["revenue"])
    assert pb.summaries(5, 7) == rows[:5]  # seeded
    avoid = {r["summary"] for r in rows[:50]}
    assert not avoid & {r["summary"] for r in pb.summaries(50, 7, avoid)}


def test_format_lines_and_fields(pb):
    row = {"company": "Blue Tech Inc.", "date": "May 3, 2023", "revenue": "$120 million"}
    f = pb.Format(("revenue", "company", "date"), ("Sales", "Firm", "Day"), "=", "; ", ("[", "]"))
    line = f.line(row)
    assert line == "[Sales=$120 million; Firm=Blue Tech Inc.; Day=May 3, 2023]"
    assert f.field_ok(line, row) == {"revenue": True, "company": True, "date": True}
    assert f.field_ok("[Sales=$120 million; Firm=Blue Tech; Day=May 3, 2023]", row) == {
        "revenue": True, "company": False, "date": True}
    assert f.field_ok("Sales: $120 million", row)["revenue"] is False  # the format's own separator
    words = f.describe()
    assert '"Sales" and the revenue, then "Firm" and the company, then "Day" and the date' in words
    assert '"="' in words and '"; "' in words and "square brackets" in words
    # a date with a comma inside a ", "-separated line is still one field
    g = pb.Format(("date", "company"), ("Date", "Company"), ": ", ", ", ("", ""))
    assert g.field_ok(g.line(row), row) == {"date": True, "company": True}


def test_the_families_do_not_share_components(pb):
    seen, unseen = pb.FAMILIES["seen"], pb.FAMILIES["unseen"]
    for f in ("company", "date", "revenue"):
        assert not set(seen["keys"][f]) & set(unseen["keys"][f])
    for comp in ("kv", "sep", "wrap"):
        assert not set(seen[comp]) & set(unseen[comp])
    docs, info = pb.corpus(200, 3)
    text = "\n".join(docs)
    for word in ("Issuer", "Entity", "Filed", "When", "Turnover", "Receipts", " := ", " >> ", " || ", " & "):
        assert word not in text, word
    assert sum(info["documents"].values()) == 200 and info["extraction_pairs"] > 0
    for fmt in info["formats"]:
        assert all(k in seen["keys"][f] for f, k in zip(fmt.fields, fmt.keys))


def test_wilson(pb):
    lo, hi = pb.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = pb.wilson(0, 25)
    assert lo == 0.0 and hi == pytest.approx(0.1332, abs=1e-4)


def test_smoke_run(tmp_path, pb):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-json", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    s = r["settings"]
    assert r["smoke"] is True and r["ks"] == [0, 1, 2, 4, 8] and r["commit"] and r["machine"]["cores"] >= 1

    # the data: answers consistent with their text, the families as defined
    for row in r["data"]["samples"]:
        for f in ("company", "date", "revenue"):
            assert row[f] in row["summary"]
        assert row["iso"] == _iso(row["date"])
    fams = r["data"]["families"]
    assert set(fams) == {"seen", "unseen"} and fams["unseen"]["keys"]["company"] == ["Issuer", "Entity"]
    for fe in r["data"]["format_examples"]:
        fmt = fe["format"]
        assert all(k in fams[fe["family"]]["keys"][f] for f, k in zip(fmt["fields"], fmt["keys"]))
        assert fe["line"].startswith(fmt["wrap"][0]) and fe["line"].endswith(fmt["wrap"][1])
        assert all(f'"{k}"' in fe["instruction"] for k in fmt["keys"])
    assert r["data"]["eval_formats_in_corpus"]["unseen"] == 0
    assert r["data"]["eval_summaries_in_corpus"] == 0
    e = r["extraction_model"]
    assert e["n_layer"] == 1 and e["params"] > 0 and e["final_val_loss"] > 0
    assert [(ph["steps"], ph["context"]) for ph in e["phases"]] == [(ph["steps"], ph["context"]) for ph in s["phases"]]
    assert e["context"] == max(ph["context"] for ph in s["phases"])
    assert sum(e["documents"].values()) == s["docs"]
    assert r["instruction_tuning"]["rows"] == s["it_rows"] and r["instruction_tuning"]["steps"] == s["it_steps"]
    row = r["instruction_tuning"]["example_row"]
    assert row["prompt"].startswith("Extract ") and row["prompt"].endswith("\n")

    # a result for every extraction cell, and prompts holding k examples
    for model in ("base", "instruct"):
        cells = r["extraction"][model]
        assert len(cells) == 2 * 2 * 5
        for fam in ("seen", "unseen"):
            for instr in ("instruction", "no-instruction"):
                for k in r["ks"]:
                    c = cells[f"{fam}/{instr}/k={k}"]
                    assert c["n"] == s["extract_items"] and c["too_long"] == 0
                    assert 0 <= c["exact"] <= min(c["field_mean"], c["format"]) + 1e-9
                    assert c["format"] <= 1 and c["field_mean"] <= 1
                    assert all(c["values"][f] >= c["fields"][f] for f in ("company", "date", "revenue"))
                    if fam == "seen":  # one prompt kept
                        (shown,) = c["shown"]
                        prompt = shown["prompt"]
                        assert prompt.count("Summary: ") == k + 1 and prompt.endswith("\n")
                        assert len(shown["examples"]) == k and shown["examples"] == list(range(k))
                        assert prompt.startswith("Extract ") == (instr == "instruction")
                        if k:
                            assert prompt.split("\n\n")[-2].startswith("Summary: ")  # the k-th example
    # the cascade: one call for each single prompt, two for the cascade
    for model in ("base", "instruct"):
        tasks = r["cascade"]["results"][model]
        assert list(tasks) == ["iso-date", "revenue-in-words"]
        for task, res in tasks.items():
            assert list(res) == ["single", "single-with-intermediate", "cascade", "second-stage-alone"]
            assert [res[p]["calls_per_item"] for p in res] == [1, 1, 2, 1]
            assert all(res[p]["n"] == s["cascade_items"] and 0 <= res[p]["accuracy"] <= 1 for p in res)
            assert 0 <= res["single-with-intermediate"]["wrote_second_line"] <= 1
            assert res["cascade"]["right_from_wrong_first"] <= res["cascade"]["accuracy"]
            stages = res["cascade"]["shown"][0]["stages"]
            assert [st["name"] for st in stages] == ["extract", "convert"]
            src, dst = ("Date", "ISO date") if task == "iso-date" else ("Revenue", "In words")
            assert stages[1]["prompt"].endswith(f"{src}: {stages[0]['output'].strip()}\n{dst}:")
            assert stages[0]["prompt"].count("Summary: ") == r["cascade"]["shots"] + 1
            assert stages[1]["prompt"].count(f"{dst}: ") == r["cascade"]["shots"]
            target = res["cascade"]["shown"][0]["target"]
            if task == "iso-date":
                assert re.fullmatch(r"20\d\d-\d\d-\d\d", target)
            else:
                assert re.fullmatch(r"\d+(\.\d)? (million|billion) dollars", target)

    # arithmetic: every policy and method, every difficulty, intervals around the rates
    a = r["arithmetic"]
    assert a["problems"] == 8 * s["problems_per_difficulty"] and a["seed"] != 0
    assert set(a["policies"]) == {"S", "M", "L"}
    for name, pol in a["policies"].items():
        assert list(pol["methods"]) == ["direct", "cot", "few-shot-cot", "few-shot-cot-eos"]
        for m, v in pol["methods"].items():
            assert v["n"] == a["problems"] and v["wilson"][0] <= v["accuracy"] <= v["wilson"][1]
            assert v["accuracy"] <= v["answered"] <= 1
            assert list(v["by_difficulty"]) == [str(d) for d in range(1, 9)]
            assert sum(b["n"] for b in v["by_difficulty"].values()) == v["n"]
        ex = {m: v["example"]["prompt"] for m, v in pol["methods"].items()}
        assert ex["direct"].endswith("\nAnswer:") and ex["cot"].endswith("\nAnswer step by step.\n")
        k = pol["methods"]["few-shot-cot"]["by_difficulty"]["1"]["mean_k"]  # one problem of difficulty 1
        assert ex["few-shot-cot"].count("Answer step by step.") == k + 1
        assert ex["few-shot-cot-eos"].count("<|endoftext|>") == pol["methods"]["few-shot-cot-eos"][
            "by_difficulty"]["1"]["mean_k"]


class ScriptedBackend:
    """Answers every stage of the two-stage tasks right (or the first stage wrong for one summary),
    from the rows it was given: what evaluate_cascade must then score as right."""

    def __init__(self, pb, rows, wrong_first=None):
        self.pb, self.by_summary, self.wrong_first = pb, {r["summary"]: r for r in rows}, wrong_first
        self.by_date = {r["date"]: r for r in rows}
        self.by_revenue = {r["revenue"]: r for r in rows}

    def complete(self, prompt, n=1, temperature=0.0, max_tokens=128, stop=(), seed=None):
        from emergence.prompts import Sample

        last = prompt.split("\n\n")[-1]
        lines = last.split("\n")
        if lines[0].startswith("Summary: "):
            row = self.by_summary[lines[0][len("Summary: "):]]
            key = lines[-1].rstrip(":")
            if key == "Date":
                text = " " + ("January 1, 2000" if row["summary"] == self.wrong_first else row["date"])
                if len(lines) == 2 and "ISO date" in prompt.split("\n\n")[-2]:  # written with the intermediate
                    text += f"\nISO date: {row['iso']}"
            elif key == "Revenue":
                text = " " + row["revenue"]
                if "In words" in prompt.split("\n\n")[-2]:
                    text += f"\nIn words: {self.pb.in_words(row['revenue'])}"
            elif key == "ISO date":
                text = " " + row["iso"]
            else:
                text = " " + self.pb.in_words(row["revenue"])
        else:
            value = lines[0].split(": ", 1)[1]
            if lines[-1] == "ISO date:":
                text = " " + (self.by_date[value]["iso"] if value in self.by_date else "2000-01-01")
            else:
                text = " " + self.pb.in_words(value)
        return [Sample(text, len(prompt.split()), len(text.split()))]


def test_cascade_scoring(pb):
    rows = pb.summaries(6, 21)
    examples, items = rows[:2], rows[2:]
    res = pb.evaluate_cascade(ScriptedBackend(pb, rows), items, examples, 2, "scripted")
    for task in ("iso-date", "revenue-in-words"):
        for prog, v in res[task].items():
            assert v["accuracy"] == 1.0, (task, prog)
        assert res[task]["cascade"]["first_right"] == 1.0
        assert res[task]["cascade"]["second_right_given_first"] == 1.0
        assert res[task]["cascade"]["right_from_wrong_first"] == 0.0
        assert res[task]["single-with-intermediate"]["wrote_second_line"] == 1.0
        assert [v["calls_per_item"] for v in res[task].values()] == [1, 1, 2, 1]
    assert all(v["month_day_right"] == 1.0 for v in res["iso-date"].values())
    # a wrong first step: the cascade's answer is wrong there, and counted as such
    res = pb.evaluate_cascade(ScriptedBackend(pb, rows, wrong_first=items[0]["summary"]), items, examples, 2, "x")
    c = res["iso-date"]["cascade"]
    assert c["accuracy"] == 0.75 and c["first_right"] == 0.75 and c["second_right_given_first"] == 1.0
    assert c["month_day_right"] == 0.75 and c["right_from_wrong_first"] == 0.0
    assert res["iso-date"]["single-with-intermediate"]["first_right"] == 0.75
    assert res["iso-date"]["second-stage-alone"]["accuracy"] == 1.0


def test_the_committed_page_is_the_committed_results_rendered(pb):
    """docs/prompting.md is render_doc(bench/results/prompting.json): every figure on the page comes
    from the committed run (a page edited by hand, or results rerun without the page, fail here)."""
    result = json.loads((ROOT / "bench" / "results" / "prompting.json").read_text(encoding="utf-8"))
    assert (ROOT / "docs" / "prompting.md").read_text(encoding="utf-8") == pb.render_doc(result)
    cot = {n: v["methods"]["cot"]["accuracy"] for n, v in result["arithmetic"]["policies"].items()}
    direct = {n: v["methods"]["direct"]["accuracy"] for n, v in result["arithmetic"]["policies"].items()}
    assert all(cot[n] > direct[n] for n in cot)  # the long run's policies: CoT is what solves the problems
