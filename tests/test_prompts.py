"""Prompt programs (emergence.prompts): rendering, example selection, answer extraction,
majority votes, the DAG, the YAML files' bad input (one line, with the file's line), the HTTP
backend against emergence's own server, the CLI, and every shipped example program.

Expected values are written out or computed here independently (the prompts spelled out, the
seeded draws by `random`, the nearest examples by a brute-force cosine over the model's hidden
states), never taken from the code under test."""

from __future__ import annotations

import json
import random
import re
import socket
from pathlib import Path

import pytest
import torch

import emergence
from emergence.cli import main
from emergence.errors import InvalidArgument
from emergence.prompts import (CoT, FewShot, FewShotCoT, HTTPBackend, LocalBackend, Program, PromptError, Reframe,
                               SelfConsistency, Template, ZeroShot, extract, load_program, loads_program, majority,
                               render, variables)
from emergence.serve.app import Server, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "prompts").glob("*.yaml"))
MODEL = "emergence-6m"


@pytest.fixture(scope="module")
def lm():
    return emergence.load(MODEL)


@pytest.fixture(scope="module")
def local(lm):
    return LocalBackend(lm)


class Scripted:
    """A backend that answers from a list (cycled), recording every call."""

    def __init__(self, *outputs: str, vectors: dict[str, list[float]] | None = None) -> None:
        self.outputs, self.calls, self.vectors, self.i = list(outputs) or ["ok"], [], vectors or {}, 0

    def complete(self, prompt, n=1, temperature=0.0, max_tokens=128, stop=(), seed=None):
        self.calls.append({"prompt": prompt, "n": n, "temperature": temperature, "max_tokens": max_tokens,
                           "stop": tuple(stop), "seed": seed})
        out = []
        for _ in range(n):
            out.append((self.outputs[self.i % len(self.outputs)], len(prompt.split()), 3))
            self.i += 1
        return out

    def embed(self, texts):
        return [self.vectors[t] for t in texts]


# ---------------------------------------------------------------------------- rendering
def test_render_and_variables():
    assert render("Q: {q}\nA: {{literal}} {s.answer}", {"q": "2 + 2", "s": _value("x", "4")}) == \
        "Q: 2 + 2\nA: {literal} 4"
    assert variables("a {x} {{no}} {y.answer}\n{z!r}") == [("x", None, 2), ("y", "answer", 13), ("z", None, 24)]
    with pytest.raises(ValueError, match="Single '}'"):
        variables("oops }")


def _value(text, answer):
    from emergence.prompts import Value

    return Value(text, answer)


def test_stage_prompts_are_spelled_out():
    env = {"input": "Is 7 prime?", "task": "unused"}
    backend = Scripted(" Answer: yes")
    p = Program([ZeroShot(name="z", instruction="Answer the question.", template="Q: {input}")])
    assert p.run(backend, env)["z"].prompt == "Answer the question.\n\nQ: Is 7 prime?"
    p = Program([CoT(name="c", template="Q: {input}")])
    t = p.run(backend, env)
    assert t["c"].prompt == "Q: Is 7 prime?\nLet's break it into steps."
    assert t["c"].answer == "yes" and t.output == "Answer: yes"
    p = Program([Template(name="t", template="{input} -> {{json}}")])
    assert p.run(backend, env)["t"].prompt == "Is 7 prime? -> {json}"
    shots = [{"question": "1 + 1?", "steps": ["Step 1: add: 1 + 1 = 2."], "answer": "2."},
             {"question": "2 × 3?", "steps": ["Step 1: multiply.", "Step 2: 2 × 3 = 6."], "answer": "6."}]
    p = Program([FewShotCoT(name="f", examples=shots, example_template="Example {index}:\nQ: {question}\nA:\n"
                            "{steps}\nAnswer: {answer}", template="Q: {input}\nA:")])
    t = p.run(Scripted("Step 1: it is.\nAnswer: yes.\nQ: next"), env)
    assert t["f"].prompt == ("Example 1:\nQ: 1 + 1?\nA:\nStep 1: add: 1 + 1 = 2.\nAnswer: 2.\n\n"
                             "Example 2:\nQ: 2 × 3?\nA:\nStep 1: multiply.\nStep 2: 2 × 3 = 6.\nAnswer: 6.\n\n"
                             "Q: Is 7 prime?\nA:")
    assert t["f"].answer == "yes." and t["f"].examples == [0, 1]


def test_reframe_fixed_and_by_the_model():
    article = {"article": "Bees make honey."}
    fixed = Reframe(name="r", task="Summarize this article in one sentence.",
                    rewrite="Imagine you are summarizing this article for a 5th grader. {task}",
                    template="{task}\nArticle: {article}\nSummary:")
    backend = Scripted(" Bees are busy.")
    t = Program([fixed]).run(backend, article)
    assert t["r"].reframed == ("Imagine you are summarizing this article for a 5th grader. "
                               "Summarize this article in one sentence.")
    assert backend.calls[0]["prompt"] == t["r"].prompt == t["r"].reframed + "\nArticle: Bees make honey.\nSummary:"
    by_model = Reframe(name="r", task="Summarize this article in one sentence.",
                       rewrite_prompt="Rewrite for a child: {task}\nRewritten:", template="{task}\n{article}")
    backend = Scripted(" Tell me in one easy sentence. ", " Bees work.")
    t = Program([by_model]).run(backend, article)
    assert [c["prompt"] for c in backend.calls] == [
        "Rewrite for a child: Summarize this article in one sentence.\nRewritten:",
        "Tell me in one easy sentence.\nBees make honey."]
    assert t["r"].reframed == "Tell me in one easy sentence." and t.output == "Bees work."
    assert len(t["r"].calls) == 2 and t["r"].completion_tokens == 6
    assert "-- rewrite prompt:\n   | Rewrite for a child: Summarize" in t.format()


# ---------------------------------------------------------------------------- few-shot selection
SHOTS = [{"input": text, "output": label} for text, label in [
    ("The dog was happy in the sun.", "positive"), ("Tom cried when his toy broke.", "negative"),
    ("Mom baked a cake and we laughed.", "positive"), ("The storm scared the little cat.", "negative"),
    ("Lily found a shiny red ball.", "positive"), ("Ben lost his kite in a tree.", "negative")]]


def test_fixed_and_seeded_random_selection():
    backend = Scripted()
    fixed = Program([FewShot(name="f", examples=SHOTS, k=2)]).run(backend, {"input": "x"})
    assert fixed["f"].examples == [0, 1]
    assert fixed["f"].prompt == ("Input: The dog was happy in the sun.\nOutput: positive\n\n"
                                 "Input: Tom cried when his toy broke.\nOutput: negative\n\nInput: x\nOutput:")
    drawn = Program([FewShot(name="f", examples=SHOTS, k=3, select="random", seed=3)])
    first, again = (drawn.run(backend, {"input": "x"})["f"].examples for _ in range(2))
    assert first == again == random.Random(3).sample(range(6), 3)
    # no stage seed: the program's (--seed), else 0
    unseeded = Program([FewShot(name="f", examples=SHOTS, k=3, select="random")])
    assert unseeded.run(backend, {"input": "x"})["f"].examples == random.Random(0).sample(range(6), 3)
    assert unseeded.run(backend, {"input": "x"}, seed=11)["f"].examples == random.Random(11).sample(range(6), 3)


def test_nearest_selection_matches_a_brute_force_cosine(lm, local):
    query = "The puppy was so glad to run in the warm sun."

    def vector(text):  # the mean of the final hidden states over the text's tokens
        with torch.no_grad():
            return lm.model.hidden_states(torch.tensor([lm.tokenizer.encode(text)]))[0].float().mean(dim=0)

    table = torch.stack([vector(s["input"]) for s in SHOTS])
    cos = torch.nn.functional.cosine_similarity(table, vector(query)[None], dim=-1)
    expected = sorted(range(len(SHOTS)), key=lambda i: -float(cos[i]))[:3]
    stage = FewShot(name="f", examples=SHOTS, k=3, select="nearest", match="{input}",
                    template="Input: {input}\nOutput:", max_tokens=1)
    t = Program([stage]).run(local, {"input": query})
    assert t["f"].examples == expected
    assert t["f"].prompt.startswith(f"Input: {SHOTS[expected[0]]['input']}\nOutput: {SHOTS[expected[0]]['output']}")
    # ties go to the earlier example; a backend without embeddings says so
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 0.0], "q": [2.0, 0.0]}
    tied = FewShot(name="f", examples=[{"input": k, "output": "-"} for k in "abc"], k=2, select="nearest")
    assert Program([tied]).run(Scripted(vectors=vectors), {"input": "q"})["f"].examples == [0, 2]

    class NoEmbeddings:
        complete = Scripted().complete

    with pytest.raises(PromptError, match=r"^stage 'f': select: nearest needs embeddings, which this backend "
                                          r"does not offer$"):
        Program([tied]).run(NoEmbeddings(), {"input": "q"})


# ---------------------------------------------------------------------------- answers and votes
def test_answer_extraction_patterns():
    text = "Step 1: 50 × 3 = 150 miles.\nAnswer: 150 miles.\nQ: next\nAnswer: 7"
    assert extract(r"Answer:\s*(.+)", text) == "150 miles."  # the first match, group 1
    assert extract(r"Answer:\s*(?P<answer>\d+)(?P<unit> miles)", text) == "150"
    assert extract(r"\d+ miles", text) == "150 miles"  # no group: the match
    assert extract(r"Answer:\s*([0-9]+)", "no answer here") is None
    assert extract(None, "  whole text \n") == "whole text"


def test_majority_vote_and_ties():
    assert majority(["120", "150", "150", "120"]) == ("120", {"120": 2, "150": 2})  # a tie: the first seen
    assert majority(["A", None, "b", "B."]) == ("b", {"A": 1, "b": 2})  # case and final period aside
    assert majority([None, None]) == (None, {})
    backend = Scripted("Answer: 150", "Answer: 120", "nothing", "Answer: 120.", "Answer: 150")
    sc = SelfConsistency(name="v", stage=CoT(template="{q}"), k=5, seed=4)
    t = Program([sc]).run(backend, {"q": "50 × 3?"})
    assert backend.calls == [{"prompt": "50 × 3?\nLet's break it into steps.", "n": 5, "temperature": 0.7,
                              "max_tokens": 128, "stop": (), "seed": 4}]
    assert t["v"].votes == {"150": 2, "120": 2} and t["v"].answer == "150" and t.output == "150"
    assert [s["answer"] for s in t["v"].samples] == ["150", "120", None, "120.", "150"]
    assert t["v"].completion_tokens == 15


# ---------------------------------------------------------------------------- the DAG
def test_stages_run_in_dependency_order_and_feed_each_other():
    backend = Scripted(" one ", " two", " three")
    p = Program([Template(name="c", template="c sees {a} and {b.answer}"),
                 CoT(name="b", template="b sees {a}", pattern=r"(\w+)"),
                 Template(name="a", template="a sees {x}"),
                 Template(name="d", template="d sees {x}")], inputs=["x"])
    assert [s.name for s in p.order] == ["a", "b", "c", "d"]  # dependencies first, then file order
    t = p.run(backend, {"x": "X"})
    assert [c["prompt"] for c in backend.calls] == ["a sees X", "b sees one\nLet's break it into steps.",
                                                    "c sees one and two", "d sees X"]
    assert t.output_stage == "d" and [s.name for s in t.stages] == ["a", "b", "c", "d"]
    with pytest.raises(PromptError, match=r"^the stages form a cycle: a -> b -> c -> a$"):
        Program([Template(name="a", template="{c}"), Template(name="b", template="{a}"),
                 Template(name="c", template="{b}")])


# ---------------------------------------------------------------------------- bad input
def write(tmp_path, text: str) -> str:
    path = tmp_path / "program.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


TYPES = "template, zero_shot, few_shot, cot, few_shot_cot, reframe, self_consistency"


def test_unknown_stage_type_is_named_with_its_line(tmp_path, capsys):
    path = write(tmp_path, "inputs: [text]\nstages:\n  label:\n    type: few-shot\n    template: '{text}'\n")
    message = f"{path}:4: stage 'label' has unknown type 'few-shot' (types: {TYPES})"
    with pytest.raises(PromptError) as e:
        load_program(path)
    assert str(e.value) == message
    assert main(["prompt", "run", path]) == 1
    assert capsys.readouterr().err == f"emergence: error: {message}\n"


def test_a_cycle_is_named_with_its_line(tmp_path, capsys):
    path = write(tmp_path, "\n".join([
        "inputs: [article]",
        "stages:",
        "  summary:",
        "    type: template",
        "    template: |",
        "      Article: {article}",
        "      Notes so far: {check}",       # line 7: summary reads check
        "  expand:",
        "    type: template",
        "    template: 'Expand {summary}'",
        "  check:",
        "    type: zero_shot",
        "    template: 'Check {expand}'", ""]))
    with pytest.raises(PromptError) as e:
        load_program(path)
    assert str(e.value) == f"{path}:7: the stages form a cycle: summary -> expand -> check -> summary"
    assert main(["prompt", "run", path]) == 1
    assert capsys.readouterr().err == f"emergence: error: {e.value}\n"


def test_a_missing_variable_is_named_with_its_line(tmp_path, capsys):
    path = write(tmp_path, "\n".join([
        "inputs:",
        "  article: A short article.",
        "stages:",
        "  bullets:",
        "    type: zero_shot",
        "    template: '{article}'",
        "  expand:",
        "    type: template",
        "    template: |",
        "      Here are the bullets:",
        "      {bulets}",                     # line 11
        "      Expand the second one.", ""]))
    message = (f"{path}:11: stage 'expand' uses {{bulets}}, which is neither a program input (article) nor a stage "
               "(bullets, expand)")
    with pytest.raises(PromptError) as e:
        load_program(path)
    assert str(e.value) == message
    assert main(["prompt", "run", path]) == 1
    assert capsys.readouterr().err == f"emergence: error: {message}\n"


@pytest.mark.parametrize("text, message", [
    ("stages:\n  a:\n    type: template\n    template: 'x'\n    tempelate: 'y'\n",
     "5: stage 'a' (template) has no setting 'tempelate' (it takes: fields, max_tokens, pattern, seed, stop, "
     "temperature, template)"),
    ("stages:\n  a:\n    type: template\n", "2: stage 'a' (template) needs template"),
    ("stages:\n  a:\n    template: x\n", f"2: stage 'a' has no type (types: {TYPES})"),
    ("stages:\n  a:\n    type: template\n    template: 'x'\n  a:\n    type: template\n    template: 'y'\n",
     "5: stages: 'a' is given twice (first on line 2)"),
    ("stages:\n  a:\n    type: template\n    template: '{b.answr}'\n  b:\n    type: template\n    template: 'b'\n",
     "4: stage 'a' uses {b.answr}, but stage 'b' has no field 'answr' (it has: answer, output)"),
    ("stages:\n  a:\n    type: cot\n    pattern: 'Answer: ('\n",
     "4: stage 'a': bad regex in pattern: missing ), unterminated subpattern at position 8"),
    ("stages: [a, b\n", "2: not valid YAML: expected ',' or ']', but got '<stream end>'"),
    ("stages:\n  a:\n    type: template\n    template: 'x }'\n",
     "4: stage 'a': bad template in template: Single '}' encountered in format string"),
    ("stages:\n  v:\n    type: self_consistency\n    k: 0\n    of: {type: cot}\n",
     "4: stage 'v': k must be a positive integer, got 0"),
])
def test_other_bad_programs_are_one_line_each(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(PromptError) as e:
        load_program(path)
    assert str(e.value) == f"{path}:{message}"


def test_inputs_at_run_time():
    p = loads_program("inputs: {a: null, b: B}\nstages:\n  s:\n    type: template\n    template: '{a}{b}'\n",
                      "p.yaml")
    with pytest.raises(PromptError, match=r"^p.yaml:5: stage 's' needs input 'a': give --input a=\.\.\.$"):
        p.run(Scripted(), {})
    with pytest.raises(PromptError, match=r"^unknown input 'c'; the program takes: a, b$"):
        p.run(Scripted(), {"a": "1", "c": "2"})
    assert p.run(Scripted(), {"a": "A"})["s"].prompt == "AB"


# ---------------------------------------------------------------------------- backends
@pytest.fixture(scope="module")
def served(lm):
    app = Server(lm, MODEL, slots=4)
    server, _ = serve_in_thread(app)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    app.close()


def _essentials(trace):
    return [(s.prompt, s.output, s.answer, s.examples, s.votes, s.prompt_tokens, s.completion_tokens,
             [(x["text"], x["completion_tokens"]) for x in s.samples or []]) for s in trace.stages]


def test_http_backend_gives_the_local_backend_s_output(served, local, lm):
    program = Program([
        FewShot(name="label", examples=SHOTS, k=2, select="nearest", match="{input}", max_tokens=6),
        SelfConsistency(name="vote", stage=Template(name="vote", template="{input} Then {label}"), k=3,
                        temperature=0.9, seed=5, max_tokens=5),
        Template(name="end", template="{vote}", max_tokens=4)], inputs=["input"])
    inputs = {"input": "The dog ran happily in the sun."}
    here = program.run(local, inputs)
    there = program.run(HTTPBackend(served + "/v1"), inputs)  # the model: the first the server lists
    assert _essentials(there) == _essentials(here)
    assert here["label"].prompt_tokens == len(lm.tokenizer.encode(here["label"].prompt))
    assert len({s["text"] for s in here["vote"].samples}) > 1  # seed, seed + 1, seed + 2: different samples


def test_http_backend_errors_are_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PromptError, match=rf"^stage 't': cannot reach http://127.0.0.1:{port}/v1/completions: "
                                          r".*[Cc]onnection refused"):
        Program([Template(name="t", template="x")]).run(HTTPBackend(f"http://127.0.0.1:{port}", "m"))
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(InvalidArgument, match=rf"^{url}/v1/models did not answer within 0.5 s$"):
            HTTPBackend(url, timeout=0.5).model_name()


# ---------------------------------------------------------------------------- the CLI and the examples
def test_cli_json_trace(capsys, tmp_path):
    row = tmp_path / "row.json"
    row.write_text(json.dumps({"question": "A boat sails 10 miles per hour for 2 hours. How far did it go?"}))
    code = main(["prompt", "run", str(ROOT / "examples/prompts/few_shot_cot_travel.yaml"), "--model", MODEL,
                 "--input-file", str(row), "--max-tokens", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    trace = json.loads(out)
    assert trace["program"] == "few-shot-cot" and trace["output_stage"] == "solve"
    assert trace["inputs"] == {"question": "A boat sails 10 miles per hour for 2 hours. How far did it go?"}
    (stage,) = trace["stages"]
    assert stage["name"] == "solve" and stage["type"] == "few_shot_cot" and stage["examples"] == [0, 1]
    assert stage["prompt"].endswith("\n\nQ: A boat sails 10 miles per hour for 2 hours. How far did it go?\nA:")
    assert 1 <= stage["completion_tokens"] <= 5 and stage["prompt_tokens"] > 100 and stage["seconds"] > 0
    assert set(stage) >= {"output", "answer", "pattern", "calls"} and trace["output"] == stage["output"].strip()
    assert main(["prompt", "run", str(ROOT / "examples/prompts/zero_shot.yaml"), "--input", "nope"]) == 1
    assert capsys.readouterr().err == "emergence: error: --input takes KEY=VALUE, got 'nope'\n"


def test_cli_against_a_server_prints_the_local_trace(capsys, served):
    program = str(ROOT / "examples/prompts/cascade_summarise_expand.yaml")
    runs = []
    for where in (["--model", MODEL], ["--base-url", served]):
        assert main(["prompt", "run", program, *where, "--max-tokens", "3", "--input", "article=Bees make honey."]) == 0
        runs.append(capsys.readouterr().out)
    strip = [re.sub(r"[0-9.]+ s\b", "T s", r) for r in runs]  # wall times differ
    assert strip[0] == strip[1]
    assert "== stage 1/2: bullets (zero_shot)" in runs[0] and "Article: Bees make honey." in runs[0]
    assert "== stage 2/2: expand (template)" in runs[0] and "== output (expand):" in runs[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_program_runs(path, local, lm):
    program = load_program(path)
    trace = program.run(local, max_tokens=4)
    assert [s.name for s in trace.stages] == [s.name for s in program.order]
    for stage in trace.stages:
        assert stage.prompt and stage.seconds > 0 and stage.calls
        for c in stage.calls:
            assert c.prompt_tokens == len(lm.tokenizer.encode(c.prompt))
            assert 0 <= c.completion_tokens <= 4 * len(c.outputs)
        assert stage.prompt_tokens == sum(c.prompt_tokens for c in stage.calls)
    last = trace[trace.output_stage]
    assert trace.output == ((last.answer or "") if last.samples is not None else last.output.strip())
    text = trace.format()
    assert text.count("== stage ") == len(trace.stages) and f"== output ({trace.output_stage}):" in text


def test_the_examples_are_the_survey_s():
    names = {p.stem for p in EXAMPLES}
    assert {"zero_shot", "few_shot_sentiment", "financial_summary", "cot_photosynthesis", "few_shot_cot_travel",
            "reframe_summary", "cascade_summarise_expand", "self_consistency_arithmetic"} <= names
    text = (ROOT / "examples/prompts/financial_summary.yaml").read_text()
    assert "BlueTech Inc. published its financial statement for Q1 on May 3, 2023" in text
    car = load_program(ROOT / "examples/prompts/few_shot_cot_travel.yaml")
    assert car.inputs == {"question": "A car drives 50 miles per hour for 3 hours. How far did it travel?"}


def test_examples_from_a_file_beside_the_program(tmp_path):
    rows = [{"input": "2 + 2", "output": "4"}, {"input": "3 + 3", "output": "6"}]
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write(tmp_path, "inputs: [input]\nstages:\n  add:\n    type: few_shot\n    examples_file: shots.jsonl\n"
                           "    k: 1\n    select: random\n    seed: 1\n    example_template: '{input} = {output}'\n"
                           "    template: '{input} ='\n    separator: '; '\n")
    t = load_program(path).run(Scripted(" 10"), {"input": "5 + 5"})
    chosen = random.Random(1).sample(range(2), 1)[0]
    assert t["add"].prompt == f"{rows[chosen]['input']} = {rows[chosen]['output']}; 5 + 5 ="
    assert t.output == "10"
    (tmp_path / "shots.jsonl").write_text('{"input": "2 + 2"}\n')
    with pytest.raises(PromptError) as e:
        load_program(path)
    assert str(e.value) == f"{path}:5: stage 'add': example 1 has no 'output', which example_template uses"
