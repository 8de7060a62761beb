"""Fine-tuning end to end on the packaged emergence-6m: LoRA lowers the held-out loss and
writes a PEFT folder that loads over the untouched base; an interrupted run resumed from its
checkpoint repeats the uninterrupted one exactly; full, DoRA and QLoRA runs; merging (float
and requantized); packed rows that never attend or predict across examples; and bad input
refused in one line with nothing written.

Runs go through `finetune()` in this process (a few steps on tens of tiny rows, a small
context) and through `emergence.cli.main` where the command line is what is tested.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import emergence
from emergence.adapters.lora import LoraSpec, add_adapter
from emergence.adapters.peft_format import load_adapter, save_adapter
from emergence.chat import ChatTemplate
from emergence.finetune import data as sft
from emergence.finetune.merge import merge_adapter
from emergence.finetune.run import FinetuneConfig, FinetuneRun, finetune
from emergence.quant.linear import quantize_model
from emergence.train import trainer
from emergence.train.checkpoint import load_checkpoint
from emergence.train.objectives import IGNORE_INDEX, next_token_loss
from emergence.train.trainer import TrainConfig, _Dist
from emergence.weights.safetensors_io import SafetensorsFile

from conftest import SHARED_DATA, assert_one_line_error, cli_main, make_hf_model

MODEL = "emergence-6m"
EVAL_TEXT = SHARED_DATA / "tinystories" / "valid" / "hf_TinyStories_validation.head.txt"
SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "lion": "roar", "frog": "croak",
          "bird": "tweet", "sheep": "baa"}


# ------------------------------------------------------------------------------- helpers
def write_rows(path: Path, count: int = 40) -> Path:
    """Alpaca rows with one answer per question: a pattern a few LoRA steps pick up."""
    animals = list(SOUNDS)
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            a = animals[i % len(animals)]
            f.write(json.dumps({"instruction": f"What does the {a} say?", "output": f"The {a} says {SOUNDS[a]}."})
                    + "\n")
    return path


def configs(data: Path, out: Path, *, steps: int, **fc_settings) -> tuple[FinetuneConfig, TrainConfig]:
    fc = FinetuneConfig(model=MODEL, data=[str(data)], chat_template="chatml", val_fraction=0.2,
                        **{"r": 4, "alpha": 8.0, "targets": ["q", "v", "down"], **fc_settings})
    tc = TrainConfig(data=str(data), out=str(out), init=MODEL, max_steps=steps, batch_size=4, lr=3e-3, min_lr=0.0,
                     warmup_steps=0, weight_decay=0.0, eval_every=steps, checkpoint_every=steps, sample_tokens=2,
                     seed=7, device="cpu", dtype="fp32", progress=False)
    return fc, tc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def held_out_loss(model: torch.nn.Module, fc: FinetuneConfig, tc: TrainConfig) -> float:
    """The held-out loss as the run's evaluation computes it (its rows, batches and weighting)."""
    probe = replace(tc, out=str(Path(tc.out).parent / "probe-never-written"))
    run = FinetuneRun(replace(fc), probe, _Dist(), resume=False)
    model.eval()

    def loss(inputs, targets, extras):  # the loop's batch_loss: extras hold a packed batch's segments
        return next_token_loss(model(inputs, segment_ids=extras.get("segments")), targets)

    return trainer.evaluate(model, loss, run.batches, _Dist(), torch.device("cpu"), contextlib.nullcontext())


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.tensor([ids])).float()


def probe_ids(lm) -> list[int]:
    return lm.tokenizer.encode("<|im_start|>user\nWhat does the cow say?<|im_end|>\n<|im_start|>assistant\n")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """torch on one thread (the module-wide `one_thread`): a 6M model trains fastest so on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "rows.jsonl")


@pytest.fixture(scope="module")
def base():
    return emergence.load(MODEL, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def lora_run(rows, tmp_path_factory):
    """A 12-step LoRA run (r 4, alpha 8 on q, v and down): (fc, tc, out, result)."""
    fc, tc = configs(rows, tmp_path_factory.mktemp("lora") / "run", steps=12)
    result = finetune(replace(fc), replace(tc))
    return fc, tc, Path(tc.out), result


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def other_base_adapter(request, tmp_path_factory) -> tuple[str, Path]:
    """A LoRA adapter made for a tiny GPT-2 (another family: other module names) or a tiny
    Llama (the same names, other shapes): (family, folder)."""
    folder = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, folder / "model")
    model = emergence.load(folder / "model", device="cpu").model
    add_adapter(model, LoraSpec(r=2, targets="all-linear"), generator=torch.Generator().manual_seed(0))
    return request.param, save_adapter(model, folder / "adapter", base=f"tiny-{request.param}")


# ------------------------------------------------------------------------------- 1. LoRA
def test_lora_lowers_the_held_out_loss_and_writes_a_peft_adapter(lora_run, base):
    fc, tc, out, result = lora_run
    folder = out / "adapter"
    assert result.model_dir == folder and result.step == 12
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 4, 8.0, False)
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == MODEL
    assert (folder / "chat_template.jinja").read_text() == ChatTemplate.builtin("chatml").source
    report = json.loads((folder / "finetune_data.json").read_text())
    assert (report["rows"], report["dropped"], report["truncated"]) == (40, 0, 0)

    tuned = emergence.load(MODEL, device="cpu", dtype="fp32", adapter=folder)
    # The adapter as saved gives the run's own last evaluation, and that is well below the base's.
    base_loss, tuned_loss = held_out_loss(base.model, fc, tc), held_out_loss(tuned.model, fc, tc)
    assert tuned_loss == pytest.approx(result.val_loss, abs=1e-5)
    assert tuned_loss < base_loss - 1.0, (base_loss, tuned_loss)
    assert metrics(out)[-1]["val_loss"] == pytest.approx(result.val_loss, abs=1e-12)

    # Only adapter tensors differ: every base weight under the adapter is the packaged one, bit for bit.
    plain = base.model.state_dict()
    adapted = {k.replace(".base.", "."): v for k, v in tuned.model.state_dict().items() if ".adapters." not in k}
    assert adapted.keys() == plain.keys()
    assert all(torch.equal(adapted[k], plain[k]) for k in plain)
    ids = probe_ids(base)
    assert (logits(tuned.model, ids) - logits(base.model, ids)).abs().max() > 1e-2


def test_a_lora_checkpoint_holds_only_the_adapter(lora_run, base):
    fc, tc, out, _ = lora_run
    state = load_checkpoint(out)
    assert state["step"] == 12 and state["finetune_config"]["targets"] == ["q", "v", "down"]
    n_layer = base.config.n_layer
    # q and v (two parts of qkv_proj) and down, each an A and a B, in every layer.
    assert len(state["model"]) == 6 * n_layer
    assert all(".adapters.default.lora_" in k for k in state["model"])
    trained = sum(t.numel() for t in state["model"].values())
    assert trained == n_layer * 4 * ((256 + 256) + (256 + 256) + (704 + 256))  # r x (in + out) per part
    assert (out / "checkpoint.pt").stat().st_size < 10 * trained * 4  # tensors + Adam moments, not the base
    assert (out / "checkpoint.pt").stat().st_size < base.model.num_parameters()


# ------------------------------------------------------------------------------ 2. resume
class Killed(BaseException):
    pass


def test_an_interrupted_lora_run_resumes_exactly(rows, tmp_path, monkeypatch, capsys):
    """Through the command line: killed right after its step-4 checkpoint, then `--resume`."""
    def args(out, *extra):
        return ["finetune", MODEL, "--data", rows, "--out", out, "--chat-template", "chatml", "--r", "4",
                "--alpha", "8", "--target", "q,v,o", "--lora-dropout", "0.1", "--val-fraction", "0.2", "--max-steps",
                "8", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--checkpoint-every", "4",
                "--eval-every", "4", "--sample-tokens", "2", "--seed", "3", "--device", "cpu", "--no-progress", *extra]

    torch.manual_seed(0)  # the global RNG as another caller left it: a run must not depend on it
    code, _, err = cli_main(capsys, *args(tmp_path / "reference"))
    assert code == 0, err
    reference = metrics(tmp_path / "reference")
    assert [r["step"] for r in reference] == list(range(1, 9))
    assert [r["step"] for r in reference if "val_loss" in r] == [4, 8]

    out = tmp_path / "interrupted"
    real_save = trainer.save_checkpoint

    def save_then_die(state, folder):
        real_save(state, folder)
        if state["step"] == 4:
            raise Killed

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    torch.manual_seed(12345)
    with pytest.raises(Killed):
        cli_main(capsys, *args(out))
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    assert load_checkpoint(out)["step"] == 4 and not (out / "adapter").exists()

    # Resuming with another adapter shape is refused, naming what changed; the checkpoint is kept.
    code, _, err = cli_main(capsys, *args(out, "--resume", "--r", "8"))
    assert_one_line_error(code, err, r"different fine-tuning settings: r was 4, now 8")
    assert load_checkpoint(out)["step"] == 4

    torch.manual_seed(999)
    code, stdout, err = cli_main(capsys, *args(out, "--resume"))
    assert code == 0, err
    assert "resuming at step 4" in stdout.splitlines()[0]
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for ref, row in zip(reference, resumed):
        assert row["train_loss"] == ref["train_loss"], (ref, row)
        assert row.get("val_loss") == ref.get("val_loss"), (ref, row)

    a, b = (SafetensorsFile(folder / "adapter" / "adapter_model.safetensors")
            for folder in (tmp_path / "reference", out))
    assert a.keys() == b.keys() and len(a.keys()) == 3 * 2 * 6  # q, v, o: an A and a B each, 6 layers
    assert all(torch.equal(a.tensor(k, copy=True), b.tensor(k, copy=True)) for k in a.keys())
    # The checkpoint keeps the adapter and its optimizer state only.
    state = load_checkpoint(out)
    assert len(state["model"]) == len(a.keys()) and all(".adapters." in k for k in state["model"])
    assert len(state["optimizer"]["state"]) == len(a.keys())


# ------------------------------------------------------------------- 3. full, DoRA, QLoRA
def test_full_fine_tuning_trains_every_weight(rows, tmp_path, base):
    fc, tc = configs(rows, tmp_path / "full", steps=2, method="full")
    tc.batch_size, tc.lr = 2, 1e-3
    result = finetune(fc, tc)
    assert result.model_dir == tmp_path / "full" / "model" and not (tmp_path / "full" / "adapter").exists()
    tuned = emergence.load(result.model_dir, device="cpu", dtype="fp32")
    assert (result.model_dir / "chat_template.jinja").is_file()
    before, after = base.model.state_dict(), tuned.model.state_dict()
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    assert len(load_checkpoint(tmp_path / "full")["model"]) == len(before)


def test_dora_trains_magnitudes(rows, tmp_path, base):
    fc, tc = configs(rows, tmp_path / "dora", steps=2, method="dora", targets=["q", "v"])
    result = finetune(fc, tc)
    folder = result.model_dir
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    file = SafetensorsFile(folder / "adapter_model.safetensors")
    magnitudes = sorted(k for k in file.keys() if k.endswith(".lora_magnitude_vector"))
    assert len(magnitudes) == 2 * base.config.n_layer
    q = base.config.n_head * base.config.head_dim
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    start = base.model.layers[0].attn.qkv_proj.weight[:q].norm(dim=1)  # DoRA's initial magnitude
    trained = file.tensor(name, copy=True)
    assert trained.shape == start.shape
    assert 1e-5 < (trained - start).abs().max() < 0.05 * start.abs().max()
    tuned = emergence.load(MODEL, device="cpu", dtype="fp32", adapter=folder)
    assert held_out_loss(tuned.model, fc, tc) == pytest.approx(result.val_loss, abs=1e-5)
    # Merged, DoRA's rescaled rows give the unmerged adapter's logits.
    merge_adapter(MODEL, folder, tmp_path / "merged")
    merged = emergence.load(tmp_path / "merged", device="cpu", dtype="fp32")
    ids = probe_ids(merged)
    assert (logits(merged.model, ids) - logits(tuned.model, ids)).abs().max() < 1e-4
    assert (logits(merged.model, ids) - logits(base.model, ids)).abs().max() > 1e-3


def test_qlora_on_an_nf4_base(rows, tmp_path, capsys):
    fc, tc = configs(rows, tmp_path / "qlora", steps=3, quantize="nf4")
    capsys.readouterr()
    result = finetune(fc, tc)
    assert "LoRA r=4 alpha=8 on a nf4 base" in capsys.readouterr().out
    assert math.isfinite(result.val_loss)
    # The adapter loads over a float base, and over the nf4 base it was trained on gives the run's loss.
    tuned = emergence.load(MODEL, device="cpu", dtype="fp32", adapter=result.model_dir)
    assert math.isfinite(held_out_loss(tuned.model, fc, tc))
    model = emergence.load(MODEL, device="cpu", dtype="fp32").model
    quantize_model(model, "nf4")
    load_adapter(model, result.model_dir)
    assert held_out_loss(model, fc, tc) == pytest.approx(result.val_loss, abs=1e-5)


def test_merge_matches_the_unmerged_adapter(lora_run, tmp_path, capsys):
    adapter = lora_run[2] / "adapter"
    code, out, err = cli_main(capsys, "merge", MODEL, "--adapter", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = emergence.load(tmp_path / "merged", device="cpu", dtype="fp32")
    unmerged = emergence.load(MODEL, device="cpu", dtype="fp32", adapter=adapter)
    assert not any(".adapters." in k for k in merged.model.state_dict())
    ids = probe_ids(merged)
    diff = (logits(merged.model, ids) - logits(unmerged.model, ids)).abs().max()
    assert diff < 1e-4, diff
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == ChatTemplate.builtin("chatml").source


def test_merge_requantized_reports_the_perplexity_change(lora_run, tmp_path, capsys):
    from emergence.evaluate import perplexity

    text = tmp_path / "held_out.txt"
    text.write_text(EVAL_TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    out_dir = tmp_path / "merged-nf4"
    code, out, err = cli_main(capsys, "merge", MODEL, "--adapter", lora_run[2] / "adapter", "--out", out_dir,
                         "--requantize", "nf4", "--eval", text)
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("held-out perplexity:"))
    found = re.fullmatch(r"held-out perplexity: ([\d.]+) with the adapter unmerged, ([\d.]+) merged and "
                         r"requantized to nf4 \(([+-][\d.]+)%\)", line)
    assert found, line
    unmerged, merged, change = map(float, found.groups())
    assert all(math.isfinite(v) and v > 1 for v in (unmerged, merged))
    assert change == pytest.approx(100 * (merged / unmerged - 1), abs=0.05)  # (from the rounded values)
    assert abs(change) < 5, line  # requantizing a small update moves perplexity little
    lm = emergence.load(out_dir, device="cpu")
    assert any(type(m).__name__ == "NF4Linear" for m in lm.model.modules())
    tokens = torch.tensor(lm.tokenizer.encode(text.read_text(encoding="utf-8"), add_bos=False))
    with torch.no_grad():
        again = perplexity(lm.model.eval(), tokens, context=min(lm.config.block_size, 256),
                           bos_id=lm.tokenizer.bos_id)[0]
    assert again == pytest.approx(merged, rel=1e-3)  # what was written is what was measured


# ------------------------------------------------------------------------------ 4. packing
def test_packed_rows_never_cross_an_example(rows, tmp_path, base):
    fc, tc = configs(rows, tmp_path / "never", steps=1, pack=True)
    tc.context = 128
    run = FinetuneRun(fc, tc, _Dist(), resume=False)
    packed = run.batches.rows
    examples = sorted((e.ids for e in sft.split_held_out(
        sft.load_examples([str(rows)], run.tokenizer, run.template, context=128)[0], 0.2, tc.seed)[0]))
    assert len(packed) < len(examples)  # several examples share a row
    assert sorted(ids for r in packed for ids in _segments(r.ids, r.segments)) == examples

    batch = run.batches.train_batch(0)
    assert batch.inputs.shape == (tc.batch_size, 128)
    for b in range(tc.batch_size):
        seg, tgt = batch.segments[b], batch.targets[b]
        # the last token of each example but the row's last (whose next slot is padding, segment -1)
        crossing = ((seg[1:] != seg[:-1]) & (seg[1:] >= 0)).nonzero().flatten()
        assert len(crossing) >= 1
        assert (tgt[crossing] == IGNORE_INDEX).all()  # a token never predicts the next example's first

    # Model level: logits of a packed row are those of each example run alone.
    model = base.model.eval()
    with torch.no_grad():
        together = model(batch.inputs, segment_ids=batch.segments)
        for b in range(tc.batch_size):
            seg = batch.segments[b]
            for s in seg.unique().tolist():
                if s < 0:
                    continue
                where = (seg == s).nonzero().flatten()
                alone = model(batch.inputs[b, where][None])[0]
                # (a packed row's GEMMs sum in another blocking than one example's: float32 rounding of
                # logits ~5, 1.2e-5 seen on some CPUs)
                assert (together[b, where] - alone).abs().max() < 5e-5

    # A packed run evaluates on packed held-out rows the same way: its adapter reproduces its loss.
    tc.max_steps = tc.eval_every = tc.checkpoint_every = 2
    result = finetune(replace(fc), replace(tc))
    tuned = emergence.load(MODEL, device="cpu", dtype="fp32", adapter=result.model_dir)
    assert held_out_loss(tuned.model, fc, tc) == pytest.approx(result.val_loss, abs=1e-5)
    assert held_out_loss(tuned.model, fc, tc) < held_out_loss(model, fc, tc)


@pytest.mark.parametrize("family", ["gpt2", "mistral"])
def test_packing_is_exact_for_learned_positions_and_sliding_windows(family, tmp_path):
    make_hf_model(family, tmp_path)
    model = emergence.load(tmp_path, device="cpu", dtype="fp32").model.eval()
    g = torch.Generator().manual_seed(0)
    lengths = [11, 5, 14]  # longer than mistral's window of 8
    parts = [torch.randint(4, 96, (n,), generator=g) for n in lengths]
    ids = torch.cat(parts)[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        together = model(ids, segment_ids=segments)[0]
        at = 0
        for part in parts:
            alone = model(part[None])[0]
            assert (together[at:at + len(part)] - alone).abs().max() < 5e-5
            at += len(part)


def _segments(ids: list[int], segments: list[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, s in zip(ids, segments):
        out.setdefault(s, []).append(i)
    return list(out.values())


# ------------------------------------------------------------------- 5. refused in one line
def _finetune_args(data: Path, out: Path, *extra) -> list:
    """A one-step run; emergence-6m has no chat template: chatml unless `extra` gives --chat-template
    (NAME, or None for no flag at all)."""
    extra = list(extra)
    if "--chat-template" in extra:
        at = extra.index("--chat-template")
        if extra[at + 1] is None:
            del extra[at:at + 2]
    else:
        extra += ["--chat-template", "chatml"]
    return ["finetune", MODEL, "--data", data, "--out", out, "--max-steps", "1", "--batch-size", "2", "--context",
            "64", "--device", "cpu", "--no-progress", *extra]


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


GOOD = {"instruction": "What does the cat say?", "output": "The cat says meow."}
LONG = {"instruction": "Tell a story.", "output": "Once upon a time. " * 20}  # a cut keeps part of the answer


@pytest.mark.parametrize("lines, extra, patterns", [
    ([GOOD, {"instruction": "No answer here"}], (), [r"rows\.jsonl:2", r"missing 'output'"]),
    ([GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}], (),
     [r"rows\.jsonl:2: a chat row in a alpaca file"]),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}], (),
     [r"rows\.jsonl:1", r"assistant turn 1 \(message 1\) is empty"]),
    ([LONG, LONG, LONG], (), [r"all 3 rows were dropped", r"longer than context\+1 = 65"]),
    ([{"question": "q", "answer": "a"}], (), [r"rows\.jsonl:1", r"unknown row format", r"alpaca", r"sharegpt"]),
    ([GOOD] * 4, ("--target", "nope"), [r"match nothing", r"available: down_proj, gate_proj, k_proj, o_proj, q_proj"]),
    ([GOOD] * 4, ("--r", "0"), [r"rank r must be a positive integer, got 0"]),
    ([GOOD] * 4, ("--alpha", "0"), [r"--alpha must be positive, got 0"]),
    ([GOOD] * 4, ("--quantize", "nf4", "--full"), [r"--quantize goes with --lora or --dora, not --full"]),
    ([GOOD] * 4, ("--chat-template", None), [r"this model has no chat template", r"chatml", r"vicuna"]),
    ([GOOD] * 4, ("--chat-template", "chatnl"), [r"unknown chat template 'chatnl'", r"chatml"]),
], ids=["missing-field", "mixed-formats", "empty-assistant", "all-too-long", "unknown-format", "no-target",
        "rank-0", "alpha-0", "quantize-full", "no-template", "unknown-template"])
def test_bad_finetune_input_is_refused_in_one_line(lines, extra, patterns, tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", lines)
    out = tmp_path / "out"
    code, _, err = cli_main(capsys, *_finetune_args(data, out, *extra))
    assert_one_line_error(code, err, *patterns)
    assert not out.exists(), sorted(p.name for p in out.iterdir())


def test_rows_longer_than_the_context_are_dropped_or_truncated_and_said_so(tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", [GOOD] * 6 + [LONG])
    code, out, err = cli_main(capsys, *_finetune_args(data, tmp_path / "dropped", "--val-fraction", "0"))
    assert code == 0, err
    start = out.splitlines()[0]
    assert "6 rows" in start and "1 dropped" in start, start
    assert json.loads((tmp_path / "dropped" / "adapter" / "finetune_data.json").read_text())["dropped"] == 1

    code, out, err = cli_main(capsys, *_finetune_args(data, tmp_path / "cut", "--val-fraction", "0", "--truncate"))
    assert code == 0, err
    start = out.splitlines()[0]
    assert "7 rows" in start and "1 truncated" in start and "dropped" not in start, start


@pytest.mark.parametrize("verb", ["merge", "generate"])
def test_an_adapter_for_another_base_is_refused(verb, other_base_adapter, tmp_path, capsys):
    family, adapter = other_base_adapter
    args = (["merge", MODEL, "--adapter", adapter, "--out", tmp_path / "m"] if verb == "merge" else
            ["generate", "--model", MODEL, "--adapter", adapter, "-n", "2", "Once"])
    code, out, err = cli_main(capsys, *args)
    mismatch = ([r"transformer\.h\.0\.attn\.c_attn\.lora_A\.weight names no projection of this llama model"]
                if family == "gpt2" else [r"model\.layers\.0\.mlp\.down_proj\.lora_A: adapter \(2, 96\), this "
                                          r"model needs \(2, 704\)"])
    assert_one_line_error(code, err, r"another base", *mismatch)
    assert not (tmp_path / "m").exists() and out == ""


@pytest.mark.parametrize("verb", ["merge", "generate"])
def test_an_adapter_folder_without_its_config_is_refused(verb, lora_run, tmp_path, capsys):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((lora_run[2] / "adapter" / "adapter_model.safetensors")
                                                       .read_bytes())
    args = (["merge", MODEL, "--adapter", folder, "--out", tmp_path / "m"] if verb == "merge" else
            ["generate", "--model", MODEL, "--adapter", folder, "-n", "2", "Once"])
    code, out, err = cli_main(capsys, *args)
    assert_one_line_error(code, err, r"has no adapter_config\.json")
    assert not (tmp_path / "m").exists() and out == ""


# ------------------------------------------------------------------------ DDP and FSDP2
def test_ddp_and_fsdp_fine_tuning_match_one_process(rows, tmp_path):
    """2 ranks x batch 2 against one process x batch 2 with 2 accumulation steps (as pretraining's
    test): the same micro-batches, gradients halved exactly on both sides, so DDP's adapter is
    bit-identical; FSDP2 reduces sharded gradients in another order (1e-8 here)."""
    import subprocess
    import sys

    args = ["finetune", MODEL, "--data", str(rows), "--chat-template", "chatml", "--max-steps", "6", "--lr", "3e-3",
            "--lora-dropout", "0", "--eval-every", "3", "--checkpoint-every", "6", "--batch-size", "2",
            "--no-progress"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}

    def run(cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    run([sys.executable, "-m", "emergence", *args, "--out", str(tmp_path / "one"), "--grad-accum", "2"])
    reference = SafetensorsFile(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for name, extra, tol in (("ddp", [], 0.0), ("fsdp", ["--fsdp"], 1e-6)):
        run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m", "emergence",
             *args, "--out", str(tmp_path / name), *extra])
        ours = SafetensorsFile(tmp_path / name / "adapter" / "adapter_model.safetensors")
        assert sorted(ours.keys()) == sorted(reference.keys())
        worst = max(float((ours.tensor(k) - reference.tensor(k)).abs().max()) for k in reference.keys())
        assert worst <= tol, (name, worst)
        assert [r["train_loss"] for r in metrics(tmp_path / name)] == pytest.approx(  # (losses ~10: a few ulps)
            [r["train_loss"] for r in metrics(tmp_path / "one")], rel=1e-6)
