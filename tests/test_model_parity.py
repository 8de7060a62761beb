"""emergence against transformers on tiny random models: logits, greedy decoding, batching."""

from __future__ import annotations

import torch

from emergence import SamplingParams, generate, load
from emergence.weights.hf import load_hf


def test_logits_match_transformers(hf_model):
    family, hf, folder = hf_model
    model, config = load_hf(folder)
    assert config.family == family
    torch.manual_seed(0)
    ids = torch.randint(3, 96, (3, 40))  # 40 > mistral's sliding window of 8
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (3, 40, 96)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_logits_with_left_padding_match_transformers(hf_model):
    family, hf, folder = hf_model
    model, _ = load_hf(folder)
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left-padded by 7
    ids[0, :7] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs = hf(ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_greedy_64_tokens_identical_to_transformers(hf_model):
    family, hf, folder = hf_model
    lm = load(folder, device="cpu")
    prompt = [1, 17, 42, 5, 88, 23, 9, 61]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)
    expected = theirs[0, len(prompt):].tolist()
    ours = lm.complete(prompt, temperature=0, max_new_tokens=64, ignore_eos=True)
    assert len(expected) == 64
    assert ours.token_ids == expected
    assert ours.finish_reason == "length"


def test_batched_generation_equals_one_by_one(hf_model):
    family, _, folder = hf_model
    lm = load(folder, device="cpu")
    prompts = [[1, 50, 7], [1, 9, 8, 7, 6, 5, 4, 33, 12, 70, 71, 72], [1, 40, 41, 42, 43, 44, 45]]
    settings = [SamplingParams(temperature=0, max_new_tokens=20, ignore_eos=True),
                SamplingParams(temperature=0.9, top_k=20, seed=7, max_new_tokens=20, ignore_eos=True),
                SamplingParams(temperature=1.2, top_p=0.8, seed=11, max_new_tokens=13, ignore_eos=True)]
    batched = generate(lm.model, lm.tokenizer, prompts, settings)
    alone = [generate(lm.model, lm.tokenizer, [p], [s])[0] for p, s in zip(prompts, settings)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [len(c.token_ids) for c in batched] == [20, 20, 13]


def test_sampling_is_reproducible_with_a_seed(hf_model):
    _, _, folder = hf_model
    lm = load(folder, device="cpu")
    a = lm.complete([1, 5, 6], temperature=1.0, seed=123, max_new_tokens=30, ignore_eos=True).token_ids
    b = lm.complete([1, 5, 6], temperature=1.0, seed=123, max_new_tokens=30, ignore_eos=True).token_ids
    c = lm.complete([1, 5, 6], temperature=1.0, seed=124, max_new_tokens=30, ignore_eos=True).token_ids
    assert a == b
    assert a != c
