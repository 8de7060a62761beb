"""Training: one loop (`trainer`), pure objectives, optimizer and schedules, checkpoints."""

from .trainer import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
