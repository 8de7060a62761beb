"""bench/quant_quality.py on a small slice of the TinyStories validation text: its perplexity
equals an independent computation, and the quality figures order the formats as they must. And
on a model's own held-out split from prepared token shards (emergence-6m on a small corpus):
refused unless the shards' tokenizer is the model's, read as training reads it, calibrated on
the train split."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import emergence
from emergence.data import prepare_corpus
from emergence.errors import InvalidArgument

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quant_quality.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("quant_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quant_quality"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


qq = _load_script()
SLICE_CHARS = 6_000  # about 3k tokens: several 512-token windows, the last one partial


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: a second thread only waits on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm():
    return emergence.load(device="cpu", dtype="fp32", fast_kernels=False)


@pytest.fixture(scope="module")
def tokens(lm):
    return qq.eval_tokens(lm.tokenizer, qq.eval_text(SLICE_CHARS))


def _ppl(lm, model, tokens):
    return qq.perplexity(model, tokens, context=lm.config.block_size, bos_id=lm.tokenizer.bos_id)


def test_eval_slice_is_validation_text_cut_at_a_paragraph(lm, tokens):
    text = qq.eval_text(SLICE_CHARS)
    full = qq.VALID_TEXT.read_text(encoding="utf-8")
    assert full.startswith(text) and len(text) <= SLICE_CHARS
    assert full[len(text):len(text) + 2] == "\n\n"
    assert len(tokens) > 2 * lm.config.block_size


def test_windows_predict_every_token_once(tokens):
    pairs = qq.windows(tokens, 512, bos_id=1)
    assert torch.equal(torch.cat([t for _, t in pairs]), tokens)
    assert all(inp[0] == 1 and torch.equal(inp[1:], tgt[:-1]) for inp, tgt in pairs)
    assert len(pairs[-1][1]) < 512  # the slice does not fill the last window
    no_bos = qq.windows(tokens, 512, bos_id=None)
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


def test_int8_within_two_percent_and_ternary_far_worse(lm, tokens):
    fp32 = _ppl(lm, lm.model, tokens)[0]
    int8_model, int8_kept = qq.build(lm.model, qq.SPEC_BY_NAME["int8"])
    ternary_model, _ = qq.build(lm.model, qq.SPEC_BY_NAME["ternary"])
    int8, ternary = _ppl(lm, int8_model, tokens)[0], _ppl(lm, ternary_model, tokens)[0]
    assert int8_kept == {}
    assert abs(int8 / fp32 - 1) < 0.02
    # BitNet's ternary grid applied after fp32 training: worse than a uniform guess over the vocabulary.
    assert ternary > 10 * int8 and ternary > lm.config.vocab_size


def test_kept_layers_and_weight_bytes(lm):
    q4_0, kept = qq.build(lm.model, qq.SPEC_BY_NAME["q4_0"])
    assert sorted(kept) == [f"layers.{i}.mlp.down_proj" for i in range(lm.config.n_layer)]
    assert set(kept.values()) == {"in_features 172 not a multiple of 32"}
    total_b, total_n, q_b, q_n = qq.linear_bytes(q4_0)
    down = lm.config.n_layer * 172 * 64
    assert total_n == sum(m.weight.numel() for m in qq.linear_layers(lm.model).values())
    assert q_n == total_n - down and q_b * 8 == q_n * 4.5  # 18 bytes per 32 weights
    assert total_b == q_b + 4 * down
    # No layer of this model has in_features divisible by 128: nothing to quantize, said so.
    model, kept = qq.build(lm.model, qq.SPEC_BY_NAME["int4-g128"])
    assert model is None and len(kept) == len(qq.linear_layers(lm.model))
    assert "no layer fits" in qq.describe_kept(kept) or "not a multiple of 128" in qq.describe_kept(kept)


def test_gptq_calibrates_on_train_stories(lm):
    calib, stories = qq.calibration_tokens(lm.tokenizer, n_seqs=2, seq_len=64)
    assert calib.shape == (2, 64) and calib[0, 0] == lm.tokenizer.bos_id and stories >= 1
    first_story = qq.train_stories()[0]
    assert lm.tokenizer.decode(calib[0, 1:].tolist()) in first_story
    assert first_story not in qq.VALID_TEXT.read_text(encoding="utf-8")


def test_neighbour_overlap_orders_the_formats(lm):
    emb = lm.model.tok_embeddings.weight.detach().float()
    ref = qq.nearest_neighbours(emb)
    assert ref.shape == (lm.config.vocab_size, qq.NEIGHBOURS)
    assert not (ref == torch.arange(len(emb))[:, None]).any()  # a token is not its own neighbour
    same, _, _ = qq.quantize_matrix(emb, qq.SPEC_BY_NAME["fp32"])
    assert qq.neighbour_overlap(ref, qq.nearest_neighbours(same)) == 1.0
    distinct = qq.distinct_rows(emb)
    ref_d = qq.nearest_neighbours(emb[distinct])

    def overlaps(name):
        wq, _, _ = qq.quantize_matrix(emb, qq.SPEC_BY_NAME[name])
        return (qq.neighbour_overlap(ref, qq.nearest_neighbours(wq)),
                qq.neighbour_overlap(ref_d, qq.nearest_neighbours(wq[distinct])), qq.relative_error(emb, wq))

    int8, q4_0, ternary = overlaps("int8"), overlaps("q4_0"), overlaps("ternary")
    for column in (0, 1):  # all tokens, distinct tokens: margins of about 0.1 and more
        assert int8[column] > q4_0[column] + 0.05 > ternary[column] + 0.1
    assert int8[1] > 0.98  # among tokens with distinct embeddings, int8 keeps nearly every neighbour
    assert int8[2] < q4_0[2] < ternary[2]
    # Untrained tokens share one vector: a large near-duplicate group, whose neighbour order is noise.
    assert 0.3 * len(emb) < (~distinct).sum() < 0.7 * len(emb)


def test_embedding_formats_that_do_not_fit_say_so(lm):
    emb = lm.model.tok_embeddings.weight.detach().float()
    wq, bits, note = qq.quantize_matrix(emb, qq.SPEC_BY_NAME["int4-g128"])
    assert wq is None and bits is None and "D = 64 is not a multiple of 128" in note
    wq, bits, note = qq.quantize_matrix(emb, qq.SPEC_BY_NAME["int4-gptq-g32"])
    assert wq is None and note.startswith("n/a")
    wq, bits, _ = qq.quantize_matrix(emb, qq.SPEC_BY_NAME["q4_0"])
    assert wq.shape == emb.shape and bits == 4.5


def test_script_writes_the_tables(tmp_path, capsys):
    out = tmp_path / "quantization.md"
    assert qq.main(["--formats", "fp32,int8,int4-g128,q4_0", "--eval-chars", "2000", "--out", str(out)]) == 0
    text, captured = out.read_text(), capsys.readouterr()
    assert text == captured.out.rstrip("\n") + "\n"
    assert "| format | perplexity | vs fp32 |" in text and "NN@10 overlap" in text
    assert "layers.*.mlp.down_proj (x5): in_features 172 not a multiple of 32" in text
    assert "no layer fits" in text and "How to reproduce" in text
    assert sum(line.startswith("| int8 |") for line in text.splitlines()) == 2
    progress = [line for line in captured.err.splitlines() if line.startswith("[stories260K]")]
    assert len(progress) == 4 and all("elapsed" in line and "ETA" in line for line in progress)


# ------------------------------------------------------------- a model's own held-out split
@pytest.fixture(scope="module")
def lm6():
    return emergence.load("emergence-6m", device="cpu", dtype="fp32", fast_kernels=False)


@pytest.fixture(scope="module")
def shards_dir(lm6, tmp_path_factory):
    """A small corpus in the layout emergence-6m was prepared from: a file of stories separated
    by EOS (the last ones held out) and a single-document file (cut near its end)."""
    root = tmp_path_factory.mktemp("qq_shards")
    (root / "stories.txt").write_text(qq.STORY_END.join(qq.train_stories()[:40]), encoding="utf-8")
    (root / "play.txt").write_text((qq.SHARED / "tinyshakespeare" / "input.txt").read_text()[:12_000],
                                   encoding="utf-8")
    prepare_corpus([str(root / "stories.txt"), str(root / "play.txt")], lm6.tokenizer, root / "shards",
                   val_fraction=0.2, show_progress=False)
    return root / "shards"


def test_shards_are_refused_unless_made_with_the_models_tokenizer(lm, lm6, shards_dir, capsys):
    shards = qq.open_shards(shards_dir, lm6.tokenizer)
    assert shards.tokenizer_hash == lm6.tokenizer.fingerprint()
    with pytest.raises(InvalidArgument, match=f"tokenizer {shards.tokenizer_hash}.*{lm.tokenizer.fingerprint()}"):
        qq.open_shards(shards_dir, lm.tokenizer)
    with pytest.raises(SystemExit):  # the script says so before evaluating anything
        qq.main(["--eval-shards", f"stories260K={shards_dir}", "--formats", "fp32", "--out", ""])
    assert "fingerprint" in capsys.readouterr().err


def test_a_model_trained_on_the_validation_text_needs_its_own_split(capsys):
    with pytest.raises(SystemExit):
        qq.main(["--model", "emergence-6m", "--formats", "fp32", "--out", ""])
    err = capsys.readouterr().err
    assert "not held out" in err and "emergence prepare" in err and "--val-fraction 0.05" in err
    with pytest.raises(SystemExit):  # shards for a model that is not evaluated
        qq.main(["--eval-shards", "emergence-6m=DIR", "--formats", "fp32", "--out", ""])
    assert "not a --model" in capsys.readouterr().err


def test_val_split_is_read_as_training_reads_it(lm6, shards_dir):
    shards = qq.open_shards(shards_dir, lm6.tokenizer)
    val = qq.shard_tokens(shards, "val")
    assert torch.equal(val, torch.from_numpy(np.concatenate(shards.split("val")).astype(np.int64)))
    ppl, nll, count = qq.perplexity(lm6.model, val, context=512, bos_id=None)
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
    shards = qq.open_shards(shards_dir, lm6.tokenizer)
    val = qq.shard_tokens(shards, "val")
    stories, play = qq.shard_sources(shards, val)
    assert stories["val_tokens"] + play["val_tokens"] == len(val)
    assert not stories["cut"] and play["cut"] and play["val_documents"] == 1
    assert stories["val_tokens"] + stories["train_tokens"] == shards.manifest["sources"][0]["tokens"]
    held = val[:stories["val_tokens"]].tolist()  # the last stories of the file, EOS after each
    assert held.count(lm6.tokenizer.eos_id) == stories["val_documents"] and held[-1] == lm6.tokenizer.eos_id
    last = qq.train_stories()[39]
    assert lm6.tokenizer.decode(held[:-1]).endswith(last)


def test_gptq_calibrates_on_the_start_of_the_train_split(lm6, shards_dir):
    shards = qq.open_shards(shards_dir, lm6.tokenizer)
    calib, docs = qq.shard_calibration_tokens(shards, n_seqs=2, seq_len=512)
    train = qq.shard_tokens(shards, "train")
    assert calib.shape == (2, 512) and torch.equal(calib.flatten(), train[:1024])
    assert docs == int((train[:1023] == lm6.tokenizer.eos_id).sum()) + 1 > 1
    first_story = qq.train_stories()[0]
    assert lm6.tokenizer.decode(calib[0].tolist()).startswith(first_story)
    with pytest.raises(InvalidArgument, match="fewer than"):
        qq.shard_calibration_tokens(shards, n_seqs=10_000, seq_len=512)


def test_script_writes_the_held_out_split_section(lm6, shards_dir, tmp_path, capsys):
    out = tmp_path / "quantization.md"
    assert qq.main(["--model", "emergence-6m", "--eval-shards", f"emergence-6m={shards_dir}",
                    "--formats", "fp32,int8,int4-gptq-g64", "--calib-seqs", "2", "--out", str(out)]) == 0
    text, captured = out.read_text(), capsys.readouterr()
    assert text == captured.out.rstrip("\n") + "\n"
    shards = qq.open_shards(shards_dir, lm6.tokenizer)
    val = qq.shard_tokens(shards, "val")
    assert "### Perplexity on its held-out validation split" in text
    assert "TinyStories validation text\n" not in text
    assert "validated on while training" not in text  # not emergence-6m's training files: no such claim
    assert f"tokenizer hash {lm6.tokenizer.fingerprint()}" in text and f"Its {len(val):,} tokens" in text
    assert f"{len(val) - 1:,} tokens are predicted exactly once" in text
    assert "the first 1,024 tokens of the same shards' *train* split" in text
    assert f"emergence prepare {shards_dir.parent / 'stories.txt'}" in text and "--val-fraction 0.2" in text
    fp32 = qq.perplexity(lm6.model, val, context=512, bos_id=None)[0]
    assert f"| fp32 | {fp32:.4f} | - |" in text
    full = (len(val) - 1) // 512  # training's evaluation: full windows only, also given
    _, loss, _ = qq.perplexity(lm6.model, val[:full * 512 + 1], context=512, bos_id=None)
    assert f"Over the {full} full windows alone, as `emergence train` evaluates, fp32 gives mean loss {loss:.4f}" in text
    for name in ("int8", "int4-gptq-g64"):  # d_model 256 and d_ff 704 are multiples of 64: every layer fits
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith("| 100.0% | none |")
    progress = [line for line in captured.err.splitlines() if line.startswith("[emergence-6m]")]
    assert len(progress) == 3
