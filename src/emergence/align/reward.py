"""A reward model: the decoder with a scalar head, in the Hugging Face sequence-classification layout.

    input_ids (B, T) --decoder.hidden_states--> (B, T, D) --score: Linear(D, 1, bias=False)--> (B, T)
                     --the last non-padding token of each row--> rewards (B,)

The row's token is the rightmost one that is not pad_token_id, as transformers'
*ForSequenceClassification picks it (so left and right padding both work; a row of nothing but
padding takes token 0). The decoder's LM head is dropped: a reward model never predicts tokens.

On disk it is what `LlamaForSequenceClassification.from_pretrained` (or Mistral's, Qwen2's, ...:
the family's *ForCausalLM name with ForSequenceClassification) reads: config.json with that
architecture, num_labels 1 (id2label / label2id) and pad_token_id, and model.safetensors with the
decoder's tensors under the family's own names (`model.*` for LLaMA, through the same name table
as weights/hf.py's save_hf, without lm_head) plus `score.weight` (1, D).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from ..config import Config, read_json
from ..errors import CheckpointError, ConfigError, InvalidArgument
from ..model import Transformer, empty_model, finish_loading
from ..weights.hf import (INDEX_FILE, SINGLE_FILE, check_layer_count, open_shards, read_state,
                          write_json_atomic)
from ..weights.names import IGNORED_SUFFIXES, canonical_names, expand, hf_rules
from ..weights.safetensors_io import save_safetensors

SCORE = "score.weight"


class RewardModel(nn.Module):
    """`decoder` (taken over: its LM head is dropped) with a scalar score head.

    pad_token_id: the token that marks padding (default: the decoder config's); required, as
    transformers requires it for a batch of more than one row. The new head is drawn from
    N(0, 1 / (D + 1)), the reward head initialisation of Stiennon et al. / lm-human-preferences.
    """

    def __init__(self, decoder: Transformer, pad_token_id: int | None = None) -> None:
        super().__init__()
        if decoder.config.is_encoder_decoder:
            raise InvalidArgument("a reward model wraps a decoder-only model")
        pad = decoder.config.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            raise InvalidArgument("a reward model scores each row's last non-padding token: give a pad_token_id "
                                  "(the model's config has none)")
        self.decoder = decoder
        decoder.lm_head = None
        self.pad_token_id = int(pad)
        self.score = nn.Linear(decoder.config.n_embd, 1, bias=False, device=decoder.device, dtype=decoder.dtype)
        if decoder.device.type != "meta":
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(decoder.config.n_embd + 1))

    @property
    def config(self) -> Config:
        return self.decoder.config

    def token_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head on every position: (B, T) (a PPO value model's per-token values).

        attention_mask (B, T) is optional: right padding needs none (causal attention never lets a
        token see the padding after it) and is dropped; left padding is passed to the decoder,
        which shifts positions past it. A mask with both kinds of row is refused.
        """
        mask = None
        if attention_mask is not None:
            steps = attention_mask.to(torch.int8).diff(dim=1)
            if bool((steps > 0).any()):  # some row has 0 -> 1 (left padding)
                if bool((steps < 0).any()):
                    raise InvalidArgument("attention_mask mixes left- and right-padded rows (or has holes): "
                                          "pad every row on the same side")
                mask = attention_mask
        return self.score(self.decoder.hidden_states(input_ids, attention_mask=mask)).squeeze(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> rewards (B,): the head at each row's last non-padding token."""
        last = last_token_index(input_ids, self.pad_token_id)
        return self.token_scores(input_ids, attention_mask)[torch.arange(input_ids.shape[0], device=last.device), last]


def last_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """(B,) index of each row's rightmost token that is not pad_token_id; 0 for an all-padding
    row (transformers' rule)."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(dim=-1)


def _classifier_name(causal: str) -> str:
    name = re.sub(r"(ForCausalLM|LMHeadModel)$", "ForSequenceClassification", causal)
    if name == causal:
        raise ConfigError(f"no sequence-classification counterpart of architecture {causal!r}")
    return name


def save_reward_model(model: RewardModel, folder: str | Path) -> None:
    """Write config.json and model.safetensors that transformers loads as <Family>ForSequenceClassification."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {folder}: {e.strerror}") from None
    config = model.config
    hf = config.to_hf()
    hf.update(architectures=[_classifier_name(hf["architectures"][0])], pad_token_id=model.pad_token_id,
              num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    params = dict(model.decoder.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for rule in expand(hf_rules(config), config, canonical_names(model.decoder)):  # no lm_head: the model has none
        tensors.update(zip(rule.theirs, rule.to_theirs([params[n].detach() for n in rule.ours], config)))
    tensors[SCORE] = model.score.weight.detach()
    for stale in list(folder.glob("model-*.safetensors")) + [folder / INDEX_FILE]:  # an older sharded save
        stale.unlink(missing_ok=True)
    save_safetensors(tensors, folder / SINGLE_FILE)
    hf["torch_dtype"] = str(model.score.weight.dtype).removeprefix("torch.")
    write_json_atomic(folder / "config.json", hf)


def load_reward_model(folder: str | Path, *, dtype: torch.dtype | None = None) -> RewardModel:
    """A *ForSequenceClassification folder with one label (ours, or one transformers saved) -> RewardModel,
    on the CPU; dtype None keeps the stored dtype."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"no config.json in {folder} (not a model folder, or a partial copy)")
    hf = read_json(folder / "config.json")
    architectures = hf.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures):
        raise CheckpointError(f"{folder} is not a reward model: its architectures are {architectures}, "
                              "not a *ForSequenceClassification")
    labels = len(hf["id2label"]) if isinstance(hf.get("id2label"), dict) else hf.get("num_labels", 2)
    if labels != 1:
        raise CheckpointError(f"{folder} is a classifier with {labels} labels; a reward model has one (num_labels 1)")
    if hf.get("pad_token_id") is None:
        raise CheckpointError(f"config.json in {folder} has no pad_token_id: the last token of a padded row "
                              "cannot be found")
    config = Config.from_hf(hf)
    config.name = folder.resolve().name
    sources = open_shards(folder)
    if SCORE not in sources:
        raise CheckpointError(f"no {SCORE} in {folder}: not a reward model checkpoint")
    check_layer_count(sources, config, folder)
    model = empty_model(config)
    wanted = canonical_names(model) - {"lm_head.weight"}
    state, used = read_state(expand(hf_rules(config), config, wanted), sources, model, config, folder, dtype)
    unexpected = sorted(k for k in set(sources) - used - {SCORE} if not k.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"checkpoint has tensors this reward model does not use: {', '.join(unexpected[:3])}"
                              f"{' ...' if len(unexpected) > 3 else ''}")
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"no checkpoint tensor maps to {', '.join(missing[:3])}")
    reward_model = RewardModel(finish_loading(model, state), hf["pad_token_id"])
    score = sources[SCORE].tensor(SCORE)
    if tuple(score.shape) != (1, config.n_embd):
        raise CheckpointError(f"{SCORE} has shape {tuple(score.shape)}, expected (1, {config.n_embd})")
    reward_model.score.weight = nn.Parameter(score if dtype is None else score.to(dtype))
    return reward_model.eval()
