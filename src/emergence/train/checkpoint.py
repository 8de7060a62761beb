"""Training checkpoints: everything a run needs to continue as if it had never stopped.

One file, `OUT/checkpoint.pt`: model and optimizer state, step, data cursor, RNG states,
the run's settings and the tokenizer hash. It is written to a temporary file, flushed to
disk, then renamed over the old one, so a crash (even SIGKILL mid-write) or a full disk
leaves the previous checkpoint whole. Ctrl-C (SIGINT) during the write is held until the
write is complete, then raised: an interrupted run stops with its newest checkpoint whole.
It is read back with `torch.load(weights_only=True)`, which rebuilds tensors and plain
containers only and never runs code from the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..files import fsync_folder

CHECKPOINT = "checkpoint.pt"
# A test seam (the crash tests set them; nothing else does): N sends the process SIGKILL, or
# SIGINT, in the middle of writing its N-th checkpoint.
KILL_DURING_CHECKPOINT_ENV = "EMERGENCE_TEST_KILL_DURING_CHECKPOINT"
INTERRUPT_DURING_CHECKPOINT_ENV = "EMERGENCE_TEST_INTERRUPT_DURING_CHECKPOINT"


class _FaultInjectingFile:
    """A file that signals its own process once after `after` bytes (used only by the crash tests)."""

    def __init__(self, f, after: int, signum: int) -> None:
        self.f, self.after, self.signum, self.written = f, after, signum, 0

    def write(self, data) -> int:
        n = self.f.write(data)
        if self.written < self.after <= self.written + n:
            self.f.flush()
            os.kill(os.getpid(), self.signum)
        self.written += n
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


_saves = 0


def _open_for_write(path: Path):
    return open(path, "wb")


@contextlib.contextmanager
def _interrupts_held():
    """SIGINT during the block is held, and raised as KeyboardInterrupt when the block is done
    (main thread only: elsewhere Python delivers no signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_checkpoint(state: dict, folder: Path) -> Path:
    """Atomically write `state` to folder/checkpoint.pt; on failure the old file is untouched;
    Ctrl-C waits for the write to finish."""
    with _interrupts_held():
        return _save(state, folder)


def _save(state: dict, folder: Path) -> Path:
    global _saves
    _saves += 1
    path, tmp = folder / CHECKPOINT, folder / (CHECKPOINT + ".tmp")
    try:
        with _open_for_write(tmp) as f:
            target = f
            for env, signum in ((KILL_DURING_CHECKPOINT_ENV, signal.SIGKILL), (INTERRUPT_DURING_CHECKPOINT_ENV,
                                                                               signal.SIGINT)):
                if os.environ.get(env) == str(_saves):
                    target = _FaultInjectingFile(f, 4096, signum)
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
