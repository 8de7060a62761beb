"""Structured output (emergence.structured): decoding constrained to a JSON Schema, a regex or a
Lark grammar, on the shipped stories260K (SentencePiece-style vocabulary) and emergence-6m
(byte-level BPE).

Every output is checked by a judge that is not the engine: `jsonschema` for schemas, Python's
`re` for regexes, the equivalent regex for the grammar. Rows with different constraints, and
rows with none, share one decode batch and one server batch.
"""

from __future__ import annotations

import decimal
import json
import re
import threading

import jsonschema
import llguidance
import pytest

import emergence
from emergence.errors import InvalidArgument
from emergence.generate import generate
from emergence.sampling import SamplingParams
from emergence.serve.app import Server, serve_in_thread
from emergence.structured import compile_constraint, json_schema, regex, token_bytes
from emergence.tokenizer import Tokenizer
from conftest import SHARED_DATA

# The extraction task: a company, a date and a revenue in cents. Bounded (string lengths, a
# date, 12 digits and 2 decimals) so that every output of a tiny model can end within budget.
# The date is a pattern of days every month has: "format": "date" lets the engine write year
# 0000, which RFC 3339 allows and Python's date (jsonschema's judge) does not.
EXTRACTION = """{
  "type": "object",
  "properties": {
    "company": {"type": "string", "minLength": 1, "maxLength": 24},
    "date": {"type": "string", "pattern": "^(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])$"},
    "total_revenue": {"type": "number", "minimum": 0, "maximum": 1e12, "multipleOf": 0.01}
  },
  "required": ["company", "date", "total_revenue"],
  "additionalProperties": false
}"""
COMPANIES = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Soylent"]


def validator(schema_text: str) -> jsonschema.Validator:
    """A judge for one schema; numbers are read as decimals (multipleOf 0.01 is exact)."""
    schema = json.loads(schema_text, parse_float=decimal.Decimal)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def check_json(text: str, judge: jsonschema.Validator) -> None:
    value = json.loads(text, parse_float=decimal.Decimal)
    errors = [e.message for e in judge.iter_errors(value)]
    assert not errors, (text, errors)


@pytest.fixture(scope="module")
def stories():
    return emergence.load("stories260K")


@pytest.fixture(scope="module")
def bpe():
    return emergence.load("emergence-6m")


# ------------------------------------------------------------------------ the token table
@pytest.mark.parametrize("name", ["stories260K", "emergence-6m", "gpt2"])
def test_token_table_gives_each_tokens_bytes(name):
    """Each id's bytes: a text's ids concatenate to its bytes (SentencePiece adds the leading
    space it writes as "▁"), and the table equals llguidance's own reading of the tokenizer
    file, except the lone 0xFF byte token that llguidance's table cannot hold."""
    tokenizer = (Tokenizer.load(SHARED_DATA / "gpt2_tokenizer") if name == "gpt2"
                 else emergence.load(name).tokenizer)
    table, special = token_bytes(tokenizer)
    assert len(table) == tokenizer.vocab_size and tokenizer.eos_id in special
    text = 'Tom said: "{\\"n\\": 42}" — ça va? 日本\n\tend'
    ids = tokenizer.encode(text, add_bos=False)
    joined = b"".join(table[i] for i in ids)
    assert joined == (b" " if name == "stories260K" else b"") + text.encode()
    own = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size)
    differ = [i for i in range(tokenizer.vocab_size) if i not in special and own.decode_bytes([i]) != table[i]]
    assert [bytes(own.decode_bytes([i])) for i in differ] == [b""] * len(differ) and len(differ) <= 1
    assert all(table[i] == b"" for i in special)


# ---------------------------------------------------------------------- the Python API
def test_extraction_schema_200_prompts_batched_all_valid(stories):
    """200 prompts in one generate() call, greedy and sampled rows mixed: every output parses,
    is valid under the schema, and ended because the grammar was complete (finish "stop")."""
    prompts = [f"{COMPANIES[i % 8]} Corp reported revenue of {1000 + 37 * i} dollars on 2024-0{1 + i % 9}-1{i % 10}. "
               for i in range(200)]
    params = [SamplingParams(temperature=0, max_new_tokens=80) if i % 2 else
              SamplingParams(temperature=0.9, top_p=0.95, seed=i, max_new_tokens=80) for i in range(200)]
    out = generate(stories.model, stories.tokenizer, prompts, params, json_schema=EXTRACTION)
    judge = validator(EXTRACTION)
    assert len(out) == 200
    for c in out:
        assert c.finish_reason == "stop", c.text
        check_json(c.text, judge)
        assert c.text.endswith("}") and c.text == stories.tokenizer.decode(c.token_ids)
    assert len({c.text for c in out}) > 20  # sampled rows differ: the mask is not one fixed string


def test_byte_level_model_schema_and_logprobs(bpe):
    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                    "maxItems": 3}},
                         "required": ["name", "age", "tags"], "additionalProperties": False})
    judge = validator(schema)
    out = bpe.generate_batch(["The king said", "Once upon a time", "ROMEO:"], temperature=0.8, seed=3,
                             max_new_tokens=60, json_schema=schema, logprobs=1)
    for c in out:
        assert c.finish_reason == "stop"
        check_json(c.text, judge)
        # logprobs stay the model's own (unmasked) distribution, one per generated token
        assert len(c.logprobs) == len(c.token_ids) and all(lp.logprob <= 0 for lp in c.logprobs)


def test_regex_outputs_fullmatch(stories):
    pattern = r"(yes|no), [a-z]{2,8}( [a-z]{2,8}){0,3}\."
    prompts = ["Is the sky blue?", "Did Tim go home?", "Was it fun?", "Once upon a time"]
    out = generate(stories.model, stories.tokenizer, prompts,
                   [SamplingParams(temperature=t, seed=7, max_new_tokens=40) for t in (0, 0.7, 1.0, 1.3)],
                   regex=pattern)
    for c in out:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c.text
    # streamed, the pieces join to the same whole
    streamed = "".join(stories.stream("Is the sky blue?", temperature=0, max_new_tokens=40, regex=pattern))
    assert streamed == out[0].text
    # a grammar that must repeat itself wins over no_repeat_ngram_size (greedy and sampled)
    for temperature in (0, 0.8):
        c = stories.complete("Once", regex="(ab ){6}", no_repeat_ngram_size=2, temperature=temperature, seed=1,
                             max_new_tokens=30)
        assert (c.text, c.finish_reason) == ("ab " * 6, "stop")


def test_lark_grammar(stories, bpe):
    lark = r"""
start: greeting ", " name "! " request "."
greeting: "Hello" | "Hi" | "Dear"
name: NAME (" " NAME)?
NAME: /[A-Z][a-z]{1,7}/
request: "please " verb " the " thing
verb: "bring" | "find" | "paint"
thing: "box" | "ball" | "dog" | "cake"
"""
    judge = re.compile(r"(Hello|Hi|Dear), [A-Z][a-z]{1,7}( [A-Z][a-z]{1,7})?! please (bring|find|paint) the "
                       r"(box|ball|dog|cake)\.")
    for lm in (stories, bpe):
        out = lm.generate_batch(["Lily wrote a letter:", "The dog", "Once upon a time"], temperature=1.0, seed=11,
                                max_new_tokens=50, grammar=lark)
        for c in out:
            assert c.finish_reason == "stop" and judge.fullmatch(c.text), c.text


def test_constrained_and_free_rows_share_a_batch(stories):
    """One generate() call: a schema row, a regex row and free rows; the free rows get exactly
    what they get alone, the constrained ones match their own constraints."""
    t = stories.tokenizer
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
                         "required": ["n"], "additionalProperties": False})
    free = SamplingParams(temperature=0, max_new_tokens=24)
    params = [SamplingParams(temperature=0, max_new_tokens=24, constraint=json_schema(schema, t)), free,
              SamplingParams(temperature=0.8, seed=5, max_new_tokens=24, constraint=regex(r"[0-9]{3}-[0-9]{4}", t)),
              SamplingParams(temperature=0.8, seed=9, max_new_tokens=24)]
    prompts = ["Tom had", "Once upon a time", "Call me at", "Lily saw"]
    out = generate(stories.model, t, prompts, params)
    check_json(out[0].text, validator(schema))
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out[2].text)
    assert out[1].text == stories.generate("Once upon a time", temperature=0, max_new_tokens=24)
    assert out[3].text == stories.generate("Lily saw", temperature=0.8, seed=9, max_new_tokens=24)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"json_schema": {"type": "strin"}}, "the JSON schema cannot be compiled: Invalid type: strin"),
    ({"json_schema": {"type": "string", "minLength": 5, "maxLength": 2}},
     "the JSON schema cannot be compiled: Unsatisfiable schema: minLength (5) is greater than maxLength (2)"),
    ({"json_schema": '{"type": '}, "the JSON schema is not valid JSON: Expecting value: line 1 column 10 (char 9)"),
    ({"regex": "a(b"}, 'the regex cannot be compiled: invalid regex "a(b": unclosed group'),
    ({"grammar": "start: foo"}, 'the grammar cannot be compiled: at 1(8): unknown name: "foo"'),
    ({"regex": r"[^\x00-\x{10FFFF}]"}, "the regex matches nothing this tokenizer can produce"),
    ({"grammar": r"start: /[^\x00-\x{10FFFF}]/"}, "the grammar matches nothing this tokenizer can produce"),
    ({"regex": "a", "grammar": 'start: "a"'}, "give one constraint at a time, not regex and grammar"),
])
def test_bad_constraints_are_one_clear_line(stories, kwargs, message):
    with pytest.raises(InvalidArgument) as e:
        compile_constraint(stories.tokenizer, **kwargs)
    assert str(e.value) == message and "\n" not in str(e.value)


def test_a_constraint_that_cannot_end_within_max_tokens_is_truncated_not_valid(stories):
    c = stories.complete("Once", regex="a{50}", max_new_tokens=6)
    assert c.finish_reason == "length" and c.text == "a" * len(c.token_ids) and 0 < len(c.text) < 50
    long_name = json.dumps({"type": "object", "properties": {"name": {"type": "string", "minLength": 200}},
                            "required": ["name"]})
    c = stories.complete("Once", json_schema=long_name, max_new_tokens=12)
    assert c.finish_reason == "length" and c.text.startswith('{"name": "') and len(c.token_ids) == 12
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_beam_search_with_a_constraint_is_refused(stories):
    with pytest.raises(InvalidArgument, match="beam search"):
        stories.complete("Once", regex="a+", num_beams=2)


def test_cli_flags(capsys, tmp_path):
    from emergence.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], '
                      '"additionalProperties": false}')
    grammar = tmp_path / "yn.lark"
    grammar.write_text('start: ("yes" | "no") "!"\n')
    for flags, judge in ((["--json-schema", str(schema)], r'\{"ok": (true|false)\}'),
                         (["--regex", "[0-9]{4}"], r"[0-9]{4}"), (["--grammar", str(grammar)], r"(yes|no)!")):
        capsys.readouterr()
        assert main(["generate", "Once upon a time", "-t", "0", "-n", "20", *flags]) == 0
        out, _ = capsys.readouterr()
        assert re.fullmatch(judge, out.rstrip("\n")), (flags, out)
    capsys.readouterr()
    assert main(["generate", "Once", "--regex", "a(b"]) == 1
    _, err = capsys.readouterr()
    assert err.strip().endswith('the regex cannot be compiled: invalid regex "a(b": unclosed group')
    assert len(err.strip().splitlines()) == 1
    assert main(["generate", "Once", "--json-schema", str(tmp_path / "missing.json")]) == 1
    assert "cannot read the JSON schema" in capsys.readouterr()[1]


# -------------------------------------------------------------------------------- server
def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


@pytest.fixture(scope="module")
def served(stories):
    app = Server(stories, "stories260K", slots=8)
    server, thread = serve_in_thread(app, port=0)
    yield app, server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    app.close()


SCHEMAS = [
    {"type": "object", "properties": {"company": {"type": "string", "maxLength": 16},
                                      "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
     "required": ["company", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9, "minimum": 0}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
]


def test_engine_batches_rows_with_different_schemas(served, stories):
    """One prompt, four choices in one engine batch (one prefill, forked): three schemas and a
    free row; all step together (the steps are the longest row's), each valid under its own."""
    app, _ = served
    t = stories.tokenizer
    ids = t.encode("Once upon a time")
    params = [SamplingParams(temperature=0.7, seed=i, max_new_tokens=48, constraint=json_schema(s, t))
              for i, s in enumerate(SCHEMAS)] + [SamplingParams(temperature=0, max_new_tokens=10)]
    steps = app.engine.steps
    requests = app.engine.submit_choices(ids, params)  # one sink: (choice, chunk) items, (choice, None) at the end
    texts, reasons, open_ = [""] * len(params), [None] * len(params), len(params)
    while open_:
        tag, chunk = requests[0].sink.get(timeout=60)
        if chunk is None:
            open_ -= 1
            continue
        assert not isinstance(chunk, BaseException), chunk
        texts[tag] += chunk.text
        reasons[tag] = chunk.finish_reason or reasons[tag]
    assert reasons[:3] == ["stop"] * 3
    for text, schema in zip(texts, SCHEMAS):
        jsonschema.validate(json.loads(text), schema)
    assert texts[3] == stories.generate(ids, temperature=0, max_new_tokens=10)
    assert app.engine.steps - steps <= 48  # one batch: not the sum of the rows' steps


def test_openai_response_format_and_ollama_format(served):
    app, port = served
    results: dict = {}

    def chat(i: int, schema: dict) -> None:
        results[("chat", i)] = _post(port, "/v1/chat/completions", {
            "model": "stories260K", "messages": [{"role": "user", "content": f"Tell me a story {i}"}],
            "max_tokens": 60, "temperature": 0.8, "seed": i, "n": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema,
                                                                       "strict": True}}})

    def completion(i: int) -> None:
        results[("completion", i)] = _post(port, "/v1/completions", {
            "model": "stories260K", "prompt": "Lily", "max_tokens": 60, "temperature": 0.9, "seed": i,
            "response_format": {"type": "json_object"}})

    def ollama(i: int) -> None:
        results[("ollama", i)] = _post(port, "/api/generate", {
            "model": "stories260K", "prompt": "Tom", "stream": False, "format": SCHEMAS[i] if i else "json",
            "options": {"temperature": 0.8, "seed": i, "num_predict": 60}})

    threads = [threading.Thread(target=chat, args=(i, s)) for i, s in enumerate(SCHEMAS)]
    threads += [threading.Thread(target=completion, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=ollama, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    for i, schema in enumerate(SCHEMAS):
        status, body = results[("chat", i)]
        assert status == 200 and len(body["choices"]) == 2, body
        for choice in body["choices"]:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    for i in range(2):
        status, body = results[("completion", i)]
        text = body["choices"][0]["text"]
        # json_object: any object; a tiny model may not close it within 60 tokens (then "length")
        if body["choices"][0]["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.startswith("{") and body["usage"]["completion_tokens"] == 60
    status, body = results[("ollama", 0)]
    assert status == 200 and body["done_reason"] in ("stop", "length") and body["response"].startswith("{")
    status, body = results[("ollama", 1)]
    assert status == 200 and body["done_reason"] == "stop"
    jsonschema.validate(json.loads(body["response"]), SCHEMAS[1])


def test_server_truncation_and_bad_schema(served):
    _, port = served
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 100}}, "required": ["name"]}
    status, body = _post(port, "/v1/chat/completions", {
        "model": "stories260K", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    status, body = _post(port, "/v1/chat/completions", {
        "model": "stories260K", "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}}})
    assert status == 400 and body["error"]["param"] == "response_format"
    assert body["error"]["message"] == "the JSON schema cannot be compiled: Invalid type: strin"
    status, body = _post(port, "/api/chat", {"model": "stories260K", "messages": [{"role": "user", "content": "Hi"}],
                                             "format": {"type": "string", "pattern": "(("}, "stream": False})
    assert status == 400 and body["error"].startswith("the JSON schema cannot be compiled: ")
    assert "\n" not in body["error"]
