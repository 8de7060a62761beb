"""bench/quant_quality.py on a small slice of the TinyStories validation text: its perplexity
equals an independent computation, and the quality figures order the formats as they must."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import emergence

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
