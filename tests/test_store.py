"""The local model store (emergence.store) and its verbs: list, show, create, import, cp, rm, run.

Every test runs against a store in its own temporary folder (EMERGENCE_HOME), never the real
~/.emergence; the CLI runs in this process through `emergence.cli.main`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, VOCAB, word_level_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

import emergence
from emergence import store as store_module
from emergence.cli import main
from emergence.config import Config
from emergence.errors import CheckpointError, EmergenceError, InvalidArgument
from emergence.model import Transformer
from emergence.store import ModelName, Modelfile, Store, parse_modelfile, store_root, with_system
from emergence.weights.hf import save_hf

GGUF_FILE = SHARED_DATA / "gguf_models" / "llama-2-tiny-random.gguf"
PROMPT_IDS = torch.tensor([[1, 5, 17, 42, 8, 3]])
STORY_MODELFILE = '''# a storyteller
FROM stories260K
PARAMETER temperature 0
PARAMETER num_predict 24
SYSTEM """Lily and Ben
went to the park."""
'''
SYSTEM_TEXT = "Lily and Ben\nwent to the park."


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """The store root of every test: a fresh folder, through EMERGENCE_HOME."""
    root = tmp_path / "home"
    monkeypatch.setenv("EMERGENCE_HOME", str(root))
    monkeypatch.chdir(tmp_path)
    return root


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *args: str) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    return out


def fails(capsys, *args: str) -> str:
    """Run a command that must fail as bad input does: one stderr line, exit status 1."""
    code, out, err = cli(capsys, *args)
    assert code == 1, (out, err)
    assert err.count("\n") == 1 and err.startswith("emergence: error: "), err
    return err


def write_modelfile(folder: Path, text: str, name: str = "Modelfile") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def list_rows(capsys) -> list[list[str]]:
    """`emergence list` as rows of cells, the header first."""
    return [re.split(r"\s{2,}", line) for line in ok(capsys, "list").splitlines()]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved with save_hf in two shards, with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    torch.manual_seed(7)
    model = Transformer(Config.from_name("tiny-llama", vocab_size=VOCAB))
    save_hf(model, folder, max_shard_bytes=200_000)
    word_level_tokenizer().save(folder)
    return folder


def logits(path_or_name: str | Path) -> torch.Tensor:
    lm = emergence.load(path_or_name, device="cpu")
    with torch.no_grad():
        return lm.model(PROMPT_IDS)


# ---------------------------------------------------------------------------------- names
@pytest.mark.parametrize("text, name, tag", [("story", "story", "latest"), ("story:latest", "story", "latest"),
                                             ("llama-3.2_1b:q8_0", "llama-3.2_1b", "q8_0"), ("0:1", "0", "1")])
def test_valid_names(text, name, tag):
    assert ModelName.parse(text) == ModelName(name, tag)
    assert str(ModelName.parse(text)) == f"{name}:{tag}"


@pytest.mark.parametrize("text", ["", "Story", "-x", ".x", "a:", ":b", "a:b:c", "a/b", "../x", "a b", "a:B",
                                  "x" * 300])
def test_invalid_names(text):
    with pytest.raises(InvalidArgument, match="invalid model name"):
        ModelName.parse(text)
    assert Store().find(text) is None


def test_bad_names_are_one_line_errors(capsys, home):
    write_modelfile(Path.cwd(), STORY_MODELFILE)
    assert "invalid model name 'Story'" in fails(capsys, "create", "Story")
    assert "invalid model name 'a/b'" in fails(capsys, "import", str(GGUF_FILE), "a/b")
    assert "invalid model name" in fails(capsys, "rm", "x:Y")
    assert not (home / "models").exists() or not any((home / "models").iterdir())


def test_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "elsewhere"))
    assert store_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("EMERGENCE_HOME")
    assert store_root() == Path.home() / ".emergence"


# ------------------------------------------------------------------------------ Modelfile
def test_modelfile_parses_every_instruction():
    text = '''
# comment lines and blank lines are skipped
from ./weights/model.gguf
PARAMETER temperature 0.7
PARAMETER top_k 40
PARAMETER top_p 0.9
PARAMETER min_p 0.05
PARAMETER typical_p 0.95
PARAMETER repeat_penalty 1.1
PARAMETER presence_penalty 0.5
PARAMETER frequency_penalty -0.5
PARAMETER seed 42
PARAMETER num_predict 64
PARAMETER stop "<|im_end|>"
PARAMETER stop "\\n\\n"
PARAMETER stop END
System """
  You are Mario.
    # not a comment inside a block
"""
TEMPLATE "{% for m in messages %}{{ m['content'] }}{% endfor %}"
'''
    mf = parse_modelfile(text, base_dir=Path("/models"))
    assert mf.source == "./weights/model.gguf"
    assert mf.base_dir == Path("/models")
    assert mf.parameters == {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95,
                             "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
                             "seed": 42, "max_new_tokens": 64, "stop": ["<|im_end|>", "\n\n", "END"]}
    assert mf.system == "\n  You are Mario.\n    # not a comment inside a block\n"
    assert mf.template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_modelfile_single_line_forms():
    mf = parse_modelfile('FROM "a folder/with spaces"\nSYSTEM plain words\nTEMPLATE """chatml"""\n')
    assert (mf.source, mf.system, mf.template, mf.parameters) == ("a folder/with spaces", "plain words",
                                                                    "chatml", {})


@pytest.mark.parametrize("text, message", [
    ("FROM x\nPARAMETER num_ctx 4096\n", "Modelfile line 2: unknown parameter 'num_ctx'"),
    ("FROM x\n\nPARAMETER temperature hot\n", "Modelfile line 3: temperature takes a number, got 'hot'"),
    ("FROM x\nPARAMETER top_k 1.5\n", "Modelfile line 2: top_k takes an integer, got '1.5'"),
    ("FROM x\nPARAMETER temperature -1\n", "Modelfile line 2: temperature must be >= 0"),
    ("FROM x\nPARAMETER top_p 0\n", "Modelfile line 2: top_p must be in (0, 1]"),
    ("FROM x\nPARAMETER seed\n", "Modelfile line 2: PARAMETER seed needs a value"),
    ("FROM x\nPARAMETER stop \"\"\n", "Modelfile line 2: stop needs a non-empty string"),
    ("FROM x\nPARAMETER temperature 1\nPARAMETER temperature 0\n",
     "Modelfile line 3: parameter temperature given twice (first on line 2)"),
    ("FROM x\nLICENSE mit\n", "Modelfile line 2: unknown instruction 'LICENSE' (emergence supports"),
    ("FROM x\nADAPTER a\nADAPTER b\n", "Modelfile line 3: ADAPTER given twice (first on line 2)"),
    ("FROM x\nSYTEM hi\n", "Modelfile line 2: unknown instruction 'SYTEM'"),
    ("FROM x\n# c\nSYSTEM \"\"\"never\nclosed\n", 'Modelfile line 3: the """ opened by SYSTEM is never closed'),
    ("FROM x\nTEMPLATE \"\"\"a\nb\"\"\" extra\n", 'Modelfile line 3: text after the closing """ of TEMPLATE'),
    ("FROM x\nTEMPLATE \"{{ .System }} {{ .Prompt }}\"\n",  # Ollama's Go templates are not Jinja
     "Modelfile line 2: TEMPLATE: chat template custom does not parse"),
    ("FROM x\nTEMPLATE llama9\n", "Modelfile line 2: TEMPLATE: unknown chat template 'llama9'"),
    ("FROM x\nFROM y\n", "Modelfile line 2: FROM given twice (first on line 1)"),
    ("FROM\n", "Modelfile line 1: FROM needs an argument"),
    ("PARAMETER temperature 0\n", "Modelfile: no FROM line"),
    ("", "Modelfile: no FROM line"),
])
def test_modelfile_errors_name_the_line(text, message):
    with pytest.raises(InvalidArgument) as e:
        parse_modelfile(text)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_create_reports_modelfile_errors_with_the_file_and_line(capsys, home):
    path = write_modelfile(Path.cwd(), "FROM stories260K\nPARAMETER temperature 0\nPARAMETER mirostat 2\n", "Bad")
    err = fails(capsys, "create", "x", "-f", str(path))
    assert f"{path} line 3: unknown parameter 'mirostat'" in err
    assert "cannot read Modelfile" in fails(capsys, "create", "x", "-f", "missing-Modelfile")
    assert ok(capsys, "list").splitlines()[1:] == []


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"), max_size=40).filter(
    lambda t: '"""' not in t and not t.endswith('"'))


@settings(max_examples=150, deadline=None)
@given(system=st.none() | _text,  # a template: a built-in's name, or Jinja with any literal text
       template=st.none() | st.sampled_from(["chatml", "llama3", "plain"])
       | _text.filter(lambda t: not set(t) & set("{}%#")).map(lambda t: "{% for m in messages %}" + t + "{% endfor %}"),
       temperature=st.none() | st.floats(0, 5), top_k=st.none() | st.integers(0, 1000),
       stop=st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s.strip() == s and s), max_size=3))
def test_modelfile_round_trip(system, template, temperature, top_k, stop):
    params = {k: v for k, v in (("temperature", temperature), ("top_k", top_k)) if v is not None}
    if stop:
        params["stop"] = stop
    mf = Modelfile("some-model:v1", params, system, template)
    back = parse_modelfile(mf.to_text())
    assert (back.source, back.parameters, back.system, back.template) == ("some-model:v1", params, system, template)


# --------------------------------------------------------------------- create, show, run
@pytest.fixture
def story(capsys) -> str:
    write_modelfile(Path.cwd(), STORY_MODELFILE)
    out = ok(capsys, "create", "story")
    assert out == "created story:latest from stories260K (llama, 260K parameters, fp32, 1.1 MB)\n"
    return "story"


def test_show_reports_the_modelfile_exactly(capsys, story, home):
    shown = json.loads(ok(capsys, "show", "story", "--json"))
    assert shown["name"] == "story:latest" and shown["source"] == "stories260K"
    assert shown["parameters"] == {"temperature": 0.0, "max_new_tokens": 24}
    assert shown["system"] == SYSTEM_TEXT and shown["template"] is None
    assert (shown["layout"], shown["format"]) == ("hf", "fp32")
    assert shown["details"] == {"architecture": "llama", "parameter_count": 260_032, "context_length": 512}
    assert shown["path"] == str(home / "models" / "story:latest")
    packaged = Path(emergence.api.PACKAGED_MODELS) / "stories260K"
    for name, record in shown["files"].items():
        data = (packaged / name).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert sorted(shown["files"]) == sorted(p.name for p in packaged.iterdir())
    assert shown["size"] == sum(r["size"] for r in shown["files"].values()) + (
        home / "models" / "story:latest" / "manifest.json").stat().st_size

    text = ok(capsys, "show", "story")
    assert re.search(r"^    parameters\s+260,032$", text, re.MULTILINE)
    assert re.search(r"^    context length\s+512$", text, re.MULTILINE)
    assert re.search(r"^    temperature\s+0.0$", text, re.MULTILINE)
    assert re.search(r"^    max_new_tokens\s+24$", text, re.MULTILINE)
    assert "\n  System\n    Lily and Ben\n    went to the park.\n" in text
    modelfile = ok(capsys, "show", "story", "--modelfile")
    again = parse_modelfile(modelfile)
    assert (again.parameters, again.system) == (shown["parameters"], SYSTEM_TEXT)


def test_run_answers_like_generate_with_the_stored_settings(capsys, story):
    expected = ok(capsys, "generate", with_system(SYSTEM_TEXT, "Once upon a time"), "--temperature", "0",
                  "--max-new-tokens", "24")
    assert expected == emergence.load().generate(SYSTEM_TEXT + "\nOnce upon a time", temperature=0,
                                                 max_new_tokens=24) + "\n"
    assert ok(capsys, "run", "story", "Once upon a time") == expected
    # A flag overrides the stored value; the others still apply.
    assert ok(capsys, "run", "story", "Once upon a time", "-n", "5") == ok(
        capsys, "generate", SYSTEM_TEXT + "\nOnce upon a time", "--temperature", "0", "-n", "5")
    # generate --model NAME is run NAME: the stored parameters and system prompt apply there too,
    # and so do they in chat (below) and serve (test_serve_applies_a_store_models_settings).
    assert ok(capsys, "generate", "--model", "story", "Once upon a time") == expected
    assert ok(capsys, "generate", "--model", "story", "Once", "-n", "12") == ok(
        capsys, "generate", SYSTEM_TEXT + "\nOnce", "-t", "0", "-n", "12")


def test_serve_applies_a_store_models_settings(story):
    # The server of a store model: its name is the model id, its PARAMETERs (temperature 0,
    # num_predict 24) the request defaults, its SYSTEM the system message of a chat without one.
    import http.client

    from emergence.chat import encode_prompt, resolve_chat_template
    from emergence.serve.app import app_for, serve_in_thread

    app = app_for("story")
    server, thread = serve_in_thread(app)
    try:
        assert app.name == "story"
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "story", "messages": [{"role": "user", "content": "Once upon a time"}]}),
            {"Content-Type": "application/json"})
        reply = json.loads(conn.getresponse().read())
        lm = emergence.load()
        messages = [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": "Once upon a time"}]
        template = resolve_chat_template(None, missing="plain")
        ids = encode_prompt(lm.tokenizer, template.render(messages, add_generation_prompt=True))
        expected = lm.complete(ids, temperature=0, max_new_tokens=24, stop=template.stop)
        assert reply["choices"][0]["message"]["content"] == expected.text
        assert reply["usage"]["completion_tokens"] == len(expected.token_ids)
    finally:
        server.shutdown()
        server.server_close()
        app.close()


def test_run_without_prompt_chats_after_the_system_prompt(capsys, monkeypatch, story):
    from emergence.chat import encode_prompt, resolve_chat_template

    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n"))
    out = ok(capsys, "run", "story")
    template = resolve_chat_template(None, missing="plain")  # a base model: the plain transcript
    messages = [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": "Once upon a time"}]
    ids = encode_prompt(emergence.load().tokenizer, template.render(messages, add_generation_prompt=True))
    reply = emergence.load().generate(ids, temperature=0, max_new_tokens=24, stop=template.stop)
    assert out == "> " + reply + "\n> "


def test_create_inherits_from_a_store_model_and_overrides(capsys, story, home):
    write_modelfile(Path.cwd(), 'FROM story\nPARAMETER num_predict 8\nPARAMETER stop "."\n', "Child")
    ok(capsys, "create", "child:v2", "-f", "Child")
    child = Store().get("child:v2")
    assert child.manifest.source == "story:latest"
    assert child.manifest.parameters == {"temperature": 0.0, "max_new_tokens": 8, "stop": ["."]}
    assert child.manifest.system == SYSTEM_TEXT
    parent = Store().get("story")
    for name in parent.manifest.files:  # shared by hard links, not copied
        assert os.stat(child.folder / name).st_ino == os.stat(parent.folder / name).st_ino
    assert ok(capsys, "run", "child:v2", "Once upon a time") == ok(
        capsys, "generate", SYSTEM_TEXT + "\nOnce upon a time", "-t", "0", "-n", "8", "--stop", ".")


def test_create_from_a_relative_path_and_a_missing_source(capsys, tiny_hf, tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    os.symlink(tiny_hf, sub / "weights")
    write_modelfile(sub, "FROM ./weights\nSYSTEM t5 t6\n")
    ok(capsys, "create", "rel", "-f", str(sub / "Modelfile"))  # resolved against the Modelfile's folder
    assert Store().get("rel").manifest.source == str(tiny_hf.resolve())
    write_modelfile(sub, "FROM nowhere-model\n")
    err = fails(capsys, "create", "x", "-f", str(sub / "Modelfile"))
    assert "no model at 'nowhere-model': not a path, nor a model in the store " in err
    assert " (rel:latest), nor a packaged model (emergence-6m, stories260K)" in err


# ------------------------------------------------------------------------------- import
def test_import_hf_folder_loads_identically(capsys, tiny_hf, home):
    out = ok(capsys, "import", str(tiny_hf), "tiny")
    assert out.startswith(f"imported tiny:latest from {tiny_hf.resolve()} (llama, ")
    entry = Store().get("tiny")
    assert set(entry.manifest.files) == {p.name for p in tiny_hf.iterdir()}  # index, shards, config, tokenizer
    assert any(name.startswith("model-00002-of-") for name in entry.manifest.files)
    assert entry.manifest.details.parameter_count == sum(p.numel() for p in emergence.load(tiny_hf).model.parameters())
    assert torch.equal(logits("tiny"), logits(tiny_hf))
    assert torch.equal(logits("tiny:latest"), logits(tiny_hf))


def test_import_gguf_file_loads_identically(capsys, home):
    ok(capsys, "import", str(GGUF_FILE), "tiny-gguf:f16")
    entry = Store().get("tiny-gguf:f16")
    assert entry.model_path == home / "models" / "tiny-gguf:f16" / "model.gguf"
    data = GGUF_FILE.read_bytes()
    assert entry.manifest.files == {"model.gguf": store_module.FileRecord(hashlib.sha256(data).hexdigest(),
                                                                        len(data))}
    assert (entry.manifest.details.format, entry.manifest.details.context_length) == ("gguf-f16", 4096)
    assert torch.equal(logits("tiny-gguf:f16"), logits(GGUF_FILE))


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_import_records_the_format(capsys, tmp_path, kind):
    from emergence.quant import quantize_model, save_quantized

    torch.manual_seed(3)
    model = Transformer(Config.from_name("tiny-llama", vocab_size=VOCAB))
    folder = tmp_path / kind
    if kind == "bf16":
        save_hf(model.to(torch.bfloat16), folder)
        word_level_tokenizer().save(folder)
    else:
        save_quantized(quantize_model(model, "int8"), word_level_tokenizer(), folder)
    ok(capsys, "import", str(folder), f"m:{kind}")
    assert Store().get(f"m:{kind}").manifest.details.format == kind
    assert torch.equal(logits(f"m:{kind}"), logits(folder))


def test_import_refuses_what_is_no_model(capsys, tmp_path, home):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    assert "neither a Hugging Face model folder" in fails(capsys, "import", str(tmp_path / "empty"), "x")
    assert "neither a Hugging Face model folder" in fails(capsys, "import", str(tmp_path / "notes.txt"), "x")
    assert "no such file or folder" in fails(capsys, "import", str(tmp_path / "missing"), "x")
    no_tok = tmp_path / "no-tok"
    save_hf(Transformer(Config.from_name("tiny-llama", vocab_size=VOCAB)), no_tok)
    assert "no tokenizer in" in fails(capsys, "import", str(no_tok), "x")
    assert ok(capsys, "list").splitlines()[1:] == []
    assert not (home / "tmp").exists() or not any((home / "tmp").iterdir())  # refused before any copy


# ------------------------------------------------------------------------ cp, rm, list
def test_cp_then_rm_leaves_the_source(capsys, story):
    assert ok(capsys, "cp", "story", "copy:1") == "copied story:latest to copy:1\n"
    src, dst = Store().get("story"), Store().get("copy:1")
    assert dst.manifest.files == src.manifest.files
    assert (dst.manifest.parameters, dst.manifest.system, dst.manifest.source) == (
        src.manifest.parameters, src.manifest.system, src.manifest.source)
    assert ok(capsys, "rm", "copy:1") == "deleted copy:1\n"
    assert [row[0] for row in list_rows(capsys)[1:]] == ["story:latest"]
    assert ok(capsys, "run", "story", "Once upon a time") == ok(
        capsys, "generate", SYSTEM_TEXT + "\nOnce upon a time", "-t", "0", "-n", "24")
    assert "model 'copy:1' not found in the store" in fails(capsys, "rm", "copy:1")
    assert "model 'nope:latest' not found" in fails(capsys, "cp", "nope", "x")
    assert "same model" in fails(capsys, "cp", "story", "story:latest")
    assert "no model at 'nope': not a path, nor a model in the store" in fails(capsys, "show", "nope")


def test_rm_checks_every_name_first(capsys, story):
    ok(capsys, "cp", "story", "b")
    fails(capsys, "rm", "b", "missing")
    assert [row[0] for row in list_rows(capsys)[1:]] == ["b:latest", "story:latest"]
    assert ok(capsys, "rm", "b", "story") == "deleted b:latest\ndeleted story:latest\n"
    assert list_rows(capsys) == [["NAME", "ARCHITECTURE", "PARAMETERS", "FORMAT", "SIZE", "MODIFIED"]]


def test_list_after_several_operations(capsys, story, tiny_hf):
    ok(capsys, "import", str(GGUF_FILE), "gguf:tiny")
    ok(capsys, "import", str(tiny_hf), "words")
    ok(capsys, "cp", "story", "zeta:copy")
    ok(capsys, "rm", "words")
    rows = list_rows(capsys)
    assert rows[0] == ["NAME", "ARCHITECTURE", "PARAMETERS", "FORMAT", "SIZE", "MODIFIED"]
    assert [row[:5] for row in rows[1:]] == [
        ["gguf:tiny", "llama", "513K", "gguf-f16", "1.8 MB"],
        ["story:latest", "llama", "260K", "fp32", "1.1 MB"],
        ["zeta:copy", "llama", "260K", "fp32", "1.1 MB"],
    ]
    assert all(row[5] == "just now" for row in rows[1:])
    listed = json.loads(ok(capsys, "list", "--json"))
    assert [(m["name"], m["parameter_count"], m["format"]) for m in listed] == [
        ("gguf:tiny", 513_048, "gguf-f16"), ("story:latest", 260_032, "fp32"), ("zeta:copy", 260_032, "fp32")]
    assert listed[1]["size"] == Store().get("story").size()


# ---------------------------------------------------------------------------- atomicity
def _failing_copy(real):
    """A _copy_file that writes the first file, then half of the next one and fails (disk full)."""
    calls = []

    def copy(src: Path, dst: Path):
        calls.append(src)
        if len(calls) == 1:
            return real(src, dst)
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    return copy


def test_a_failed_import_leaves_no_trace(capsys, monkeypatch, story, tiny_hf, home):
    before = ok(capsys, "list")
    real_copy = store_module._copy_file
    monkeypatch.setattr(store_module, "_copy_file", _failing_copy(real_copy))
    err = fails(capsys, "import", str(tiny_hf), "half")
    assert "cannot write half:latest into the store" in err and "No space left on device" in err
    assert ok(capsys, "list") == before
    assert sorted(p.name for p in (home / "models").iterdir()) == ["story:latest"]
    assert list((home / "tmp").iterdir()) == []
    # Overwriting an existing name fails the same way: the old entry stays whole.
    fails(capsys, "import", str(tiny_hf), "story")
    assert ok(capsys, "list") == before
    assert Store().get("story").manifest.system == SYSTEM_TEXT
    assert list((home / "tmp").iterdir()) == []
    monkeypatch.setattr(store_module, "_copy_file", real_copy)
    ok(capsys, "run", "story", "Once")  # still loads
    ok(capsys, "import", str(tiny_hf), "half")  # and the next write works


def test_leftovers_of_a_crash_are_ignored_then_cleaned(capsys, story, home):
    before = ok(capsys, "list")
    crashed = home / "tmp" / "999999999-deadbeef" / "entry"  # no process has this pid
    crashed.mkdir(parents=True)
    for name in ("manifest.json", "config.json"):
        (crashed / name).write_bytes((home / "models" / "story:latest" / name).read_bytes())
    stray = home / "models" / "not a model"  # not written by emergence: never listed
    stray.mkdir()
    assert ok(capsys, "list") == before
    alive = home / "tmp" / f"{os.getpid()}-inprogress"  # being written by a live process: kept
    alive.mkdir()
    ok(capsys, "cp", "story", "next")
    assert sorted(p.name for p in (home / "tmp").iterdir()) == [alive.name]
    assert [row[0] for row in list_rows(capsys)[1:]] == ["next:latest", "story:latest"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_replaces_the_entry(capsys, monkeypatch, story, home, exchange):
    if not exchange:
        monkeypatch.setattr(store_module, "_exchange", lambda a, b: False)
    old_inode = os.stat(home / "models" / "story:latest" / "manifest.json").st_ino
    write_modelfile(Path.cwd(), "FROM stories260K\nSYSTEM new text\nPARAMETER top_k 3\n", "New")
    ok(capsys, "create", "story", "-f", "New")
    entry = Store().get("story")
    assert (entry.manifest.system, entry.manifest.parameters) == ("new text", {"top_k": 3})
    assert os.stat(entry.folder / "manifest.json").st_ino != old_inode
    assert [row[0] for row in list_rows(capsys)[1:]] == ["story:latest"]
    assert list((home / "tmp").iterdir()) == []


def test_a_damaged_entry_is_reported_and_removable(capsys, story, home):
    manifest = home / "models" / "story:latest" / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("{not json")
    assert "store entry story:latest is damaged" in fails(capsys, "list")
    assert "remove it with: emergence rm story:latest" in fails(capsys, "show", "story")
    with pytest.raises(CheckpointError, match="is damaged"):
        emergence.load("story")
    assert ok(capsys, "rm", "story") == "deleted story:latest\n"
    assert ok(capsys, "list").splitlines()[1:] == []


# ----------------------------------------------------------------------- name resolution
def test_resolution_order_path_then_store_then_packaged(capsys, story, tiny_hf, tmp_path):
    write_modelfile(Path.cwd(), "FROM stories260K\n", "Shadow")
    ok(capsys, "create", "emergence-6m", "-f", "Shadow")  # a store name hides the packaged model
    assert emergence.load("emergence-6m").config.vocab_size == 512  # stories260K's, not emergence-6m's 4096
    os.symlink(tiny_hf, tmp_path / "story")  # an existing path hides the store entry of that name
    assert emergence.load("story").config.vocab_size == VOCAB
    assert emergence.load("story:latest").config.vocab_size == 512
    assert emergence.load("stories260K").config.vocab_size == 512  # packaged (not a valid store name)
    with pytest.raises(EmergenceError) as e:
        emergence.load("nothing-here")
    assert "not a path, nor a model in the store" in str(e.value)
    assert "(emergence-6m:latest, story:latest)" in str(e.value)
    assert "nor a packaged model (emergence-6m, stories260K)" in str(e.value)


# ------------------------------------------------------------------------------- verify
def test_a_damaged_or_replaced_file_is_refused_at_load_and_by_verify(capsys, story, home):
    entry = Store().get("story")
    weights = entry.folder / "model.safetensors"
    assert ok(capsys, "verify", "story").startswith("story:latest: 4 files, ")
    emergence.load("story")  # verified and stamped: the next loads only compare sizes and times
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors does not have the sha256 its manifest records"):
        emergence.load("story")
    assert "does not have the sha256" in fails(capsys, "verify", "story")
    weights.write_bytes(bytes(data[:-10]))  # cut short: refused by its size, before any hashing
    assert f"model.safetensors has {len(data) - 10} bytes, its manifest records {len(data)}" in fails(
        capsys, "generate", "--model", "story", "-n", "2")


def test_a_manifest_naming_a_file_outside_its_entry_is_refused(capsys, story, home):
    entry = Store().get("story")
    manifest = json.loads((entry.folder / "manifest.json").read_text())
    manifest["files"]["../../escape"] = manifest["files"].pop("config.json")
    os.chmod(entry.folder / "manifest.json", 0o644)
    (entry.folder / "manifest.json").write_text(json.dumps(manifest))
    assert "not a plain name of the entry: '../../escape'" in fails(capsys, "show", "story")
