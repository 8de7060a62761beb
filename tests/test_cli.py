"""The `emergence` command line: a few end-to-end runs in a subprocess (`python -m emergence`),
the rest through `emergence.cli.main([...])` in this process, to keep the suite fast.

The reference output is llama2.c's own test vector: stories260K + tok512 at temperature 0
for 200 tokens (SHARED_DATA/llama2c/EXPECTED.md).
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest
from conftest import SHARED_DATA

import emergence
from emergence.cli import main

LLAMA2C = SHARED_DATA / "llama2c"
FIRST_30_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267,
                337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433]


def _expected_200() -> str:
    """llama2.c's expected_stdout (quoted as a Python bytes literal in EXPECTED.md)."""
    text = (LLAMA2C / "EXPECTED.md").read_text(encoding="utf-8")
    literal = re.search(r"^expected_stdout = (b'.*')$", text, re.MULTILINE).group(1)
    return ast.literal_eval(literal).decode("utf-8")


EXPECTED_200 = _expected_200()


def emergence_cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emergence", *args], capture_output=True, text=True,
                          input=input, timeout=timeout)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args: str) -> dict:
    code, out, err = run_main(capsys, "generate", *args, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def lm():
    return emergence.load()


@pytest.fixture(scope="module")
def greedy_30(lm) -> str:
    return lm.generate("", temperature=0, max_new_tokens=30)


def test_expected_vector_parsed():
    assert EXPECTED_200.startswith("Once upon a time, there was a little girl named Lily.")
    assert EXPECTED_200.endswith("Lily didn't want to help her mom, so she")
    assert EXPECTED_200.count("\n") == 3


# ------------------------------------------------------------------------------ generate
def test_generate_greedy_200_end_to_end():
    r = emergence_cli("generate", "--temperature", "0", "--max-new-tokens", "200")
    assert r.returncode == 0, r.stderr
    assert r.stdout == EXPECTED_200 + "\n"


def test_generate_stream_prints_the_same_bytes(capsys):
    code, out, err = run_main(capsys, "generate", "--temperature", "0", "--max-new-tokens", "200", "--stream")
    assert code == 0, err
    assert out == EXPECTED_200 + "\n"
    assert out.encode("utf-8") == EXPECTED_200.encode("utf-8") + b"\n"


def test_generate_json(capsys, lm):
    obj = run_json(capsys, "--temperature", "0", "--max-new-tokens", "200")
    assert obj["text"] == EXPECTED_200
    assert len(obj["token_ids"]) == 200
    assert obj["token_ids"][:30] == FIRST_30_IDS
    assert lm.tokenizer.decode(obj["token_ids"]) == obj["text"]
    assert obj["finish_reason"] == "length"
    assert obj["prompt_tokens"] == 1  # the empty prompt is BOS alone
    assert len(obj["logprobs"]) == 200
    for tid, lp in zip(obj["token_ids"], obj["logprobs"]):
        assert lp["token_id"] == tid
        assert lp["token"] == lm.tokenizer.id_to_piece(tid)
        assert lp["logprob"] <= 0
        assert lp["top"] == []
    assert obj["logprobs"][0]["token"] == "▁Once"
    assert -1.0 < obj["logprobs"][0]["logprob"] < 0


def test_generate_json_logprobs_alternatives(capsys, lm):
    obj = run_json(capsys, "--temperature", "0", "--max-new-tokens", "20", "--logprobs", "2")
    assert obj["token_ids"] == FIRST_30_IDS[:20]
    assert len(obj["logprobs"]) == 20
    for tid, lp in zip(obj["token_ids"], obj["logprobs"]):
        top = lp["top"]
        assert len(top) == 2
        assert top[0]["token_id"] == tid  # greedy: the chosen token is the most likely one
        assert top[0]["logprob"] == pytest.approx(lp["logprob"])
        assert top[0]["logprob"] >= top[1]["logprob"]
        assert top[1]["token_id"] != tid
        assert [t["token"] for t in top] == [lm.tokenizer.id_to_piece(t["token_id"]) for t in top]
    # Agrees with the library's own logprobs.
    c = lm.complete("", temperature=0, max_new_tokens=20, logprobs=2)
    assert [lp["logprob"] for lp in obj["logprobs"]] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-6)


def test_generate_with_prompt(capsys, lm):
    code, out, _ = run_main(capsys, "generate", "Once upon a time", "-t", "0", "-n", "40")
    assert code == 0
    assert out == lm.generate("Once upon a time", temperature=0, max_new_tokens=40) + "\n"
    assert out.startswith(", there was a little girl named Lily.")


def test_generate_seed(capsys):
    def args(seed: int) -> tuple[str, ...]:
        return ("Once upon a time", "--seed", str(seed), "--temperature", "1", "-n", "40")

    a = run_main(capsys, "generate", *args(5))
    b = run_main(capsys, "generate", *args(5))
    c = run_main(capsys, "generate", *args(6))
    assert a[0] == b[0] == c[0] == 0
    assert a[1] == b[1]
    assert a[1] != c[1]
    assert run_json(capsys, *args(5))["text"] + "\n" == a[1]


def test_generate_stop(capsys, lm):
    code, out, _ = run_main(capsys, "generate", "Once upon a time", "-t", "0", "-n", "40", "--stop", "park")
    assert code == 0
    assert out == ", there was a little girl named Lily. She loved to play outside in the \n"
    obj = run_json(capsys, "Once upon a time", "-t", "0", "-n", "40", "--stop", "park", "--stop", "girl")
    assert obj["text"] == ", there was a little "
    assert obj["finish_reason"] == "stop"
    code, out, _ = run_main(capsys, "generate", "Once upon a time", "-t", "0", "-n", "40", "--stop", "park", "--stream")
    assert code == 0
    assert out == ", there was a little girl named Lily. She loved to play outside in the \n"


def test_generate_stop_token_id(capsys, lm):
    obj = run_json(capsys, "-t", "0", "-n", "30", "--stop-token-id", str(FIRST_30_IDS[20]))
    assert obj["token_ids"] == FIRST_30_IDS[:20]
    assert obj["finish_reason"] == "stop"


def test_generate_max_new_tokens(capsys, lm):
    obj = run_json(capsys, "--max-new-tokens", "5", "--temperature", "0")
    assert obj["token_ids"] == FIRST_30_IDS[:5]
    assert obj["text"] == "Once upon a time,"
    assert len(obj["logprobs"]) == 5
    assert obj["finish_reason"] == "length"
    sampled = run_json(capsys, "-n", "5", "--seed", "1", "--ignore-eos")
    assert len(sampled["token_ids"]) == 5


def test_generate_logit_bias(capsys, lm):
    obj = run_json(capsys, "-t", "0", "-n", "6", "--logit-bias", "400=100")
    assert obj["token_ids"] == [400] * 6


def test_generate_stream_json(capsys, lm):
    code, out, _ = run_main(capsys, "generate", "-t", "0", "-n", "30", "--stream", "--json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [t for obj in lines for t in obj["token_ids"]] == FIRST_30_IDS
    assert "".join(obj["text"] for obj in lines) == EXPECTED_200[: len("".join(obj["text"] for obj in lines))]
    assert lines[-1]["finish_reason"] == "length"
    assert all(len(obj["logprobs"]) == len(obj["token_ids"]) for obj in lines)


def test_generate_bad_arguments_exit_1(capsys):
    code, out, err = run_main(capsys, "generate", "-t", "-1")
    assert code == 1 and out == ""
    assert err.startswith("emergence: error:") and "temperature" in err and err.count("\n") == 1
    code, _, err = run_main(capsys, "generate", "--model", "/nonexistent/model")
    assert code == 1 and err.startswith("emergence: error:")
    code, _, err = run_main(capsys, "generate", "--logit-bias", "x")
    assert code == 1 and "--logit-bias" in err


def test_generate_prompt_too_long(capsys, lm):
    long_prompt = "Once upon a time " * 200
    code, out, err = run_main(capsys, "generate", long_prompt, "-t", "0", "-n", "5")
    assert code == 1 and out == "" and "context window" in err
    obj = run_json(capsys, long_prompt, "-t", "0", "-n", "5", "--truncate")
    assert obj["prompt_tokens"] < len(lm.tokenizer.encode(long_prompt))
    assert len(obj["token_ids"]) == 5


# ---------------------------------------------------------------------------------- chat
def plain_reply(lm, messages: list[dict], max_new_tokens: int, **sampling) -> str:
    """What chat answers a base model: the plain User:/Assistant: transcript, greedy."""
    from emergence.chat import encode_prompt, resolve_chat_template

    template = resolve_chat_template(None, missing="plain")
    ids = encode_prompt(lm.tokenizer, template.render(messages, add_generation_prompt=True))
    return lm.generate(ids, max_new_tokens=max_new_tokens, stop=template.stop, **{"temperature": 0, **sampling})


def test_chat_exit():
    r = emergence_cli("chat", "-t", "0", "-n", "20", input="Once upon a time\n/exit\n")
    assert r.returncode == 0, r.stderr
    reply = plain_reply(emergence.load(), [{"role": "user", "content": "Once upon a time"}], 20)
    assert r.stdout == "> " + reply + "\n> "
    assert "Type /? for help, /bye or Ctrl-D to leave." in r.stderr


def test_chat_eof():
    # One turn, then end of input instead of /exit.
    r = emergence_cli("chat", "-n", "10", "--seed", "1", input="Once upon a time\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith("> ") and r.stdout.endswith("\n> ")
    assert len(r.stdout) > len("> \n> ")


def test_chat_immediate_eof(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, _ = run_main(capsys, "chat")
    assert code == 0 and out == "> "


def test_chat_separates_turns_and_keeps_the_conversation(capsys, monkeypatch, lm):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\nThe end.\n"))
    code, out, _ = run_main(capsys, "chat", "-t", "0", "-n", "10")
    assert code == 0
    first = plain_reply(lm, [{"role": "user", "content": "Once upon a time"}], 10)
    second = plain_reply(lm, [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": first},
                              {"role": "user", "content": "The end."}], 10)
    assert out == "> " + first + "\n> " + second + "\n> "


def test_plain_chat_honours_the_context_policy(capsys, monkeypatch):
    import io

    line = "Lily and Ben went to the park to play with a big red ball. " * 6  # ~90 tokens a message
    monkeypatch.setattr(sys, "stdin", io.StringIO((line + "\n") * 6))
    code, out, err = run_main(capsys, "chat", "-t", "0", "-n", "30", "--context-policy", "drop-oldest")
    assert code == 0 and out.count("> ") == 7
    assert "dropped the 2 oldest messages" in err  # 6 x (90 + 30) tokens outgrow 512
    monkeypatch.setattr(sys, "stdin", io.StringIO((line + "\n") * 6))
    code, out, err = run_main(capsys, "chat", "-t", "0", "-n", "30", "--context-policy", "error")
    # the message that would not fit is refused, not answered, and the chat goes on
    assert code == 0 and "context policy 'error'" in err
    assert out.count("> ") == 7 and out.count("\n") == 2  # two turns fit, the next four are refused
    assert err.count("(/clear starts afresh)") == 4


def test_chat_commands(capsys, monkeypatch, lm):
    # Ollama's in-chat commands: none of them reaches the model.
    import io

    commands = ["/?", "/set parameter temperature 0", "/set parameter num_predict 6", "/set system Be brief.",
                "/show parameters", "/show system", "/show info", "/show template", "/show nonsense",
                "/set parameter top_k many", "/frobnicate", "Once upon a time", "/clear", "Tom", "/bye",
                "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(commands) + "\n"))
    code, out, err = run_main(capsys, "chat")
    assert code == 0
    system = {"role": "system", "content": "Be brief."}
    first = plain_reply(lm, [system, {"role": "user", "content": "Once upon a time"}], 6)
    second = plain_reply(lm, [system, {"role": "user", "content": "Tom"}], 6)  # /clear forgot the first turn
    assert out == "> " * 12 + first + "\n> > " + second + "\n> "
    assert "/set parameter NAME VALUE" in err and "/bye" in err  # the help
    assert "Set parameter 'num_predict' to '6'" in err and "Set system message." in err
    assert "  temperature          0.0\n  max_new_tokens       6\n" in err
    assert "Be brief.\n" in err and "  parameters    260,032\n" in err and "  plain\n" in err
    assert "usage: /show info|parameters|system|template" in err
    assert "error: /set parameter: top_k takes an integer, got 'many'" in err
    assert "Unknown command '/frobnicate'. Type /? for help" in err
    assert "Cleared session context." in err


# ---------------------------------------------------------------------------------- info
def test_info_default(capsys):
    code, out, _ = run_main(capsys, "info")
    assert code == 0
    assert re.search(r"^parameters\s+260,032$", out, re.MULTILINE)
    assert re.search(r"^context_length\s+512$", out, re.MULTILINE)
    assert re.search(r"^architecture\s+llama$", out, re.MULTILINE)


def test_info_json(capsys):
    code, out, _ = run_main(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["parameters"] == 260032
    assert info["context_length"] == 512
    assert info["vocab_size"] == 512
    assert (info["layers"], info["heads"], info["kv_heads"], info["embedding"]) == (5, 8, 4, 64)
    assert info["dtype"] == "float32"
    assert info["bytes"] == 4 * 260032
    assert info["tied_embeddings"] is True
    assert info["architecture"] == "llama"


def test_info_hf_folder(capsys, hf_model):
    family, hf, folder = hf_model
    code, out, _ = run_main(capsys, "info", str(folder), "--json")
    assert code == 0
    info = json.loads(out)
    cfg = hf.config
    assert info["parameters"] == hf.num_parameters()
    assert info["architecture"] == family
    assert info["vocab_size"] == 96
    assert info["context_length"] == 256
    assert info["layers"] == 2 and info["heads"] == 4 and info["embedding"] == 64
    assert info["kv_heads"] == getattr(cfg, "num_key_value_heads", 4)
    assert info["sliding_window"] == (8 if family == "mistral" else None)
    assert info["tied_embeddings"] == (family in ("gpt2", "qwen2"))
    code, out, _ = run_main(capsys, "info", str(folder))
    assert code == 0 and re.search(rf"^parameters\s+{hf.num_parameters():,}$", out, re.MULTILINE)


def test_info_missing_model(capsys, tmp_path):
    code, _, err = run_main(capsys, "info", str(tmp_path / "nothing"))
    assert code == 1 and err.startswith("emergence: error:")


# ------------------------------------------------------------------ convert and dtypes
def test_convert_llama2c_and_generate(capsys, tmp_path, greedy_30):
    dst = tmp_path / "stories"
    code, out, err = run_main(capsys, "convert", str(LLAMA2C / "stories260K.bin"), str(dst),
                              "--tokenizer", str(LLAMA2C / "tok512.bin"))
    assert code == 0, err
    assert "wrote" in out and str(dst) in out
    assert (dst / "config.json").is_file() and (dst / "tokenizer.json").is_file()
    code, out, err = run_main(capsys, "generate", "--model", str(dst), "-t", "0", "-n", "30")
    assert code == 0, err
    assert out == greedy_30 + "\n"
    assert out == EXPECTED_200[: len(greedy_30)] + "\n"
    code, out, _ = run_main(capsys, "info", str(dst), "--json")
    assert json.loads(out)["parameters"] == 260032


def test_generate_from_llama2c_files_directly(capsys, greedy_30):
    code, out, err = run_main(capsys, "generate", "--model", str(LLAMA2C / "stories260K.bin"),
                              "--tokenizer", str(LLAMA2C / "tok512.bin"), "-t", "0", "-n", "30")
    assert code == 0, err
    assert out == greedy_30 + "\n"
    code, _, err = run_main(capsys, "generate", "--model", str(LLAMA2C / "stories260K.bin"), "-n", "3")
    assert code == 1 and "tokenizer" in err


def test_bf16(capsys):
    code, out, err = run_main(capsys, "generate", "--dtype", "bf16", "-t", "0", "-n", "30", "--json")
    assert code == 0, err
    obj = json.loads(out)
    expected = emergence.load(dtype="bf16").complete("", temperature=0, max_new_tokens=30)
    assert obj["token_ids"] == expected.token_ids
    assert obj["text"] == expected.text
    code, out, _ = run_main(capsys, "info", "--dtype", "bf16", "--json")
    info = json.loads(out)
    assert info["dtype"] == "bfloat16"
    assert info["bytes"] == 2 * 260032
    code, out, _ = run_main(capsys, "info", "--dtype", "bf16")
    assert re.search(r"^dtype\s+bfloat16$", out, re.MULTILINE)


def test_convert_to_bf16(capsys, tmp_path):
    dst = tmp_path / "bf16"
    code, out, err = run_main(capsys, "convert", "stories260K", str(dst), "--dtype", "bf16")
    assert code == 0, err
    assert "bfloat16" in out
    code, out, _ = run_main(capsys, "info", str(dst), "--json")
    assert json.loads(out)["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------- help
def test_help_lists_the_verbs():
    r = emergence_cli("--help")
    assert r.returncode == 0
    for verb in ("generate", "chat", "info", "convert"):
        assert verb in r.stdout


def test_chat_with_a_template_keeps_the_conversation_within_the_context(capsys, monkeypatch):
    import io

    from emergence.chat import ChatTemplate, fit_context

    line = "the cat sat on the mat and looked at the dog " * 12  # about 130 tokens a message
    monkeypatch.setattr(sys, "stdin", io.StringIO((line + "\n") * 4))
    code, out, err = run_main(capsys, "chat", "--model", "emergence-6m", "--chat-template", "chatml",
                              "-t", "0", "-n", "8")
    assert code == 0
    replies = out.split("> ")[1:-1]
    assert len(replies) == 4
    # the first reply is the model's greedy answer to the rendered one-message conversation
    lm = emergence.load("emergence-6m")
    template = ChatTemplate.builtin("chatml")
    first = fit_context([{"role": "user", "content": line}], lm.tokenizer, template, context_window=512, reserve=8)
    expected = lm.generate(first.token_ids, temperature=0, max_new_tokens=8, stop=template.stop)
    assert replies[0] == expected + "\n"
    # four 130-token messages and their replies outgrow 512 tokens: the oldest turns are dropped, said on stderr
    assert "dropped the 2 oldest messages" in err
