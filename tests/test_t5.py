"""T5 against transformers' T5ForConditionalGeneration: logits, greedy and beam outputs,
checkpoints both ways, the SentencePiece tokenizer's sentinels, presets, serving, bad input.

Tiny random v1.0 (ReLU MLP, tied head scaled by d_model ** -0.5) and v1.1 (gated GELU,
unscaled head) configs; initializer_factor is raised so that greedy choices have clear
winners (no float near-ties).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

import emergence
from emergence.errors import CheckpointError, InvalidArgument
from emergence.t5 import T5Config, init_t5, relative_bucket
from emergence.weights.hf import load_hf, save_hf

from conftest import SHARED_DATA, VOCAB, word_level_tokenizer

VERSIONS = {"v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def hf_t5(version: str, decoder_layers: int = 2, seed: int = 0, init: float = 2.0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=decoder_layers,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         decoder_start_token_id=0, eos_token_id=2, pad_token_id=0, initializer_factor=init,
                         **VERSIONS[version])
    return tf.T5ForConditionalGeneration(config).eval()


# Peaked weights for the generation tests, as peaked for both versions: v1.1's untied, unscaled
# head at initializer_factor 2 gives logits of ~65, where fp32's own rounding (either library's)
# moves a log-probability by ~1e-4 a step; at 1 its logits reach ~17 with greedy winners 4 apart.
PAIR_INIT = {"v1.0": 2.0, "v1.1": 1.0}


@pytest.fixture(scope="module", params=list(VERSIONS))
def pair(request, tmp_path_factory):
    """(transformers model, our LanguageModel) over one checkpoint folder."""
    folder = tmp_path_factory.mktemp(f"t5-{request.param}")
    hf = hf_t5(request.param, init=PAIR_INIT[request.param])
    hf.save_pretrained(folder)
    word_level_tokenizer().save(folder)
    return hf, emergence.load(str(folder), device="cpu")


SOURCES = [[5, 9, 17, 33, 2], [40, 3, 3, 71, 22, 8, 61, 12, 2]]


@pytest.mark.parametrize("version", list(VERSIONS))
def test_logits_equal_transformers(version, tmp_path):
    """Three decoder layers over two encoder layers, a padded source batch, 30 target tokens:
    distances past max_distance and every bucket kind are exercised. T5's own initialisation
    (logits of order 1; the generation tests' peaked weights give logits in the hundreds)."""
    hf = hf_t5(version, decoder_layers=3, init=1.0)
    hf.save_pretrained(tmp_path)
    ours, config = load_hf(tmp_path)
    assert (config.mlp, config.scale_head) == {"v1.0": ("relu", True), "v1.1": ("geglu", False)}[version]
    torch.manual_seed(1)
    source = torch.randint(3, VOCAB, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 25:] = 0
    target = torch.randint(3, VOCAB, (2, 30))
    with torch.no_grad():
        expected = hf(input_ids=source, attention_mask=mask, decoder_input_ids=target).logits
        got = ours(source, target, mask)
    assert (got - expected).abs().max().item() <= 1e-4


def test_relative_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :]
    for bidirectional, buckets, distance in itertools.product([True, False], [8, 32], [20, 128]):
        expected = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
        assert torch.equal(relative_bucket(relative, bidirectional, buckets, distance), expected)


def test_greedy_64_tokens_identical(pair):
    hf, lm = pair
    ours = lm.generate_batch(SOURCES, temperature=0, max_new_tokens=64)
    for source, c in zip(SOURCES, ours):
        expected = hf.generate(torch.tensor([source]), do_sample=False, max_new_tokens=64)[0, 1:].tolist()
        if 2 in expected:
            expected = expected[:expected.index(2)]
        assert c.token_ids == expected


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping",
                         [(2, 1.0, False), (3, 0.0, True), (4, 2.0, "never"), (3, -0.5, False)])
def test_beam_search_equals_transformers(pair, num_beams, length_penalty, early_stopping):
    hf, lm = pair
    kw = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=num_beams)
    ours = lm.generate_batch(SOURCES, max_new_tokens=12, no_repeat_ngram_size=3, **kw)
    for p, source in enumerate(SOURCES):
        out = hf.generate(torch.tensor([source]), do_sample=False, max_new_tokens=12, no_repeat_ngram_size=3,
                          output_scores=True, return_dict_in_generate=True, **kw)
        expected = []
        for k in range(num_beams):
            steps = sum(i >= 0 for i in out.beam_indices[k].tolist())
            ids = out.sequences[k, 1:1 + steps].tolist()  # after the decoder start token
            expected.append((ids[:-1] if ids and ids[-1] == 2 else ids, out.sequences_scores[k].item()))
        got = [(c.token_ids, c.score) for c in ours[p * num_beams:(p + 1) * num_beams]]
        # the summed log-probabilities within 1e-4: a negative length_penalty multiplies them by up to 12 ** 0.5
        assert_same_hypotheses(got, expected, tol=1e-4 * 12 ** max(0.0, -length_penalty))


def assert_same_hypotheses(got, expected, tol=1e-4):
    """Same hypotheses, same scores (within tol), best first; hypotheses whose scores tie
    within tol may come in either order (fp32 rounding decides it, in either library)."""
    assert len(got) == len(expected)
    for (_, a), (_, b) in zip(got, expected):
        assert a == pytest.approx(b, abs=tol)
    i = 0
    while i < len(expected):
        j = i + 1
        while j < len(expected) and abs(expected[j][1] - expected[j - 1][1]) < tol:
            j += 1
        assert sorted(ids for ids, _ in got[i:j]) == sorted(ids for ids, _ in expected[i:j])
        i = j


def test_sources_batched_equal_alone(pair):
    _, lm = pair
    both = lm.generate_batch(SOURCES, temperature=0, max_new_tokens=20)
    alone = [lm.generate_batch([s], temperature=0, max_new_tokens=20)[0] for s in SOURCES]
    assert [c.token_ids for c in both] == [c.token_ids for c in alone]


def test_saved_checkpoint_loads_in_transformers(pair, tmp_path):
    import transformers as tf

    hf, lm = pair
    save_hf(lm.model, tmp_path)
    back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    source, target = torch.tensor([SOURCES[1]]), torch.tensor([[0, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=source, decoder_input_ids=target).logits,
                           hf(input_ids=source, decoder_input_ids=target).logits)
    ours, _ = load_hf(tmp_path)
    for (name, a), (_, b) in zip(ours.state_dict().items(), lm.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_untied_head_roundtrips(tmp_path):
    """An untied head (the original v1.1 checkpoints') is kept as lm_head.weight, unscaled."""
    config = T5Config.from_name("tiny-t5", mlp="geglu", tie_embeddings=False, scale_head=False)
    model = init_t5(config, seed=3).eval()
    save_hf(model, tmp_path)
    back, loaded = load_hf(tmp_path)
    assert not loaded.tie_embeddings and back.lm_head.weight is not back.tok_embeddings.weight
    source, target = torch.randint(3, 256, (1, 12)), torch.randint(3, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(source, target), model(source, target))


@pytest.mark.parametrize("name,published", [("t5-small", 60_506_624), ("t5-base", 222_903_552),
                                            ("flan-t5-base", 247_577_856)])
def test_presets_have_the_published_parameter_counts(name, published):
    config = T5Config.from_name(name)
    assert config.num_parameters() == published
    with torch.device("meta"):
        from emergence.t5 import T5

        assert T5(config).num_parameters() == published


@pytest.fixture(scope="module")
def t5_tokenizer_folder(tmp_path_factory):
    """A T5-style SentencePiece unigram vocabulary trained on Tiny Shakespeare: <pad> 0, </s> 1,
    <unk> 2, the pieces, then <extra_id_99> .. <extra_id_0> at the end, saved by transformers'
    T5Tokenizer as tokenizer.json."""
    import sentencepiece as spm
    import transformers as tf

    folder = tmp_path_factory.mktemp("t5-tokenizer")
    text = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=str(folder / "sp"),
                                   vocab_size=400, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(3, sp.get_piece_size())]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces,
             *[(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]]
    tok = tf.T5Tokenizer(vocab=vocab, extra_ids=100)
    tok.save_pretrained(folder / "hf")
    return folder / "hf", tok


def test_t5_tokenizer_sentinels_match_transformers(t5_tokenizer_folder):
    from emergence.tokenizer import Tokenizer

    folder, reference = t5_tokenizer_folder
    ours = Tokenizer.load(folder)
    assert ours.vocab_size == 500 and ours.eos_id == 1 and ours.pad_id == 0
    text = "<extra_id_0> be, or not to be: <extra_id_1> is the question. <extra_id_99>"
    expected = reference(text).input_ids
    assert expected[-1] == 1  # T5's tokenizer ends the text with </s>
    assert ours.encode(text) == expected[:-1]
    assert ours.encode("<extra_id_0>") == [499] and ours.encode("<extra_id_99>") == [400]
    assert ours.decode(ours.encode("To be, or not to be")) == reference.decode(expected[1:4], skip_special_tokens=True) \
        or ours.decode(ours.encode("To be, or not to be")) == "To be, or not to be"


def test_text_prompt_reaches_the_encoder_with_eos(t5_tokenizer_folder, tmp_path):
    """A text prompt is encoded as T5's tokenizer does (ending in </s>): the same greedy
    output as transformers given the tokenizer's input_ids."""
    import shutil

    import transformers as tf

    folder, reference = t5_tokenizer_folder
    torch.manual_seed(5)
    hf = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=500, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
        eos_token_id=1, pad_token_id=0, initializer_factor=5.0)).eval()
    hf.save_pretrained(tmp_path)
    for f in folder.iterdir():
        shutil.copy(f, tmp_path)
    lm = emergence.load(str(tmp_path), device="cpu")
    prompt = "summarize: The king is dead. <extra_id_0> live the king."
    expected = hf.generate(**reference(prompt, return_tensors="pt"), do_sample=False, max_new_tokens=16)
    c = lm.complete(prompt, temperature=0, max_new_tokens=16)
    ids = expected[0, 1:].tolist()
    assert c.token_ids == (ids[:ids.index(1)] if 1 in ids else ids)
    assert c.prompt_tokens == len(reference(prompt).input_ids)


def test_cli_generates_with_t5_and_beams(pair, tmp_path):
    hf, lm = pair
    save_hf(lm.model, tmp_path)
    word_level_tokenizer().save(tmp_path)
    prompt = " ".join(f"t{i}" for i in SOURCES[1])
    out = subprocess.run([sys.executable, "-m", "emergence", "generate", "--model", str(tmp_path), prompt,
                          "-t", "0", "-n", "10", "--num-beams", "3", "--num-return-sequences", "2", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    expected = lm.generate_batch([prompt], num_beams=3, num_return_sequences=2, max_new_tokens=10)
    assert [(d["token_ids"], d["score"]) for d in lines] == [(c.token_ids, c.score) for c in expected]


def test_server_completes_with_t5(pair):
    from emergence.serve.app import Server, serve_in_thread

    from test_serve_http import post

    _, lm = pair
    app = Server(lm, "t5", slots=2)
    server, _ = serve_in_thread(app)
    try:
        port = server.server_address[1]
        prompt = " ".join(f"t{i}" for i in SOURCES[0][:-1])  # the server ends a text source with </s>
        status, _, body = post(port, "/v1/completions", {"model": "t5", "prompt": prompt, "temperature": 0,
                                                        "max_tokens": 12})
        assert status == 200, body
        assert body["choices"][0]["text"] == lm.complete(SOURCES[0], temperature=0, max_new_tokens=12).text
        status, _, body = post(port, "/v1/completions", {"model": "t5", "prompt": prompt, "max_tokens": 12,
                                                        "num_beams": 3, "n": 2})
        assert status == 200, body
        beams = lm.generate_batch([SOURCES[0]], num_beams=3, num_return_sequences=2, max_new_tokens=12)
        assert [c["text"] for c in body["choices"]] == [c.text for c in beams]
    finally:
        server.shutdown()
        app.close()


# ------------------------------------------------------------------------------ bad input
def test_checkpoint_without_a_decoder_is_refused(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    hf, _ = pair
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("decoder.")}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no decoder layers"):
        load_hf(tmp_path)


def test_source_longer_than_the_encoder_context_is_refused(pair):
    _, lm = pair
    too_long = [5] * (lm.config.block_size + 1)
    with pytest.raises(InvalidArgument) as e:
        lm.generate_batch([too_long], max_new_tokens=4)
    assert "does not fit the encoder's context of 512" in str(e.value) and "\n" not in str(e.value)


# -------------------------------------------------------------------------- GGUF, llama.cpp
def llama_cpp_t5_greedy(path, source: list[int], n: int, vocab: int):
    """llama.cpp's encoder-decoder through llama-cpp-python's low-level calls: llama_encode the
    source, then llama_decode from the decoder start token, greedily; tokens and logits rows."""
    import llama_cpp
    import numpy as np

    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = 256
    params.n_threads = params.n_threads_batch = 1
    params.type_k = params.type_v = 0  # an fp32 KV cache
    ctx = llama_cpp.llama_init_from_model(model, params)
    try:
        ids = (llama_cpp.llama_token * len(source))(*source)
        assert llama_cpp.llama_encode(ctx, llama_cpp.llama_batch_get_one(ids, len(source))) == 0
        token, tokens, rows = llama_cpp.llama_model_decoder_start_token(model), [], []
        for _ in range(n):
            one = (llama_cpp.llama_token * 1)(token)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
            rows.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,)).copy())
            token = int(rows[-1].argmax())
            tokens.append(token)
        return tokens, np.array(rows)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_llama_cpp_runs_our_t5_export_token_for_token(version, tmp_path):
    """A tiny random T5 (stories260K's vocabulary) written by `emergence convert`: llama.cpp's
    t5 architecture gives our greedy 32 tokens, its logits within 5e-3 (ggml's GELU is an fp16
    table: the gated model moves most)."""
    from emergence.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(emergence.api.PACKAGED_MODELS / "stories260K")
    shape = {"v1.0": dict(mlp="relu", tie_embeddings=True, scale_head=True),
             "v1.1": dict(mlp="geglu", tie_embeddings=False, scale_head=False)}[version]
    config = T5Config(vocab_size=512, n_embd=64, head_dim=16, intermediate_size=96, n_encoder_layer=2, n_layer=2,
                      n_head=4, eos_token_id=2, block_size=256, **shape)
    model = init_t5(config, seed=1).eval()
    save_hf(model, tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    out = subprocess.run([sys.executable, "-m", "emergence", "convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    source = [1, 403, 407, 261, 378, 300, 42, 17, 2]
    ours = emergence.LanguageModel(model, tokenizer, config).complete(source, temperature=0, max_new_tokens=32,
                                                                      ignore_eos=True)
    theirs, rows = llama_cpp_t5_greedy(tmp_path / "m.gguf", source, 32, 512)
    assert ours.token_ids == theirs
    with torch.no_grad():
        logits = model(torch.tensor([source]), torch.tensor([[0] + theirs[:-1]]))[0].numpy()
    assert abs(logits - rows).max() <= 5e-3


def test_llama_cpp_runs_our_q8_0_t5_export(tmp_path):
    from emergence.tokenizer import Tokenizer
    from emergence.weights.gguf_model import save_gguf

    tokenizer = Tokenizer.load(emergence.api.PACKAGED_MODELS / "stories260K")
    config = T5Config(vocab_size=512, n_embd=64, head_dim=16, intermediate_size=96, n_encoder_layer=2, n_layer=2,
                      n_head=4, eos_token_id=2, block_size=256, mlp="geglu", tie_embeddings=False, scale_head=False)
    model = init_t5(config, seed=2).eval()
    save_gguf(model, tokenizer, tmp_path / "q8.gguf", "q8_0")
    source = [1, 403, 407, 261, 378, 300, 2]
    theirs, rows = llama_cpp_t5_greedy(tmp_path / "q8.gguf", source, 16, 512)
    with torch.no_grad():
        logits = model(torch.tensor([source]), torch.tensor([[0] + theirs[:-1]]))[0].numpy()
    # Q8_0 weights: llama.cpp's logits stay near the fp32 model's (and its greedy path is a valid one)
    assert abs(logits - rows).max() <= 0.1
    assert (logits.argmax(-1)[:8] == rows.argmax(-1)[:8]).all()


# --------------------------------------------------------------------- the other commands
def test_info_store_and_refusals(pair, tmp_path, capsys, monkeypatch):
    """`info` describes a T5; the store imports and runs it by name; the tools made for
    decoder-only models refuse it in one line."""
    import json as json_

    from conftest import assert_one_line_error, cli_main

    _, lm = pair
    folder = tmp_path / "t5"
    save_hf(lm.model, folder)
    word_level_tokenizer().save(folder)
    code, out, _ = cli_main(capsys, "info", folder, "--json")
    info = json_.loads(out)
    assert code == 0 and info["encoder_layers"] == info["decoder_layers"] == 2
    assert info["parameters"] == sum(p.numel() for p in lm.model.parameters())
    monkeypatch.setenv("EMERGENCE_HOME", str(tmp_path / "home"))
    assert cli_main(capsys, "import", folder, "t5tiny")[0] == 0
    prompt = " ".join(f"t{i}" for i in SOURCES[0][:-1])
    code, out, _ = cli_main(capsys, "run", "t5tiny", prompt, "-t", "0", "-n", "8")
    assert code == 0 and out.strip() == lm.complete(prompt, temperature=0, max_new_tokens=8).text
    code, _, err = cli_main(capsys, "quantize", folder, "--to", "int8", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "emergence quantize takes decoder-only models")
    code, _, err = cli_main(capsys, "generate", "-m", folder, "--adapter", tmp_path, "t1")
    assert_one_line_error(code, err, "an adapter takes decoder-only models")


def test_pretrain_cli_trains_a_t5_with_span_corruption(tmp_path, capsys):
    """`emergence pretrain --config tiny-t5 --objective span-corruption`: the loss falls, a
    T5 folder comes out, and a run killed mid-way and resumed repeats the uninterrupted run."""
    import signal

    from test_pretrain import ENV, _make_shards, kill_after_rows, metrics, pretrain_cmd

    from conftest import cli_main

    shards = _make_shards(tmp_path / "data", 60_000, 400)
    args = ["--config", "tiny-t5", "--objective", "span-corruption", "--context", "64", "--batch-size", "8",
            "--lr", "3e-3", "--warmup-steps", "3", "--eval-every", "0", "--max-steps", "40", "--checkpoint-every",
            "10", "--no-progress"]
    code, _, err = cli_main(capsys, *pretrain_cmd(shards, tmp_path / "a", *args)[3:])
    assert code == 0, err
    losses = [r["train_loss"] for r in metrics(tmp_path / "a")]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5]) - 1.0
    model, config = load_hf(tmp_path / "a" / "model")
    assert config.is_encoder_decoder and config.vocab_size == 512  # 400 + 100 sentinels, rounded to 64

    out = tmp_path / "b"
    assert kill_after_rows(pretrain_cmd(shards, out, *args), out / "metrics.jsonl", 25) == -signal.SIGKILL
    resumed = subprocess.run(pretrain_cmd(shards, out, *args, "--resume"), env=ENV, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 20" in resumed.stdout or "resuming at step 30" in resumed.stdout
    assert [r["train_loss"] for r in metrics(out)] == pytest.approx(losses, abs=1e-6)


def test_seq2seq_span_corruption_batch_by_hand():
    """T5's example: tokens [a b c d e f], noise [0 1 1 0 0 1], sentinels [S0 S1] -> the
    encoder reads [a S0 d e S1 EOS], the decoder reads [start S0 b c S1 f] and predicts
    [S0 b c S1 f EOS]; a shorter row is padded (source mask 0, targets ignored)."""
    from emergence.train import objectives

    a, b, c, d, e, f, S0, S1, EOS, START = 10, 11, 12, 13, 14, 15, 99, 98, 2, 0
    inputs, targets = objectives.span_corruption([a, b, c, d, e, f], [0, 1, 1, 0, 0, 1], [S0, S1])
    assert (inputs, targets) == ([a, S0, d, e, S1], [S0, b, c, S1, f])
    batch = objectives.seq2seq_batch([(inputs + [EOS], targets + [EOS]), ([a, S0, EOS], [S0, b, EOS])], START,
                                     pad_id=EOS)
    assert batch.inputs.tolist() == [[a, S0, d, e, S1, EOS], [a, S0, EOS, EOS, EOS, EOS]]
    assert batch.source_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch.decoder_inputs.tolist() == [[START, S0, b, c, S1, f], [START, S0, b, EOS, EOS, EOS]]
    assert batch.targets.tolist() == [[S0, b, c, S1, f, EOS], [S0, b, EOS, -100, -100, -100]]


def test_small_batch_linears_equal_torch_and_keep_gradients():
    """The decoder's step projections are SmallBatchLinear: a decode step's few rows through the native
    GEMM equal torch's product within fp32 rounding; training (a gradient) takes torch's path."""
    from emergence.kernels import SmallBatchLinear, gemv_extension

    model = init_t5(T5Config.from_name("tiny-t5"), seed=4)
    plain = {n for n, m in model.layers.named_modules() if type(m) is torch.nn.Linear}
    assert plain == {f"{i}.cross_attn.kv_proj" for i in range(len(model.layers))}  # run once per source
    assert type(model.lm_head) is SmallBatchLinear
    # q/k/v and o, cross q and o, the ReLU MLP's up and down
    assert sum(type(m) is SmallBatchLinear for m in model.layers.modules()) == 6 * len(model.layers)
    assert not any(type(m) is SmallBatchLinear for m in model.encoder_layers.modules())
    layer = model.layers[0].mlp.down_proj
    x = torch.randn(4, 1, layer.in_features)
    with torch.inference_mode():
        fast = layer(x)
    assert torch.allclose(fast, torch.nn.functional.linear(x, layer.weight.detach()), atol=1e-5)
    if gemv_extension() is not None:  # the native path was taken: not bit-identical to torch's
        assert not torch.equal(fast, torch.nn.functional.linear(x, layer.weight.detach()))
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("version", list(VERSIONS))
def test_native_step_equals_the_eager_forward(version, tmp_path):
    """The native decode plan runs T5's decoder (relative bias by distance, cross-attention over each
    sequence's own encoder states, ReLU or gated-GELU MLP, the scaled tied head): two sources of
    different lengths decoded together, 40 greedy steps past max_distance, every step's logits
    within 1e-4 of the eager forward's on the same tokens."""
    from emergence.decode import DecodeBatch
    from emergence.kv_cache import PagedKVCache
    from emergence.sampling import SamplingParams

    hf = hf_t5(version, decoder_layers=3, init=1.0)
    hf.save_pretrained(tmp_path)
    word_level_tokenizer().save(tmp_path)
    lm = emergence.load(str(tmp_path), device="cpu")
    params = SamplingParams(temperature=0, max_new_tokens=40, ignore_eos=True)
    batches = {}
    for backend in ("native", "eager"):
        cache = PagedKVCache(lm.config, 16, block_size=8)
        batch = DecodeBatch(lm.model, lm.tokenizer, cache, backend=backend)
        batch.admit([batch.new_row(s, params, k) for k, s in enumerate(SOURCES)])
        batches[backend] = batch
    assert batches["native"].backend.name == "native"
    worst = 0.0
    for _ in range(40):
        worst = max(worst, (batches["native"].logits - batches["eager"].logits).abs().max().item())
        tokens = batches["eager"].logits.argmax(-1).tolist()  # both fed the same tokens
        for batch in batches.values():
            batch.advance(tokens)
    assert worst <= 1e-4
