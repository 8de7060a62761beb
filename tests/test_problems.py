"""Arithmetic word problems (emergence.problems): the seeded generator, the solution parser, the
step checker, reading problem files (ours and GSM8K's), and `emergence problems`."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest
from conftest import SHARED_DATA

from emergence.cli import main
from emergence.errors import InvalidArgument
from emergence.problems import (MAX_NUMBER, TEMPLATES, Grade, StepGrade, check_solution, difficulty_histogram,
                                extract_answer, generate_problem, generate_problems, grade_row, load_problems,
                                numbers_in, parse_solution, parse_steps_range, solution_text, write_problems)

GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"

# The survey's example, one leg longer.
QUESTION = ("A car drives 50 miles per hour for 3 hours. Then it drives 40 miles per hour for 2 more hours. "
            "How many miles does the car travel in all?")
RIGHT = "Step 1: 50 × 3 = 150\nStep 2: 40 × 2 = 80\nStep 3: 150 + 80 = 230\nAnswer: 230"


# ------------------------------------------------------------------------------- generator
def test_same_seed_same_rows_other_seed_other_rows():
    first = generate_problems(40, "1-8", seed=5)
    assert generate_problems(40, "1-8", seed=5) == first
    assert generate_problems(10, "1-8", seed=5) == first[:10]  # a larger n only appends rows
    other = generate_problems(40, "1-8", seed=6)
    assert [r["question"] for r in other] != [r["question"] for r in first]
    assert sum(a["question"] != b["question"] for a, b in zip(first, other)) >= 35
    assert len({r["question"] for r in first}) == 40  # no question twice


@pytest.mark.parametrize("template", sorted(TEMPLATES))
@pytest.mark.parametrize("steps", range(1, 9))
def test_every_generated_row_passes_the_checker(template, steps):
    rng = random.Random(f"test:{template}:{steps}")
    for _ in range(25):
        row = generate_problem(rng, steps, template)
        assert set(row) == {"question", "answer", "steps", "difficulty", "template"}
        assert row["difficulty"] == steps == len(row["steps"]) and row["template"] == template
        assert row["question"].endswith("?") and row["question"].count("?") == 1
        assert all(line.startswith(f"Step {k}: ") for k, line in enumerate(row["steps"], 1))
        parsed = parse_solution(solution_text(row))
        assert [s.number for s in parsed.steps] == list(range(1, steps + 1))
        for s in parsed.steps:  # integers in [1, 999], exact divisions
            assert s.op in ("+", "-", "×", "÷")
            assert all(isinstance(v, int) and 1 <= v <= MAX_NUMBER for v in (s.a, s.b, s.result))
        assert row["answer"] == parsed.steps[-1].result == parsed.answer
        grade = check_solution(row["question"], solution_text(row), row["answer"])
        assert [(g.number, g.arithmetic, g.operands) for g in grade.steps] == [(k, True, True) for k in
                                                                            range(1, steps + 1)]
        assert grade.steps_valid and grade.answer_correct and grade.correct
        # the first step only uses numbers of the question
        assert {parsed.steps[0].a, parsed.steps[0].b} <= set(numbers_in(row["question"]))


def test_templates_use_every_operator_and_difficulties_spread_evenly():
    rows = generate_problems(320, "1-8", seed=0)
    assert Counter(r["difficulty"] for r in rows) == {d: 40 for d in range(1, 9)}
    assert Counter(r["template"] for r in rows) == {t: 80 for t in TEMPLATES}
    assert {(r["template"], r["difficulty"]) for r in rows[:32]} == {(t, d) for t in TEMPLATES for d in range(1, 9)}
    for template in TEMPLATES:
        ops = Counter(s.op for r in rows if r["template"] == template for s in parse_solution(solution_text(r)).steps)
        assert set(ops) == {"+", "-", "×", "÷"}, (template, ops)
    assert Counter(r["difficulty"] for r in generate_problems(9, "2-4", seed=1)) == {2: 3, 3: 3, 4: 3}
    assert [r["template"] for r in generate_problems(4, 3, seed=1, templates=["totals"])] == ["totals"] * 4
    assert difficulty_histogram(generate_problems(5, "7-8")) == "7:3 8:2"


def test_a_generated_story_reads_like_the_survey():
    row = generate_problem(random.Random(0), 1, "rates")
    assert row["question"].startswith("A ") and " miles per hour for " in row["question"]
    assert row["question"].endswith("travel in all?")


def test_steps_range_parsing():
    assert parse_steps_range("3") == (3, 3)
    assert parse_steps_range(" 1 - 8 ") == (1, 8)
    assert parse_steps_range(8) == (8, 8)
    for bad, message in (("0", "within 1..8"), ("9", "within 1..8"), ("1-9", "within 1..8"),
                         ("5-2", "reversed"), ("three", "number or a range"), ("", "number or a range")):
        with pytest.raises(InvalidArgument, match=message):
            parse_steps_range(bad)
    with pytest.raises(InvalidArgument, match="at least 1"):
        generate_problems(0)
    with pytest.raises(InvalidArgument, match="unknown problem template 'poems'"):
        generate_problems(3, templates=["poems"])


# --------------------------------------------------------------------------------- checker
def test_the_right_solution_passes():
    grade = check_solution(QUESTION, RIGHT, 230)
    assert grade == Grade([StepGrade(1, "Step 1: 50 × 3 = 150", True, True),
                           StepGrade(2, "Step 2: 40 × 2 = 80", True, True),
                           StepGrade(3, "Step 3: 150 + 80 = 230", True, True)], 230, 230, True, True)
    assert grade.correct
    assert grade.to_json() == {"steps": [{"number": k, "arithmetic": True, "operands": True, "valid": True}
                                         for k in (1, 2, 3)],
                               "answer": 230, "expected": 230, "answer_correct": True, "steps_valid": True,
                               "correct": True}


def test_a_wrong_arithmetic_step_is_caught():
    # 40 × 2 is not 90; step 3 uses the (wrong) 90 of step 2 correctly: only step 2 is at fault
    text = "Step 1: 50 × 3 = 150\nStep 2: 40 × 2 = 90\nStep 3: 150 + 90 = 240\nAnswer: 240"
    grade = check_solution(QUESTION, text, 230)
    assert [(g.arithmetic, g.operands, g.valid) for g in grade.steps] == [(True, True, True), (False, True, False),
                                                                          (True, True, True)]
    assert (grade.answer, grade.answer_correct, grade.steps_valid, grade.correct) == (240, False, False, False)


def test_an_operand_not_from_the_question_is_caught():
    text = "Step 1: 50 × 3 = 150\nStep 2: 45 × 2 = 90\nStep 3: 150 + 90 = 240\nAnswer: 240"
    grade = check_solution(QUESTION, text, 230)
    assert [(g.arithmetic, g.operands, g.unknown_operands) for g in grade.steps] == [
        (True, True, ()), (True, False, (45,)), (True, True, ())]
    assert not grade.steps_valid
    # a result of a LATER step is not an earlier result either
    text = "Step 1: 150 + 80 = 230\nStep 2: 50 × 3 = 150\nAnswer: 230"
    grade = check_solution(QUESTION, text, 230)
    assert [(g.operands, g.unknown_operands) for g in grade.steps] == [(False, (150, 80)), (True, ())]
    assert (grade.answer_correct, grade.steps_valid, grade.correct) == (True, False, False)


def test_a_wrong_final_answer_is_caught():
    grade = check_solution(QUESTION, RIGHT.replace("Answer: 230", "Answer: 231"), 230)
    assert [g.valid for g in grade.steps] == [True, True, True]
    assert (grade.answer, grade.answer_correct, grade.steps_valid, grade.correct) == (231, False, True, False)


def test_division_and_lines_without_an_equation():
    question = "Ana has 24 cookies and shares them equally among 4 friends. How many does each get?"
    grade = check_solution(question, "Step 1: 24 ÷ 4 = 6\nAnswer: 6", 6)
    assert grade.correct
    grade = check_solution(question, "Step 1: 24 ÷ 5 = 4\nAnswer: 4", 6)  # not exact: wrong
    assert [(g.arithmetic, g.operands) for g in grade.steps] == [(False, False)]
    assert grade.steps[0].unknown_operands == (5,)
    grade = check_solution(question, "Step 1: 24 ÷ 0 = 0\nAnswer: 0", 6)  # no division by zero
    assert grade.steps[0].arithmetic is False
    # a step line without an equation is a wrong step; no steps at all is not "all steps valid"
    grade = check_solution(question, "Step 1: Identify the cookies: 24.\nStep 2: 24 ÷ 4 = 6\nAnswer: 6", 6)
    assert [(g.arithmetic, g.operands) for g in grade.steps] == [(False, False), (True, True)]
    assert (grade.answer_correct, grade.steps_valid) == (True, False)
    grade = check_solution(question, "Answer: 6", 6)
    assert (grade.steps, grade.answer_correct, grade.steps_valid, grade.correct) == ([], True, False, False)


@pytest.mark.parametrize("text", [
    "Step 1: 50 × 3 = 150\nStep 2: 40 × 2 = 80\nStep 3: 150 + 80 = 230\nAnswer: 230",
    "  step 1:50x3=150\nStep 2 : 40 * 2 = 80\n\tStep 3:   150+80   =   230 \nanswer:230",
    "Step 1: 50 X 3 = 150 miles\nStep 2: 40 × 2 = 80 miles.\nStep 3: Add the legs: 150 + 80 = 230 miles.\n"
    "Answer: 230 miles.",
])
def test_parsing_tolerates_spacing_and_operator_spellings(text):
    parsed = parse_solution(text)
    assert [(s.number, s.a, s.op, s.b, s.result) for s in parsed.steps] == [
        (1, 50, "×", 3, 150), (2, 40, "×", 2, 80), (3, 150, "+", 80, 230)]
    assert parsed.answer == 230
    assert check_solution(QUESTION, text, 230).correct


def test_operator_spellings():
    ops = [s.op for s in parse_solution("Step 1: 9 - 3 = 6\nStep 2: 9 − 3 = 6\nStep 3: 9 – 3 = 6\n"
                                        "Step 4: 8 / 2 = 4\nStep 5: 8 ÷ 2 = 4\nStep 6: 8 * 2 = 16\n"
                                        "Step 7: 8 x 2 = 16\nStep 8: 8 × 2 = 16\nStep 9: 1,200 + 5 = 1,205").steps]
    assert ops == ["-", "-", "-", "÷", "÷", "×", "×", "×", "+"]
    last = parse_solution("Step 9: 1,200 + 5 = 1,205").steps[0]
    assert (last.a, last.b, last.result) == (1200, 5, 1205)
    neg = parse_solution("Step 1: 3 - 5 = -2\nStep 2: -2 + 4 = 2").steps
    assert [(s.a, s.op, s.b, s.result) for s in neg] == [(3, "-", 5, -2), (-2, "+", 4, 2)]
    # the survey's own model output: steps 1 and 2 hold no equation, step 3 does
    survey = ("Step 1: Identify the speed: 50 miles per hour.\nStep 2: Identify the time: 3 hours.\n"
              "Step 3: Multiply speed by time: 50 × 3 = 150 miles.\nAnswer: 150 miles.")
    steps = parse_solution(survey).steps
    assert [(s.a, s.op, s.b, s.result) for s in steps] == [(None,) * 4, (None,) * 4, (50, "×", 3, 150)]


def test_extract_answer_order():
    assert extract_answer("Answer: 12\n#### 13\nthen 14") == 12  # 1. the first "Answer: N"
    assert extract_answer("Answer: 7\nQ: next one\nAnswer: 9") == 7
    assert extract_answer("so 5 + 8 = 13\n#### 1,234\nmore 99") == 1234  # 2. GSM8K "#### N"
    assert extract_answer("5 + 8 = 13 apples, then 21.") == 21  # 3. the last number
    assert extract_answer("no digits here") is None
    assert extract_answer("answer: $1,200.") == 1200
    assert extract_answer("Answer: -3") == -3
    assert extract_answer("#### 2.5") == 2.5
    assert extract_answer("Answer: 4.0") == 4 and isinstance(extract_answer("Answer: 4.0"), int)
    # fallback case: no Answer line, the last step's result is the last number
    assert check_solution(QUESTION, RIGHT.replace("\nAnswer: 230", ""), 230).correct


def test_numbers_in_question():
    assert numbers_in("Josh buys a house for $80,000 and puts in $50,000. It is -14 degrees, 3.5 hours, "
                      "in 2024.") == [80000, 50000, -14, 3.5, 2024]
    assert numbers_in("three apples and half a pie") == []


# ----------------------------------------------------------------------------------- files
def test_generated_rows_round_trip(tmp_path):
    rows = generate_problems(12, "1-4", seed=2)
    path = tmp_path / "p.jsonl"
    assert write_problems(rows, path) == 12
    assert "×" in path.read_text(encoding="utf-8") or "÷" in path.read_text(encoding="utf-8")
    loaded = load_problems(path)
    assert [{k: r[k] for k in ("question", "answer", "steps", "difficulty", "template")} for r in loaded] == rows
    assert [r["source"] for r in loaded] == [f"{path}:{i}" for i in range(1, 13)]
    assert all(grade_row(r, solution_text(r)).correct for r in loaded)


def test_gsm8k_rows_are_read_with_their_final_answer():
    rows = load_problems(GSM8K_TEST)
    assert len(rows) == 1319
    first = rows[0]
    assert first["question"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert (first["answer"], first["steps"], first["difficulty"]) == (18, [], None)
    assert first["reasoning"].endswith("#### 18") and first["source"] == f"{GSM8K_TEST}:1"
    assert rows[2]["answer"] == 70000  # "#### 70000" (the house flip)
    assert rows[146]["answer"] == 2125  # "#### 2,125"
    assert all(isinstance(r["answer"], int) for r in rows)
    # scored on the final answer: GSM8K's own reasoning has the right answer
    grade = grade_row(first, first["reasoning"])
    assert (grade.answer, grade.answer_correct) == (18, True)
    assert grade_row(first, "She makes 9 * 2 = 20 dollars.").answer_correct is False


def test_user_rows_in_either_shape(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "What is 2 + 3?", "answer": 5}\n\n'
                    '{"question": "What is 1,000 + 200?", "answer": "1,200", "difficulty": 1}\n'
                    '{"question": "Q?", "answer": "Think.\\n#### -7"}\n', encoding="utf-8")
    rows = load_problems(path)
    assert [(r["answer"], r["difficulty"], r["source"]) for r in rows] == [
        (5, None, f"{path}:1"), (1200, 1, f"{path}:3"), (-7, None, f"{path}:4")]


@pytest.mark.parametrize("content, message", [
    ('{"question": "a?", "answer": 1}\n{"question": "b?", "answer": 2\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"question": "a?", "answer": 1}\n{"answer": 2}\n', r"bad\.jsonl:2: missing 'question'"),
    ('{"question": "a?"}\n', r"bad\.jsonl:1: missing 'answer'"),
    ('{"question": "a?", "answer": "many"}\n', r"bad\.jsonl:1: 'answer' must be a number"),
    ('{"question": "a?", "answer": "it is\\n#### lots"}\n', r"bad\.jsonl:1: 'answer' must be a number"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected a JSON object, got list"),
    ('{"question": "a?", "answer": 1, "steps": "Step 1: 1 + 0 = 1"}\n', r"bad\.jsonl:1: 'steps' must be a list"),
    ('{"question": "a?", "answer": 1, "difficulty": "hard"}\n', r"bad\.jsonl:1: 'difficulty' must be an integer"),
    ('\n\n', r"bad\.jsonl is empty: no rows"),
])
def test_bad_problem_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidArgument, match=message) as info:
        load_problems(path)
    assert "\n" not in str(info.value)


def test_a_missing_problem_file():
    with pytest.raises(InvalidArgument, match="data file not found: /nonexistent/p.jsonl"):
        load_problems("/nonexistent/p.jsonl")


# ------------------------------------------------------------------------------------- CLI
def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_refuses_to_overwrite_and_forces(tmp_path, capsys):
    out_file = tmp_path / "sub" / "p.jsonl"
    code, out, err = run_main(capsys, "problems", "--steps", "1-8", "--n", "20", "--seed", "4", "--out", str(out_file))
    assert (code, err) == (0, "")
    assert out == (f"wrote 20 problems to {out_file} (seed 4); rows per difficulty: "
                   f"1:3 2:3 3:3 4:3 5:2 6:2 7:2 8:2\n")
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert rows == generate_problems(20, "1-8", seed=4)
    before = out_file.read_bytes()
    code, out, err = run_main(capsys, "problems", "--steps", "3", "--n", "5", "--out", str(out_file))
    assert code == 1 and out == ""
    assert err == f"emergence: error: {out_file} exists: writing there would replace {out_file}; --force replaces it\n"
    assert out_file.read_bytes() == before
    code, out, err = run_main(capsys, "problems", "--steps", "3", "--n", "5", "--out", str(out_file), "--force")
    assert code == 0 and out.endswith("rows per difficulty: 3:5\n")
    assert [json.loads(line)["difficulty"] for line in out_file.read_text(encoding="utf-8").splitlines()] == [3] * 5


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be within 1..8, got 0"),
    (["--steps", "9"], "--steps must be within 1..8, got 9"),
    (["--steps", "2-12"], "--steps must be within 1..8, got 2-12"),
    (["--steps", "x"], "--steps takes a number or a range such as 1-8, got 'x'"),
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--n", "-3"], "--n must be at least 1, got -3"),
    (["--n", "many"], "argument --n: invalid int value: 'many'"),
    (["--template", "poems"], "argument --template: invalid choice: 'poems'"),
])
def test_cli_bad_arguments_one_line(tmp_path, capsys, args, message):
    out_file = tmp_path / "p.jsonl"
    code, out, err = run_main(capsys, "problems", "--out", str(out_file), *args)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("emergence: error: ") and message in err
    assert not out_file.exists()


def test_cli_in_a_subprocess(tmp_path):
    """`python -m emergence problems`: the same rows in another process (seeds do not depend on
    the interpreter's hash seed)."""
    out_file = tmp_path / "p.jsonl"
    done = subprocess.run([sys.executable, "-m", "emergence", "problems", "--steps", "2-3", "--n", "6", "--seed", "9",
                           "--template", "sharing", "--out", str(out_file)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote 6 problems to {out_file} (seed 9); rows per difficulty: 2:3 3:3\n"
    assert load_problems(out_file)[0]["template"] == "sharing"
    assert [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()] == \
        generate_problems(6, "2-3", seed=9, templates=["sharing"])


def test_cli_needs_out(capsys):
    code, out, err = run_main(capsys, "problems", "--n", "3")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "the following arguments are required: --out" in err
