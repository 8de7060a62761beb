"""The packaged emergence-6m: trained from scratch by `emergence pretrain` (bench/train_models.py),
shipped inside the package, usable by name. Its held-out split is rebuilt here from
shared/data with `prepare`, exactly as it was made for training (same tokenizer, same 5%)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import emergence
from emergence.api import packaged_models
from emergence.data import TokenShards, prepare_corpus
from emergence.train.trainer import WindowSampler

from conftest import SHARED_DATA

NAME = "emergence-6m"
CORPUS = ["tinystories/train", "tinystories/valid", "tinyshakespeare", "text"]  # bench/train_models.py
TOKENIZER_HASH = "8a8ef8ec3b475b31"  # recorded in the manifest of the shards it was trained on
BEST_VAL_LOSS = 3.4858  # at step 814 of 1,500, measured in the run (bf16 autocast) and here in fp32


@pytest.fixture(scope="module")
def lm():
    return emergence.load(NAME, device="cpu")


@pytest.fixture(scope="module")
def shards(lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("e6m") / "shards"
    prepare_corpus([str(SHARED_DATA / c) for c in CORPUS], lm.tokenizer, out, val_fraction=0.05,
                   show_progress=False)
    return TokenShards(out)


def test_it_is_packaged_and_loads_by_name(lm):
    assert NAME in packaged_models()
    assert lm.config.num_parameters() == 5_868_800
    assert (lm.config.n_layer, lm.config.n_embd, lm.config.vocab_size, lm.config.block_size) == (6, 256, 4096, 512)


def test_held_out_loss_is_the_reported_one(lm, shards):
    # the split is the one training held out: same tokenizer, same files, same fraction
    assert lm.tokenizer.fingerprint() == shards.tokenizer_hash == TOKENIZER_HASH
    assert (shards.tokens("train"), shards.tokens("val")) == (1_939_344, 102_222)
    windows = WindowSampler(shards.split("val"), 513, 512, seed=0)
    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, windows.num_windows, 16):
            batch = torch.from_numpy(np.stack([windows.window(k).astype(np.int64)
                                               for k in range(first, min(first + 16, windows.num_windows))]))
            logits = lm.model(batch[:, :-1])
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                       reduction="sum").item()
            count += batch[:, 1:].numel()
    loss = total / count
    assert windows.num_windows == 199
    assert abs(loss - BEST_VAL_LOSS) < 2e-3, loss
    # far below the unigram entropy of its own training tokens: it learned more than frequencies
    counts = np.bincount(np.concatenate(shards.split("train")), minlength=4096)
    p = counts[counts > 0] / counts.sum()
    assert loss < float(-(p * np.log(p)).sum()) - 2.0
    assert math.exp(loss) < 33


def test_greedy_story(lm):
    text = lm.generate("Once upon a time", temperature=0, max_new_tokens=16)
    assert text.startswith(", there was a little girl named Lily. She loved to play outside")


def test_transformers_reads_it(lm):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(emergence.api.PACKAGED_MODELS / NAME)
    ids = torch.tensor([lm.tokenizer.encode("ROMEO: What light through yonder window breaks?")])
    with torch.no_grad():
        assert (hf(ids).logits - lm.model(ids)).abs().max() < 1e-4


def test_an_empty_prompt_starts_a_document_after_eos(lm):
    # no BOS in this tokenizer: documents were separated by EOS in training, so EOS starts one
    assert lm.tokenizer.bos_id is None and lm.tokenizer.eos_id == 0
    completion = lm.complete("", temperature=0, max_new_tokens=8)
    assert completion.prompt_tokens == 1
    assert completion.text.startswith("Once upon a time")
