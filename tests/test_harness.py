"""`emergence eval` (harness.py) against EleutherAI's lm-evaluation-harness.

The same task files (tests/data/harness/*.yaml, lm_eval's format) run in both tools on the same
model, the shipped emergence-6m (trained here, stored in the HF llama layout, which
transformers loads): lm_eval's hf backend, offline, on the CPU in fp32, and emergence's
harness. Multiple choice: acc, acc_norm, acc_bytes and acc_mutual_info agree exactly, and
so does every request (its context and continuation strings and its log-likelihood: with the
same batch size the two batch the same rows, and emergence's forward pass reproduces
transformers' bit for bit; the test allows 1e-6). Generation: the same greedy continuations
and exact_match. The generation metrics are also checked on fixed strings against values
worked out by hand, and bad input ends in one line naming the file and line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import kernel_setting

import emergence
from emergence.cli import main
from emergence.harness import (encode_pair, evaluate, exact_match, f1, load_task, loglikelihoods, mean_stderr,
                               regex_extract, regex_match)

HERE = Path(__file__).parent / "data" / "harness"
MODEL = Path(emergence.__file__).parent / "models" / "emergence-6m"
MC_TASKS = ("stories_mc", "arith_mc")
BATCH = 32  # lm_eval's and emergence's: the same batches, so the same numbers


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task files and their rows, copied as they are into a folder of their own."""
    folder = tmp_path_factory.mktemp("tasks")
    for name in ("stories_mc", "arith_mc", "story_gen"):
        shutil.copy(HERE / f"{name}.yaml", folder)
        shutil.copy(HERE / f"{name}.jsonl", folder)
    return folder


@pytest.fixture(scope="module")
def lm():
    return emergence.load(MODEL, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def lm_eval_run(task_dir, tmp_path_factory):
    """lm_eval's results and logged samples for the three tasks, run once."""
    cache = tmp_path_factory.mktemp("hf_datasets")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(key, "1")
        mp.setenv("HF_DATASETS_CACHE", str(cache))
        mp.chdir(task_dir)  # lm_eval reads relative data_files from its working folder
        lm_eval = pytest.importorskip("lm_eval")
        import datasets
        from lm_eval.tasks import TaskManager

        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)  # if datasets was imported before
        from lm_eval.models.huggingface import HFLM

        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        model = HFLM(pretrained=str(MODEL), dtype="float32", device="cpu", batch_size=BATCH)
        results, samples = {}, {}
        for name in (*MC_TASKS, "story_gen"):  # one task a run: lm_eval batches a run's requests together
            out = lm_eval.simple_evaluate(model=model, tasks=[name], task_manager=manager, log_samples=True,
                                          verbosity="ERROR")
            results[name] = out["results"][name]
            samples[name] = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return results, samples


@pytest.fixture(scope="module")
def ours(lm, task_dir):
    """emergence's results for the multiple-choice tasks, their fp32 products in torch's BLAS as
    lm_eval's transformers model computes them (on an AMD CPU emergence's go to oneDNN, whose
    order of summation moves the log-likelihoods past 1e-6: products.py), so that they
    can be held to 1e-6."""
    with kernel_setting("onednn_products", False):
        return {name: evaluate(lm, task_dir / f"{name}.yaml", batch_size=BATCH) for name in MC_TASKS}


# ------------------------------------------------------------------------------ lm_eval agreement
@pytest.mark.parametrize("name", MC_TASKS)
def test_multiple_choice_matches_lm_eval(name, ours, lm_eval_run):
    results, samples = lm_eval_run
    ours = ours[name]
    theirs = results[name]
    assert ours.n == theirs["sample_len"] == len(samples[name])
    for metric, (value, stderr) in ours.metrics.items():
        assert value == theirs[f"{metric},none"], metric
        assert stderr == pytest.approx(theirs[f"{metric}_stderr,none"], abs=1e-12), metric
    worst = 0.0
    for item, sample in zip(ours.items, samples[name]):
        choices = item["choices"]
        lls = item["loglikelihoods"] + item.get("unconditional_loglikelihoods", [])
        assert len(sample["resps"]) == len(lls)
        for i, ((context, continuation), resp) in enumerate(zip(sample["arguments"], sample["resps"])):
            expected_context = item["context"] if i < len(choices) else ""
            assert (context, continuation) == (expected_context, ours_delimiter(name) + choices[i % len(choices)])
            worst = max(worst, abs(resp[0][0] - lls[i]))
        for metric in ours.metrics:
            assert item[metric] == sample[metric], (item["doc_id"], metric)
    assert worst <= 1e-6, f"largest per-request log-likelihood difference {worst}"


def ours_delimiter(name: str) -> str:
    return {"stories_mc": " ", "arith_mc": ""}[name]


def test_generation_matches_lm_eval(lm, task_dir, lm_eval_run):
    results, samples = lm_eval_run
    ours = evaluate(lm, task_dir / "story_gen.yaml")
    assert [item["prediction"] for item in ours.items] == [s["filtered_resps"][0] for s in samples["story_gen"]]
    assert ours.metrics["exact_match"][0] == results["story_gen"]["exact_match,none"] == 5 / 6


def test_batch_size_changes_numbers_only_in_rounding(lm, task_dir, ours):
    """Other batches pad differently: the same answers, log-likelihoods equal to rounding."""
    few = evaluate(lm, task_dir / "stories_mc.yaml", batch_size=3, limit=10)
    assert few.n == 10
    for x, y in zip(ours["stories_mc"].items, few.items):
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-4)
        assert (x["pred"], x["pred_norm"], x["acc"]) == (y["pred"], y["pred_norm"], y["acc"])


# ------------------------------------------------------------------------------ requests
def test_encode_pair_moves_trailing_space_and_splits_the_whole(lm):
    tok = lm.tokenizer
    ctx, cont = encode_pair(tok, "Answer: ", "12")
    assert ctx == tok.encode("Answer:") and ctx + cont == tok.encode("Answer: 12")
    assert encode_pair(tok, "", " park") == ([tok.eos_id], tok.encode(" park"))  # no BOS: EOS conditions


def test_loglikelihoods_match_one_at_a_time(lm):
    from emergence.evaluate import log_likelihood

    tok = lm.tokenizer
    pairs = [encode_pair(tok, "Once upon a time", c) for c in (" there", " there was", " a cat sat", " there")]
    got = loglikelihoods(lm.model, pairs, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        want, want_greedy = log_likelihood(lm.model, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    assert got[0] == got[3]


# ------------------------------------------------------------------------------ generation metrics
def test_exact_match_options():
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match("Paris.", "paris") == 0.0
    assert exact_match("Paris.", "paris", ignore_case=True, ignore_punctuation=True) == 1.0
    assert exact_match("Answer: 42", "42", regexes_to_ignore=["Answer: "]) == 1.0
    assert exact_match("v2", "v3", ignore_numbers=True) == 1.0


def test_exact_match_agrees_with_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate

    cases = [("Paris.", "paris"), (" The Cat ", "the cat"), ("a-b, c!", "ab c"), ("42", "42 ")]
    for options in ({}, {"ignore_case": True}, {"ignore_case": True, "ignore_punctuation": True},
                    {"regexes_to_ignore": [r"\s+"]}):
        for pred, ref in cases:
            want = exact_match_hf_evaluate(predictions=[pred], references=[ref], **options)["exact_match"]
            assert exact_match(pred, ref, **options) == want, (pred, ref, options)


def test_regex_match():
    assert regex_extract("The answer is 42.", r"answer is (\d+)") == "42"
    assert regex_extract("#### 1,234", r"#### ([\d,]+)") == "1,234"
    assert regex_extract("no number", r"(\d+)") is None
    assert regex_extract("x=3 y=4", r"y=\d") == "y=4"  # no group: the whole match
    assert regex_match("The answer is 42.", "42", r"answer is (\d+)") == 1.0
    assert regex_match("The answer is 41.", "42", r"answer is (\d+)") == 0.0
    assert regex_match("no answer", "42", r"answer is (\d+)") == 0.0
    assert regex_match("ANSWER: Yes", "yes", r"ANSWER: (\w+)", ignore_case=True) == 1.0


def test_f1_is_squad_token_f1():
    assert f1("the cat sat on the mat", "a cat sat on a mat") == 1.0  # articles and case go
    assert f1("cat sat", "cat sat on mat") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 1, R 1/2
    assert f1("cat cat dog", "cat bird") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert f1("Hello, world!", "hello world") == 1.0
    assert f1("dog", "cat") == 0.0
    assert f1("", "") == 1.0 and f1("a", "cat") == 0.0  # nothing left of "a": only empty matches empty


def test_mean_stderr():
    assert mean_stderr([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(1 / 3) / 2)
    assert mean_stderr([1.0]) is None


def test_generation_metrics_end_to_end(lm, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # harness_checkers.py
    result = evaluate(lm, HERE / "story_gen_checked.yaml")
    rows = [json.loads(line) for line in (HERE / "story_gen.jsonl").read_text().splitlines()]
    predictions = [lm.generate(r["prompt"], temperature=0, max_new_tokens=24, stop=["."]) for r in rows]
    assert [item["prediction"] for item in result.items] == predictions
    punct = str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    want = {
        "exact_match": [float(p.lower().translate(punct) == r["first"].lower()) for p, r in zip(predictions, rows)],
        "regex_match": [float(p.split()[0] == r["first"]) if p.split() else 0.0 for p, r in zip(predictions, rows)],
        "f1": [f1(p, r["first"]) for p, r in zip(predictions, rows)],
        "checker": [float(r["word"].lower() in p.lower()) for p, r in zip(predictions, rows)],
    }
    for metric, values in want.items():
        assert [item[metric] for item in result.items] == values, metric
        assert result.metrics[metric][0] == pytest.approx(sum(values) / len(values))
    # the first word of each continuation is the target's first word, but for the last row
    assert want["regex_match"] == [1.0] * 5 + [0.0]
    assert want["f1"][:2] == [1.0, 1.0] and want["f1"][2] == pytest.approx(2 / 3)  # "were singing" vs "were"
    assert want["checker"] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------ the command
def test_cli_eval_summary_items_and_json(task_dir, tmp_path, capsys):
    out = tmp_path / "items.jsonl"
    assert main(["eval", "--task", str(task_dir / "arith_mc.yaml"), "--model", str(MODEL), "--device", "cpu",
                 "--limit", "5", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "arith_mc" in table and "acc_norm" in table and "acc_mutual_info" in table
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(items) == 5 and set(items[0]) >= {"doc_id", "context", "choices", "loglikelihoods", "acc", "acc_norm"}
    assert main(["eval", "--task", str(task_dir / "arith_mc.yaml"), "--model", str(MODEL), "--device", "cpu",
                 "--limit", "5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 5 and summary["metrics"]["acc"]["value"] == sum(i["acc"] for i in items) / 5


# ------------------------------------------------------------------------------ bad input
GOOD = """task: t
dataset_path: json
dataset_kwargs:
  data_files: rows.jsonl
test_split: train
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""
ROWS = ['{"q": "1 + 1 =", "choices": ["2", "3"], "label": 0}', '{"q": "2 + 2 =", "choices": ["4", "5"], "label": 0}']


def run_bad(tmp_path, capsys, task: str, rows=ROWS, extra=()) -> str:
    (tmp_path / "task.yaml").write_text(task)
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    code = main(["eval", "--task", str(tmp_path / "task.yaml"), "--model", str(MODEL), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    return err


def test_good_task_runs(tmp_path, capsys):
    (tmp_path / "task.yaml").write_text(GOOD)
    (tmp_path / "rows.jsonl").write_text("\n".join(ROWS) + "\n")
    assert main(["eval", "--task", str(tmp_path / "task.yaml"), "--model", str(MODEL), "--device", "cpu"]) == 0


def test_missing_field_names_file_and_line(tmp_path, capsys):
    err = run_bad(tmp_path, capsys, GOOD.replace("doc_to_choice: choices\n", ""))
    assert f"{tmp_path / 'task.yaml'}:1:" in err and "doc_to_choice" in err
    err = run_bad(tmp_path, capsys, GOOD.replace("  data_files: rows.jsonl\n", "  split: train\n"))
    assert f"{tmp_path / 'task.yaml'}:4:" in err and "data_files" in err


def test_unknown_metric(tmp_path, capsys):
    err = run_bad(tmp_path, capsys, GOOD.replace("metric: acc", "metric: accuracy"))
    assert f"{tmp_path / 'task.yaml'}:11:" in err and "unknown metric 'accuracy'" in err and "acc_norm" in err
    gen = GOOD.replace("multiple_choice", "generate_until").replace("doc_to_choice: choices\n", "")
    err = run_bad(tmp_path, capsys, gen.replace("metric: acc", "metric: bleu"))
    assert "unknown metric 'bleu' for a generate_until task" in err


def test_rows_missing_fields(tmp_path, capsys):
    rows = [ROWS[0], '{"q": "2 + 2 =", "choices": ["4", "5"]}']
    err = run_bad(tmp_path, capsys, GOOD, rows)
    assert f"{tmp_path / 'rows.jsonl'}:2:" in err and "'label'" in err and "doc_to_target" in err
    rows = [ROWS[0], '{"choices": ["4", "5"], "label": 1}']
    err = run_bad(tmp_path, capsys, GOOD, rows)
    assert f"{tmp_path / 'rows.jsonl'}:2:" in err and "'q'" in err and "doc_to_text" in err
    err = run_bad(tmp_path, capsys, GOOD.replace("doc_to_choice: choices", "doc_to_choice: options"))
    assert f"{tmp_path / 'task.yaml'}:8:" in err and "'options', which no row has" in err


def test_other_bad_input(tmp_path, capsys):
    assert "not valid JSON" in run_bad(tmp_path, capsys, GOOD, [ROWS[0], "{oops"])
    out_of_range = [ROWS[0].replace('"label": 0', '"label": 7')]
    assert "not an index of the 2 choices" in run_bad(tmp_path, capsys, GOOD, out_of_range)
    bad_yaml = GOOD.replace("dataset_path: json", "dataset_path: [json")
    assert "task.yaml:3: not valid YAML" in run_bad(tmp_path, capsys, bad_yaml)
    assert "unknown field 'doc_to_txt'" in run_bad(tmp_path, capsys, GOOD + "doc_to_txt: x\n")
    tagged = GOOD + "process_docs: !function utils.process\n"
    assert "task.yaml:12: the tag !function" in run_bad(tmp_path, capsys, tagged)
    assert "process_docs" in run_bad(tmp_path, capsys, GOOD + "process_docs: utils.process\n")
    assert "does not exist" in run_bad(tmp_path, capsys, GOOD.replace("rows.jsonl", "nowhere.jsonl"))
    checker = GOOD.replace("multiple_choice", "generate_until").replace("doc_to_choice: choices\n", "") \
        .replace("metric: acc", "metric: checker\n    function: no_such_module_here:check")
    assert "cannot import the checker's module" in run_bad(tmp_path, capsys, checker)
    assert "--limit must be at least 1" in run_bad(tmp_path, capsys, GOOD, extra=("--limit", "0"))


def test_program_hook(tmp_path, capsys, monkeypatch, lm):
    """--program: refused in one line where emergence.prompts is missing, and on a multiple-choice
    task; a program answers the rows of a generation task."""
    monkeypatch.setitem(sys.modules, "emergence.prompts", None)  # as if the module did not exist
    err = run_bad(tmp_path, capsys, GOOD, extra=("--program", str(tmp_path / "p.yaml")))
    assert "emergence.prompts" in err and "does not have" in err
    monkeypatch.delitem(sys.modules, "emergence.prompts")
    if importlib.util.find_spec("emergence.prompts") is None:
        return
    program = tmp_path / "p.yaml"
    program.write_text("inputs: [q]\nstages:\n  answer:\n    type: zero_shot\n    template: \"{q}\"\n")
    err = run_bad(tmp_path, capsys, GOOD, extra=("--program", str(program)))
    assert "--program answers generate_until tasks" in err
    program.write_text("inputs: [prompt]\ndefaults: {max_tokens: 24, temperature: 0, stop: [\".\"]}\n"
                       "stages:\n  answer:\n    type: template\n    template: \"{prompt}\"\n")
    monkeypatch.syspath_prepend(str(HERE))
    result = evaluate(lm, HERE / "story_gen_checked.yaml", program=program, limit=2)
    assert [item["prediction"].strip() for item in result.items] == ["Lily", "park"]
    assert result.metrics["exact_match"][0] == 1.0 and "trace" in result.items[0]


def test_load_task_limit_and_defaults(task_dir):
    task = load_task(task_dir / "story_gen.yaml", limit=2)
    assert len(task.rows) == 2 and task.until == ["."] and task.max_gen_toks == 24
    assert [m.name for m in task.metrics] == ["exact_match"]
    assert os.path.samefile(task.rows[0].file, task_dir / "story_gen.jsonl")
