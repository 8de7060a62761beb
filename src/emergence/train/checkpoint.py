"""Training checkpoints: everything a run needs to continue as if it had never stopped.

One file, `OUT/checkpoint.pt`: model and optimizer state, step, data cursor, RNG states,
the run's settings and the tokenizer hash. It is written to a temporary file, flushed to
disk, then renamed over the old one, so a crash (even SIGKILL mid-write) or a full disk
leaves the previous checkpoint whole. It is read back with `torch.load(weights_only=True)`,
which rebuilds tensors and plain containers only and never runs code from the file.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import fsync_folder

CHECKPOINT = "checkpoint.pt"
# Tests set this to N to SIGKILL the process in the middle of writing its N-th checkpoint.
KILL_DURING_CHECKPOINT_ENV = "EMERGENCE_TEST_KILL_DURING_CHECKPOINT"


class _FaultInjectingFile:
    """A file that kills its own process after `kill_after` bytes (used only by the crash test)."""

    def __init__(self, f, kill_after: int) -> None:
        self.f, self.kill_after, self.written = f, kill_after, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        self.written += n
        if self.written >= self.kill_after:
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


_saves = 0


def _open_for_write(path: Path):
    return open(path, "wb")


def save_checkpoint(state: dict, folder: Path) -> Path:
    """Atomically write `state` to folder/checkpoint.pt; on failure the old file is untouched."""
    global _saves
    _saves += 1
    path, tmp = folder / CHECKPOINT, folder / (CHECKPOINT + ".tmp")
    try:
        with _open_for_write(tmp) as f:
            target = f
            if os.environ.get(KILL_DURING_CHECKPOINT_ENV) == str(_saves):
                target = _FaultInjectingFile(f, kill_after=4096)
            torch.save(state, target)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(folder)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else _disk_reason(e)
        previous = _describe_previous(path)
        raise CheckpointError(f"cannot write checkpoint {path}: {reason}; {previous}") from None
    return path


def _disk_reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return os.strerror(errno.ENOSPC) if "No space" in text or "ENOSPC" in text else text


def _describe_previous(path: Path) -> str:
    if not path.exists():
        return "no earlier checkpoint exists"
    try:
        step = load_checkpoint(path.parent)["step"]
        return f"the previous checkpoint (step {step}) is intact"
    except CheckpointError:
        return "the previous checkpoint could not be read back either"


def load_checkpoint(folder: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from in {folder} ({CHECKPOINT} missing)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not an emergence training checkpoint")
    return state
