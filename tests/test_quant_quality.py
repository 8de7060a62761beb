"""Evaluation in the package (emergence.evaluate, data.windows, TokenShards' readers) checked
against independent computations, and bench/quant_quality.py run as users run it (a separate
process, a small slice of text) with its tables checked against those same computations.

On the TinyStories validation text for stories260K, and on a model's own held-out split from
prepared token shards (emergence-6m on a small corpus): refused unless the shards' tokenizer
is the model's, read as training reads it, calibrated on the train split."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from torch import nn

import emergence
from emergence.data import TokenShards, prepare_corpus
from emergence.data.windows import windows
from emergence.errors import InvalidArgument
from emergence.evaluate import (distinct_rows, log_likelihood, nearest_neighbours, neighbour_overlap, perplexity,
                                relative_error)
from emergence.quant import FORMATS, linear_weight_bytes, quantize_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "quant_quality.py"
VALID_TEXT = SHARED_DATA / "tinystories" / "valid" / "hf_TinyStories_validation.head.txt"
TRAIN_TEXT = SHARED_DATA / "tinystories" / "train" / "TinyStories-train.head2MiB.txt"
STORY_END = "<|endoftext|>"
SLICE_CHARS = 6_000  # about 3k tokens: several 512-token windows, the last one partial


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: a second thread only waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    return emergence.load(device="cpu", dtype="fp32")


def slice_text(n_chars: int = SLICE_CHARS) -> str:
    """The start of the validation text cut at the last paragraph break before n_chars."""
    text = VALID_TEXT.read_text(encoding="utf-8")
    return text[:text.rfind("\n\n", 0, n_chars)].strip()


@pytest.fixture(scope="module")
def tokens(lm):
    return torch.tensor(lm.tokenizer.encode(slice_text(), add_bos=False))


def train_stories() -> list[str]:
    return [p.strip() for p in TRAIN_TEXT.read_text(encoding="utf-8").split(STORY_END)[:-1] if p.strip()]


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", "", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def _ppl(lm, model, tokens):
    return perplexity(model, tokens, context=lm.config.block_size, bos_id=lm.tokenizer.bos_id)


# ------------------------------------------------------------------------------- the package
def test_windows_predict_every_token_once(tokens):
    pairs = windows(tokens, 512, bos_id=1)
    assert torch.equal(torch.cat([t for _, t in pairs]), tokens)
    assert all(inp[0] == 1 and torch.equal(inp[1:], tgt[:-1]) for inp, tgt in pairs)
    assert len(pairs[-1][1]) < 512  # the slice does not fill the last window
    no_bos = windows(tokens, 512, bos_id=None)
    assert torch.equal(torch.cat([t for _, t in no_bos]), tokens[1:])
    assert all(torch.equal(inp[1:], tgt[:-1]) for inp, tgt in no_bos)


def test_fp32_perplexity_equals_exp_cross_entropy_computed_independently(lm, tokens):
    ppl, nll, count = _ppl(lm, lm.model, tokens)
    assert count == len(tokens)
    # One window at a time: log-softmax of the logits, the target's log-probability summed.
    block, bos, total = lm.config.block_size, lm.tokenizer.bos_id, 0.0
    with torch.no_grad():
        for start in range(0, len(tokens), block):
            chunk = tokens[start:start + block].tolist()
            logits = lm.model(torch.tensor([[bos] + chunk[:-1]]))[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            total -= sum(logp[i, t].item() for i, t in enumerate(chunk))
    assert nll == pytest.approx(total / len(tokens), rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / len(tokens)), rel=1e-5)
    assert ppl == pytest.approx(math.exp(nll), rel=1e-12)
    assert 2 < ppl < 10  # a trained model on text of its own domain (uniform would be 512)


def test_log_likelihood_of_a_continuation(lm):
    context = lm.tokenizer.encode("Once upon a time, there was a little")
    greedy = lm.complete(context, temperature=0, max_new_tokens=4, ignore_eos=True).token_ids
    other = [lm.tokenizer.encode(" dog", add_bos=False)[0]] + greedy[1:]
    ll, is_greedy = log_likelihood(lm.model, context, greedy)
    with torch.no_grad():  # the continuation's log-probabilities, one prefix at a time
        expected = sum(lm.model(torch.tensor([context + greedy[:i]]))[0, -1].double().log_softmax(-1)[t].item()
                       for i, t in enumerate(greedy))
    assert ll == pytest.approx(expected, abs=1e-4) and is_greedy
    ll_other, other_greedy = log_likelihood(lm.model, context, other)
    assert ll_other < ll and not other_greedy
    with pytest.raises(InvalidArgument, match="non-empty"):
        log_likelihood(lm.model, [], greedy)
    with pytest.raises(InvalidArgument, match="context window of 512"):
        log_likelihood(lm.model, context, [5] * 600)


def test_int8_within_two_percent_and_ternary_far_worse(lm, tokens):
    import copy

    fp32 = _ppl(lm, lm.model, tokens)[0]
    int8 = _ppl(lm, quantize_model(copy.deepcopy(lm.model), "int8"), tokens)[0]
    ternary = _ppl(lm, quantize_model(copy.deepcopy(lm.model), "ternary"), tokens)[0]
    assert abs(int8 / fp32 - 1) < 0.02
    # BitNet's ternary grid applied after fp32 training: worse than a uniform guess over the vocabulary.
    assert ternary > 10 * int8 and ternary > lm.config.vocab_size


def test_linear_weight_bytes(lm):
    import copy

    q4_0 = quantize_model(copy.deepcopy(lm.model), "q4_0", skip=("lm_head", "down_proj"))
    total_b, total_n, q_b, q_n = linear_weight_bytes(q4_0)
    down = lm.config.n_layer * 172 * 64
    assert total_n == sum(m.weight.numel() for m in lm.model.modules() if isinstance(m, nn.Linear)) - 512 * 64
    assert q_n == total_n - down and q_b * 8 == q_n * 4.5  # 18 bytes per 32 weights
    assert total_b == q_b + 4 * down


def _embedding_in(emb: torch.Tensor, fmt: str) -> torch.Tensor:
    linear = nn.Linear(emb.shape[1], emb.shape[0], bias=False)
    linear.weight.data.copy_(emb)
    options = {"ggml_format": fmt} if fmt.startswith("q") else {}
    return FORMATS[fmt].from_linear(linear, **options).dequantize().float()


def test_neighbour_overlap_orders_the_formats(lm):
    emb = lm.model.tok_embeddings.weight.detach().float()
    ref = nearest_neighbours(emb)
    assert ref.shape == (lm.config.vocab_size, 10)
    assert not (ref == torch.arange(len(emb))[:, None]).any()  # a token is not its own neighbour
    assert neighbour_overlap(ref, nearest_neighbours(emb.clone())) == 1.0
    distinct = distinct_rows(emb)
    ref_d = nearest_neighbours(emb[distinct])

    def overlaps(fmt):
        wq = _embedding_in(emb, fmt)
        return (neighbour_overlap(ref, nearest_neighbours(wq)), neighbour_overlap(ref_d, nearest_neighbours(wq[distinct])),
                relative_error(emb, wq))

    int8, q4_0, ternary = overlaps("int8"), overlaps("q4_0"), overlaps("ternary")
    for column in (0, 1):  # all tokens, distinct tokens: margins of about 0.1 and more
        assert int8[column] > q4_0[column] + 0.05 > ternary[column] + 0.1
    assert int8[1] > 0.98  # among tokens with distinct embeddings, int8 keeps nearly every neighbour
    assert int8[2] < q4_0[2] < ternary[2]
    # Untrained tokens share one vector: a large near-duplicate group, whose neighbour order is noise.
    assert 0.3 * len(emb) < (~distinct).sum() < 0.7 * len(emb)


# ------------------------------------------------------------------------------ the script
def test_script_writes_the_tables(lm, tokens):
    r = run_script("--formats", "fp32,int8,int4-g128,q4_0,int4-gptq-g32", "--eval-chars", str(SLICE_CHARS),
                   "--calib-seqs", "2")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "| format | perplexity | vs fp32 |" in text and "NN@10 overlap" in text
    # the fp32 row is the package's perplexity of the same slice
    assert f"| fp32 | {_ppl(lm, lm.model, tokens)[0]:.4f} | - |" in text
    # q4_0 keeps the five down projections (in_features 172) in fp32, and says so
    import copy

    _, total_n, _, q_n = linear_weight_bytes(quantize_model(copy.deepcopy(lm.model), "q4_0",
                                                            skip=("lm_head", "down_proj")))
    row = next(line for line in text.splitlines() if line.startswith("| q4_0 |"))
    assert row.endswith(f"| 4.50 | {100 * q_n / total_n:.1f}% | layers.*.mlp.down_proj (x5): in_features 172 not a "
                        "multiple of 32 |")
    # no layer of this model has in_features divisible by 128: nothing to quantize, said so
    assert "| int4-g128 | n/a | n/a | n/a | n/a | n/a | 0% |" in text and "no layer fits" in text
    # an embedding whose width does not suit a format, and GPTQ, have no embedding row
    assert "| int4-g128 | n/a | n/a | n/a | n/a | n/a: D = 64 is not a multiple of 128 |" in text
    assert "n/a: GPTQ needs the layer's input activations" in text
    # GPTQ calibrates on whole train stories (BOS before each), never on the evaluation text
    stories, ids = 0, []
    while len(ids) < 2 * 512:
        ids += lm.tokenizer.encode(train_stories()[stories], add_bos=True)
        stories += 1
    assert f"1,024 tokens (2 sequences of 512) cut from the first {stories} whole stories of the TinyStories " \
           "*train* split" in text
    assert train_stories()[0] not in VALID_TEXT.read_text(encoding="utf-8")
    assert "How to reproduce" in text and sum(line.startswith("| int8 |") for line in text.splitlines()) == 2
    progress = [line for line in r.stderr.splitlines() if line.startswith("[stories260K]")]
    assert len(progress) == 5 and all("elapsed" in line and "ETA" in line for line in progress)


def test_a_model_trained_on_the_validation_text_needs_its_own_split():
    r = run_script("--model", "emergence-6m", "--formats", "fp32")
    assert r.returncode == 2 and "not held out" in r.stderr and "emergence prepare" in r.stderr
    assert "--val-fraction 0.05" in r.stderr
    r = run_script("--eval-shards", "emergence-6m=DIR", "--formats", "fp32")  # shards for a model not evaluated
    assert r.returncode == 2 and "not a --model" in r.stderr


# ------------------------------------------------------------- a model's own held-out split
@pytest.fixture(scope="module")
def lm6():
    return emergence.load("emergence-6m", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def shards_dir(lm6, tmp_path_factory):
    """A small corpus in the layout emergence-6m was prepared from: a file of stories separated
    by EOS (the last ones held out) and a single-document file (cut near its end)."""
    root = tmp_path_factory.mktemp("qq_shards")
    (root / "stories.txt").write_text(STORY_END.join(train_stories()[:40]), encoding="utf-8")
    (root / "play.txt").write_text((SHARED_DATA / "tinyshakespeare" / "input.txt").read_text()[:12_000],
                                   encoding="utf-8")
    prepare_corpus([str(root / "stories.txt"), str(root / "play.txt")], lm6.tokenizer, root / "shards",
                   val_fraction=0.2, show_progress=False)
    return root / "shards"


def test_shards_are_refused_unless_made_with_the_models_tokenizer(lm, lm6, shards_dir):
    shards = TokenShards(shards_dir)
    shards.check_tokenizer(lm6.tokenizer)
    assert shards.tokenizer_hash == lm6.tokenizer.fingerprint()
    with pytest.raises(InvalidArgument, match=f"tokenizer {shards.tokenizer_hash}.*{lm.tokenizer.fingerprint()}"):
        shards.check_tokenizer(lm.tokenizer)
    r = run_script("--eval-shards", f"stories260K={shards_dir}", "--formats", "fp32")
    assert r.returncode == 2 and "fingerprint" in r.stderr  # said before evaluating anything


def test_val_split_is_read_as_training_reads_it(lm6, shards_dir):
    shards = TokenShards(shards_dir)
    val = shards.ids("val")
    assert torch.equal(val, torch.from_numpy(np.concatenate(shards.split("val")).astype(np.int64)))
    assert torch.equal(shards.ids("val", 100), val[:100])
    ppl, nll, count = perplexity(lm6.model, val, context=512, bos_id=None)
    assert count == len(val) - 1 and len(val) > 1024 and (len(val) - 1) % 512  # a last, partial window
    # Windows of 513 tokens, stride 512, each predicting its last 512 (the last one fewer).
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(val) - 1, 512):
            window = val[start:start + 513]
            logits = lm6.model(window[None, :-1])[0].double()
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
    assert nll == pytest.approx(total / count, rel=1e-5) and ppl == pytest.approx(math.exp(nll), rel=1e-12)
    assert ppl < 200  # a trained model on text of its own domain (uniform would be 4096)


def test_every_val_token_is_attributed_to_its_source(lm6, shards_dir):
    shards = TokenShards(shards_dir)
    val = shards.ids("val")
    stories, play = shards.val_sources(val)
    assert stories["val_tokens"] + play["val_tokens"] == len(val)
    assert not stories["cut"] and play["cut"] and play["val_documents"] == 1
    assert stories["val_tokens"] + stories["train_tokens"] == shards.manifest["sources"][0]["tokens"]
    held = val[:stories["val_tokens"]].tolist()  # the last stories of the file, EOS after each
    assert held.count(lm6.tokenizer.eos_id) == stories["val_documents"] and held[-1] == lm6.tokenizer.eos_id
    assert lm6.tokenizer.decode(held[:-1]).endswith(train_stories()[39])


def test_gptq_calibrates_on_the_start_of_the_train_split(lm6, shards_dir):
    shards = TokenShards(shards_dir)
    calib, docs = shards.calibration(2, 512)
    train = shards.ids("train")
    assert calib.shape == (2, 512) and torch.equal(calib.flatten(), train[:1024])
    assert docs == int((train[:1023] == lm6.tokenizer.eos_id).sum()) + 1 > 1
    assert lm6.tokenizer.decode(calib[0].tolist()).startswith(train_stories()[0])
    with pytest.raises(InvalidArgument, match="fewer than"):
        shards.calibration(10_000, 512)


def test_script_writes_the_held_out_split_section(lm6, shards_dir):
    r = run_script("--model", "emergence-6m", "--eval-shards", f"emergence-6m={shards_dir}",
                   "--formats", "fp32,int8,int4-gptq-g64", "--calib-seqs", "2")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    shards = TokenShards(shards_dir)
    val = shards.ids("val")
    assert "### Perplexity on its held-out validation split" in text
    assert "TinyStories validation text\n" not in text
    assert "validated on while training" not in text  # not emergence-6m's training files: no such claim
    assert f"tokenizer hash {lm6.tokenizer.fingerprint()}" in text and f"Its {len(val):,} tokens" in text
    assert f"{len(val) - 1:,} tokens are predicted exactly once" in text
    assert "the first 1,024 tokens of the same shards' *train* split" in text
    assert f"emergence prepare {shards_dir.parent / 'stories.txt'}" in text and "--val-fraction 0.2" in text
    fp32 = perplexity(lm6.model, val, context=512, bos_id=None)[0]
    assert f"| fp32 | {fp32:.4f} | - |" in text
    full = (len(val) - 1) // 512  # training's evaluation: full windows only, also given
    _, loss, _ = perplexity(lm6.model, val[:full * 512 + 1], context=512, bos_id=None)
    assert f"Over the {full} full windows alone, as `emergence train` evaluates, fp32 gives mean loss {loss:.4f}" in text
    for name in ("int8", "int4-gptq-g64"):  # d_model 256 and d_ff 704 are multiples of 64: every layer fits
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith("| 100.0% | none |")
    progress = [line for line in r.stderr.splitlines() if line.startswith("[emergence-6m]")]
    assert len(progress) == 3


@pytest.mark.parametrize("name", ["quant.json", "quant_amd.json"])
def test_the_committed_llama_cpp_comparison_and_the_readmes_table_agree(name):
    # bench/bench_quant.py's committed runs (an Intel Xeon's and an AMD EPYC's): every engine
    # measured in the same rounds, llama.cpp's own llama-bench among them, and the README's
    # tables rendered from them.
    import json

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_quant import NATIVE, OURS, THEIRS, render_table

    result = json.loads((root / "bench" / "results" / name).read_text())
    assert set(result["engines"]) == set(OURS) | set(NATIVE) | set(THEIRS)
    probed = "bandwidth_range_gb_s" in result  # the probe around every decode (a run before: one probe)
    for engine in OURS:
        r = result["engines"][engine]
        assert r["decode_range"][0] <= r["decode_tok_s"] <= r["decode_range"][1]
        if probed:  # each decode's probe: the higher of just before and just after it
            low, high = r["bandwidth_share_range"]
            assert len(r["bandwidth_gb_s"]) == result["rounds"]
            assert low <= r["bandwidth_share"] <= high < 1  # every time the probe read at least as fast
        else:
            assert r["decode_tok_s"] * r["weight_bytes"] / 1e9 < result["bandwidth_gb_s"]
    if probed:
        probes = [gb_s for r in result["engines"].values() for gb_s in r["bandwidth_gb_s"]]
        assert result["bandwidth_gb_s"] == statistics.median(probes)
    assert render_table(result) in (root / "README.md").read_text()


@pytest.mark.parametrize("name", ["decode.json", "decode_amd.json"])
def test_the_committed_transformers_comparison_and_the_readmes_table_agree(name):
    # The Xeon's run (one bandwidth probe, the README's table) and the EPYC's (a probe around
    # every round, each engine's share of its own round's bandwidth; docs/bench_amd.md).
    import json

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    from bench_decode import render_table

    result = json.loads((root / "bench" / "results" / name).read_text())
    for dtype in ("fp32", "bf16"):
        r = result[dtype]
        for engine in ("transformers", "emergence-torch-ops", "emergence"):
            lo, hi = r[engine]["decode_range"]
            assert lo <= r[engine]["decode_tok_s"] <= hi
            if "bandwidth_share" in r[engine]:
                low, high = r[engine]["bandwidth_share_range"]
                assert len(r["bandwidth_rounds_gb_s"]) == result["rounds"]
                assert low <= r[engine]["bandwidth_share"] <= high < 1  # no round read faster than its probe
            else:
                assert r[engine]["decode_tok_s"] * r["weight_bytes"] / 1e9 < result["bandwidth_gb_s"]
    text = (root / ("README.md" if name == "decode.json" else "docs/bench_amd.md")).read_text()
    assert render_table(result) in text
