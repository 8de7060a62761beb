"""What a new user following the README trips on: outputs in folders that do not exist yet,
silent overwrites, a silent first build, misleading messages. Each answer is one clear line
(exit 1), or the command just works. (Interrupts during a checkpoint and resuming a run are in
test_pretrain.py; the chat commands in test_cli.py; the server's answers in test_serve.py.)"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

import emergence
from emergence.cli import main


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("EMERGENCE_HOME", str(root))
    return root


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *args) -> str:
    code, out, err = cli(capsys, *args)
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("emergence: error: "), err
    return err


# ----------------------------------------------------------------------------- outputs
def test_a_gguf_output_in_folders_that_do_not_exist_yet(capsys, tmp_path):
    dst = tmp_path / "new" / "deeper" / "model.gguf"
    code, out, err = cli(capsys, "convert", "stories260K", dst)
    assert code == 0, err
    assert out == f"wrote {dst} (llama, GGUF f32)\n"
    assert emergence.load(dst).generate("Once", temperature=0, max_new_tokens=8) == \
        emergence.load().generate("Once", temperature=0, max_new_tokens=8)


def test_a_gguf_output_under_a_file_or_an_unwritable_place(capsys, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    err = one_line_error(capsys, "convert", "stories260K", blocker / "model.gguf")
    assert f"{blocker} is a file, not a folder" in err
    err = one_line_error(capsys, "convert", "stories260K", "/proc/emergence-test/model.gguf")
    assert "cannot write /proc/emergence-test/model.gguf" in err


def test_outputs_never_replace_a_model_silently(capsys, tmp_path):
    gguf, folder, quantized = tmp_path / "m.gguf", tmp_path / "hf", tmp_path / "q"
    for args in (("convert", "stories260K", gguf), ("convert", "stories260K", folder),
                 ("quantize", "--to", "int8", "--out", quantized)):
        assert cli(capsys, *args)[0] == 0
        before = sorted((p.name, p.stat().st_mtime_ns) for p in Path(args[-1]).parent.rglob("*"))
        err = one_line_error(capsys, *args)
        assert "exists: writing there would replace" in err and "--force replaces it" in err
        if Path(args[-1]).is_dir():
            assert "config.json" in err  # what would be replaced is named
        assert sorted((p.name, p.stat().st_mtime_ns) for p in Path(args[-1]).parent.rglob("*")) == before
        assert cli(capsys, *args, "--force")[0] == 0


def test_the_store_never_replaces_a_model_silently(capsys, tmp_path):
    assert cli(capsys, "import", emergence.api.PACKAGED_MODELS / "stories260K", "story")[0] == 0
    assert cli(capsys, "import", emergence.api.PACKAGED_MODELS / "emergence-6m", "six")[0] == 0
    err = one_line_error(capsys, "import", emergence.api.PACKAGED_MODELS / "emergence-6m", "story")
    assert "story:latest exists in the store (llama, 260K parameters, fp32, from " in err
    assert "--force replaces it" in err
    err = one_line_error(capsys, "cp", "six", "story")
    assert "story:latest exists in the store" in err
    assert json.loads(cli(capsys, "show", "story", "--json")[1])["details"]["parameter_count"] == 260_032
    assert cli(capsys, "cp", "six", "story", "--force")[0] == 0
    assert json.loads(cli(capsys, "show", "story", "--json")[1])["details"]["parameter_count"] > 5_000_000


# --------------------------------------------------------------------- the first build
def test_the_first_build_of_the_kernels_says_so(monkeypatch, tmp_path, capsys):
    # No cached build for these sources, Python and torch (a fresh cache folder here): one line
    # before the minute of compiling, naming where the build goes. (The compiler is stubbed.)
    import torch.utils.cpp_extension

    from emergence import kernels

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("EMERGENCE_NO_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_cpu_supports", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: "built")
    capsys.readouterr()
    assert kernels.gemv_extension.__wrapped__() == "built"
    err = capsys.readouterr().err
    assert re.fullmatch(rf"emergence: building the native decode kernels into {re.escape(str(tmp_path / 'cache'))}/"
                        r"emergence_kernels_[0-9a-f]{12}-py\d+-torch[^ ]+ \(about a minute, once\)\n", err), err
    name = err.split("/")[-1].split("-py")[0]
    build = next((tmp_path / "cache").iterdir())
    (build / f"{name}.so").write_bytes(b"")  # the build is there: nothing more is said
    kernels.gemv_extension.__wrapped__()
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ messages
def test_a_file_that_is_no_model_is_called_so(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("These are notes, not a model.\n" * 10)
    err = one_line_error(capsys, "generate", "--model", notes, "-n", "3")
    assert f"{notes} is not a model emergence recognises" in err and "llama2.c" in err
    from conftest import SHARED_DATA

    err = one_line_error(capsys, "generate", "--model", SHARED_DATA / "llama2c" / "stories260K.bin", "-n", "3")
    assert "is a llama2.c checkpoint: pass its tokenizer .bin too (--tokenizer)" in err


def test_importing_a_corrupt_gguf_names_the_users_file(capsys, tmp_path):
    good = tmp_path / "good.gguf"
    assert cli(capsys, "convert", "stories260K", good)[0] == 0
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(good.read_bytes()[:5000])
    err = one_line_error(capsys, "import", corrupt, "broken")
    assert str(corrupt) in err and "/tmp/" + "entry" not in err and "emergence-home" not in err
    assert not any(cli(capsys, "list")[1].splitlines()[1:])  # nothing was added


def test_a_modelfile_template_that_does_not_compile_is_refused_by_create(capsys, tmp_path):
    (tmp_path / "Modelfile").write_text('FROM stories260K\nTEMPLATE """{% for m in messages %}{{ m.content }}"""\n')
    err = one_line_error(capsys, "create", "broken", "-f", tmp_path / "Modelfile")
    assert f"{tmp_path / 'Modelfile'} line 2: TEMPLATE: chat template" in err and "does not parse" in err
    (tmp_path / "Modelfile").write_text("FROM stories260K\nTEMPLATE llama9\n")
    assert "unknown chat template 'llama9'" in one_line_error(capsys, "create", "broken", "-f", tmp_path / "Modelfile")


def test_show_describes_a_packaged_model(capsys):
    code, out, err = cli(capsys, "show", "emergence-6m")
    assert code == 0, err
    assert re.search(r"^    name\s+emergence-6m$", out, re.MULTILINE)
    count = emergence.load("emergence-6m").model.num_parameters()
    assert re.search(rf"^    parameters\s+{count:,}$", out, re.MULTILINE)
    assert re.search(r"^    source\s+packaged with emergence$", out, re.MULTILINE)
    assert json.loads(cli(capsys, "show", "emergence-6m", "--json")[1])["details"]["context_length"] == 512


def test_help_names_what_a_model_can_be_and_the_presets(capsys):
    from emergence.config import PRESETS

    for verb in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "a GGUF file" in text and "a model in the store" in text and "a packaged model" in text
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in PRESETS)


def test_a_prompt_too_long_names_the_flag_that_keeps_its_end(capsys):
    err = one_line_error(capsys, "generate", "Once upon a time " * 200, "-n", "3")
    assert "does not fit the context window of 512" in err and "--truncate" in err


def test_the_readme_quotes_what_emergence_6m_writes():
    # The README's quote of emergence-6m's greedy continuation, checked on every path: the API
    # (native and eager backends), bf16, and the command line.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    quote = re.search(r'Greedy from "Once upon a time": \*"(.+?)"\*', " ".join(readme.split())).group(1)
    assert len(quote) > 60
    for backend in ("native", "eager"):
        for dtype in ("fp32", "bf16"):
            lm = emergence.load("emergence-6m", dtype=dtype, backend=backend)
            assert lm.generate("Once upon a time", temperature=0, max_new_tokens=40).startswith(quote), (backend, dtype)
    import subprocess

    r = subprocess.run([sys.executable, "-m", "emergence", "generate", "--model", "emergence-6m", "Once upon a time",
                        "-t", "0", "-n", "40"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "EMERGENCE_HOME": "/nonexistent-store"})
    assert r.returncode == 0 and r.stdout.startswith(quote), r.stderr
