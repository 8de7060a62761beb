"""emergence.align.reward: the decoder with a scalar head, saved so transformers loads it as
LlamaForSequenceClassification with the same scores, and read back (ours or transformers')."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from emergence.align.reward import RewardModel, last_token_index, load_reward_model, save_reward_model
from emergence.config import Config
from emergence.errors import CheckpointError, InvalidArgument
from emergence.model import Transformer

PAD = 0


def tiny_reward_model(seed: int = 0, **overrides) -> RewardModel:
    torch.manual_seed(seed)
    config = Config.from_name("tiny-llama", pad_token_id=PAD, **overrides)
    decoder = Transformer(config)
    with torch.no_grad():  # larger random weights than the default init, so scores differ clearly
        for p in decoder.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return RewardModel(decoder).eval()


def padded_batch() -> torch.Tensor:
    """Three rows, right-padded with PAD: lengths 9, 5 and 12 (full width)."""
    torch.manual_seed(3)
    ids = torch.randint(3, 256, (3, 12))
    ids[0, 9:] = PAD
    ids[1, 5:] = PAD
    return ids


def test_last_token_index_follows_transformers_rule():
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 8, 9, 4], [0, 0, 0, 0, 0], [3, 0, 5, 0, 0]])
    assert last_token_index(ids, 0).tolist() == [2, 4, 0, 2]  # right, left, all padding, a pad in the middle


def test_saved_folder_is_the_hf_sequence_classification_layout(tmp_path):
    rm = tiny_reward_model()
    save_reward_model(rm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert (config["model_type"], config["num_labels"], config["pad_token_id"]) == ("llama", 1, PAD)
    assert config["id2label"] == {"0": "LABEL_0"}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("score.weight").shape == (1, 64)
    assert "score.weight" in names and "lm_head.weight" not in names
    assert all(n == "score.weight" or n.startswith("model.") for n in names)
    assert "model.layers.1.self_attn.q_proj.weight" in names and "model.embed_tokens.weight" in names
    assert len(names) == 2 * 9 + 2 + 1  # 9 tensors a layer, embeddings + final norm, score


def test_transformers_loads_it_with_the_same_scores(tmp_path):
    import transformers as tf

    rm = tiny_reward_model()
    save_reward_model(rm, tmp_path)
    hf = tf.LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = padded_batch()
    with torch.no_grad():
        ours = rm(ids)
        theirs = hf(ids).logits
    assert theirs.shape == (3, 1)
    assert ours.shape == (3,)
    assert (ours - theirs[:, 0]).abs().max().item() <= 1e-5
    assert ours.std().item() > 0.1  # the rows really score differently
    # the score is the head at the last real token: the same rows without their padding agree
    with torch.no_grad():
        alone = torch.cat([rm(ids[0:1, :9]), rm(ids[1:2, :5]), rm(ids[2:3])])
    assert (ours - alone).abs().max().item() <= 1e-5


def test_left_padding_with_attention_mask_matches_transformers(tmp_path):
    import transformers as tf

    rm = tiny_reward_model(seed=1)
    save_reward_model(rm, tmp_path)
    hf = tf.LlamaForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (2, 10))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = PAD, 0  # row 0 left-padded by 4
    with torch.no_grad():
        ours = rm(ids, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
        alone = rm(ids[0:1, 4:])
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert abs(ours[0].item() - alone[0].item()) <= 1e-5
    # a right-padding mask is harmless (dropped), a mixed one refused
    right = padded_batch()
    with torch.no_grad():
        assert torch.equal(rm(right, attention_mask=(right != PAD).long()), rm(right))
    mixed = torch.tensor([[0, 1, 1], [1, 1, 0]])
    with pytest.raises(InvalidArgument, match="mixes left- and right-padded rows"):
        rm(torch.tensor([[0, 5, 6], [5, 6, 0]]), attention_mask=mixed)


def test_reload_into_emergence_is_equal(tmp_path):
    rm = tiny_reward_model()
    save_reward_model(rm, tmp_path)
    back = load_reward_model(tmp_path)
    assert back.pad_token_id == PAD
    assert back.decoder.lm_head is None
    ours, theirs = rm.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert "score.weight" in ours and not any(k.startswith("decoder.lm_head") for k in ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    ids = padded_batch()
    with torch.no_grad():
        assert torch.equal(back(ids), rm(ids))


def test_reads_a_checkpoint_transformers_saved(tmp_path):
    import transformers as tf

    hf_config = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               initializer_range=0.2, pad_token_id=PAD, num_labels=1)
    torch.manual_seed(5)
    hf = tf.LlamaForSequenceClassification(hf_config).eval()
    hf.save_pretrained(tmp_path)
    rm = load_reward_model(tmp_path)
    torch.manual_seed(6)
    ids = torch.randint(3, 96, (2, 8))
    ids[1, 6:] = PAD
    with torch.no_grad():
        assert (rm(ids) - hf(ids).logits[:, 0]).abs().max().item() <= 1e-5


def test_tied_embeddings_round_trip(tmp_path):
    rm = tiny_reward_model(seed=2, tie_embeddings=True)
    save_reward_model(rm, tmp_path)
    back = load_reward_model(tmp_path)
    ids = padded_batch()
    with torch.no_grad():
        assert torch.equal(back(ids), rm(ids))


def test_refusals(tmp_path):
    with pytest.raises(InvalidArgument, match="give a pad_token_id"):
        RewardModel(Transformer(Config.from_name("tiny-llama")))
    rm = tiny_reward_model()
    save_reward_model(rm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, id2label={"0": "A", "1": "B"})))
    with pytest.raises(CheckpointError, match="classifier with 2 labels"):
        load_reward_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, architectures=["LlamaForCausalLM"])))
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(tmp_path)
