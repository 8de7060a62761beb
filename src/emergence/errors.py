"""The errors emergence raises for bad input.

Every error a user can cause (a missing file, a corrupt checkpoint, an invalid sampling
value) is an `EmergenceError`: the CLI prints its message on one line and exits non-zero.
Anything else that escapes is a bug in emergence, not in the input.
"""


class EmergenceError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class CheckpointError(EmergenceError):
    """A checkpoint or tokenizer file is missing, truncated, corrupt or inconsistent."""


class ConfigError(EmergenceError):
    """A model configuration is unknown, unsupported or self-contradictory."""


class InvalidArgument(EmergenceError, ValueError):
    """A value passed by the caller is out of range (sampling values, prompt length...)."""
