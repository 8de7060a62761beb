"""Alignment: preference and reinforcement-learning objectives on top of the decoder.

    losses.py  reward model (Bradley-Terry), DPO / IPO, PPO (GAE, clipped policy and value), GRPO,
               as pure functions: tensors in, (loss, stats) out
    reward.py  RewardModel: the decoder with a scalar head, saved and loaded in the Hugging Face
               *ForSequenceClassification layout
    data.py    preference rows {prompt, chosen, rejected[, margin]} -> token ids with completion masks
    train.py   reward-model and DPO runs on the one training loop (`emergence reward-model`, `emergence dpo`)
"""
