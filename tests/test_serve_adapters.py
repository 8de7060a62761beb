"""Adapters in the runtime: a Modelfile's ADAPTER in the store, and a server that picks the
adapter per request by model name, every adapter on the one base, one batch mixing them."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

import emergence
from conftest import in_threads, make_hf_model
from emergence.adapters import LoraSpec, add_adapter, save_adapter
from emergence.adapters.lora import lora_modules
from emergence.errors import InvalidArgument
from emergence.serve.app import app_for, serve_in_thread
from emergence.store import Store, parse_modelfile
from emergence.weights.hf import load_hf


def _adapter(folder, out, seed: int, dora: bool = False):
    """An adapter with random B (non-zero: it changes the answers), saved in PEFT's format."""
    model, _ = load_hf(folder)
    add_adapter(model, LoraSpec(r=4, alpha=8, targets="all-linear", dora=dora), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, out)
    return out


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_hf_model("llama", root / "base")
    return root / "base", _adapter(root / "base", root / "a", 1), _adapter(root / "base", root / "b", 2, dora=True)


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_the_server_picks_the_adapter_by_model_name_and_batches_them_together(base_and_adapters):
    base, a, b = base_and_adapters
    prompts = [" ".join(f"t{(7 * k + j) % 90 + 4}" for j in range(3 + k % 5)) for k in range(24)]
    names = ["base", "tuned-a", "tuned-b"]
    expected = {}
    for name, adapter in zip(names, (None, a, b)):
        lm = emergence.load(base, device="cpu", adapter=adapter)
        expected[name] = [lm.complete(p, temperature=0, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    assert expected["tuned-a"] != expected["base"] and expected["tuned-b"] != expected["tuned-a"]

    app = app_for(str(base), slots=12, device="cpu", adapters={"tuned-a": str(a), "tuned-b": str(b)})
    assert app.name == "base"  # the base folder's name
    server, thread = serve_in_thread(app, port=0)
    port = server.server_address[1]
    try:
        listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10).read())
        assert [m["id"] for m in listed["data"]] == names
        # every adapter hangs off the one base: one LoraLinear per projection, holding both
        layers = lora_modules(app.lm.model)
        assert layers and all(set(m.adapters) == {"tuned-a", "tuned-b"} for m in layers.values())
        steps_before = app.engine.steps
        got: dict[tuple[int, str], list[int]] = {}

        def client(k: int) -> None:
            for name in names:
                body = {"model": name, "prompt": prompts[k], "max_tokens": 12, "temperature": 0, "logprobs": 0,
                        "ignore_eos": True}
                reply = _post(port, body)
                assert reply["model"] == name
                got[k, name] = reply["choices"][0]["logprobs"]["token_ids"] \
                    if "token_ids" in reply["choices"][0]["logprobs"] else reply["choices"][0]["text"]

        in_threads(client, len(prompts))
        steps = app.engine.steps - steps_before
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        app.close()
    tokenizer = emergence.load(base, device="cpu").tokenizer
    for (k, name), answer in got.items():
        want = expected[name][k]
        assert answer == (want if isinstance(answer, list) else tokenizer.decode(want)), (k, name)
    assert steps < 0.5 * 12 * len(got)  # the requests really shared steps (and so batches mixed adapters)


def test_a_modelfile_adapter_makes_a_store_model_that_loads_with_it(base_and_adapters, tmp_path, monkeypatch):
    base, a, _ = base_and_adapters
    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "home"))
    (tmp_path / "Modelfile").write_text(f"FROM {base}\nADAPTER {a}\nPARAMETER temperature 0\n")
    modelfile = parse_modelfile((tmp_path / "Modelfile").read_text(), base_dir=tmp_path)
    assert modelfile.adapter == str(a)
    assert parse_modelfile(modelfile.to_text(), base_dir=tmp_path).adapter == str(a)
    entry = Store().create("tuned", modelfile)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(entry.manifest.files)
    stored = emergence.load("tuned", device="cpu")
    direct = emergence.load(base, device="cpu", adapter=a)
    prompt = "t5 t9 t11"
    assert stored.complete(prompt, temperature=0, max_new_tokens=16, ignore_eos=True).token_ids == \
        direct.complete(prompt, temperature=0, max_new_tokens=16, ignore_eos=True).token_ids


def test_a_modelfile_adapter_for_another_base_is_refused_before_anything_is_written(base_and_adapters, tmp_path,
                                                                                    monkeypatch):
    base, a, _ = base_and_adapters
    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "home"))
    make_hf_model("qwen2", tmp_path / "other")  # one key/value head where the llama base has two
    modelfile = parse_modelfile(f"FROM {tmp_path / 'other'}\nADAPTER {a}\n")
    with pytest.raises(InvalidArgument, match="another base"):
        Store().create("wrong", modelfile)
    assert Store().names() == []


def test_show_modelfile_of_an_entry_with_an_adapter_recreates_it(base_and_adapters, tmp_path, monkeypatch, capsys):
    from conftest import cli_main

    base, a, _ = base_and_adapters
    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "home"))
    Store().create("tuned", parse_modelfile(f"FROM {base}\nADAPTER {a}\n"))
    code, text, _ = cli_main(capsys, "show", "tuned", "--modelfile")
    assert code == 0 and "\nADAPTER " in text
    Store().create("again", parse_modelfile(text))
    prompt = "t5 t9 t11"
    assert emergence.load("again", device="cpu").complete(prompt, temperature=0, max_new_tokens=16).token_ids == \
        emergence.load(base, device="cpu", adapter=a).complete(prompt, temperature=0, max_new_tokens=16).token_ids


def test_an_imported_fine_tune_keeps_the_chat_template_it_was_tuned_with(base_and_adapters, tmp_path, monkeypatch):
    """emergence merge writes the adapter's chat_template.jinja beside the weights; import keeps it."""
    from emergence.chat import ChatTemplate, find_model_template
    from emergence.finetune.merge import merge_adapter

    base, a, _ = base_and_adapters
    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "home"))
    tuned = tmp_path / "with-template"
    tuned.mkdir()
    for f in a.iterdir():
        (tuned / f.name).write_bytes(f.read_bytes())
    (tuned / "chat_template.jinja").write_text(ChatTemplate.builtin("chatml").source)
    merge_adapter(str(base), tuned, tmp_path / "merged")
    entry = Store().import_model(tmp_path / "merged", "instruct")
    assert "chat_template.jinja" in entry.manifest.files
    assert find_model_template(entry.model_path).source == ChatTemplate.builtin("chatml").source
