"""emergence: the LLM era, from embeddings to emergence, as one hackable PyTorch stack.

    import emergence
    lm = emergence.load()                      # the shipped default model
    print(lm.generate("Once upon a time", temperature=0.8, max_new_tokens=64))
"""

from .api import LanguageModel, load
from .config import PRESETS, Config
from .errors import CheckpointError, ConfigError, EmergenceError, InvalidArgument
from .generate import Completion, generate, stream
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "Config", "PRESETS", "Transformer", "Tokenizer", "SamplingParams", "LanguageModel", "Completion",
    "load", "generate", "stream", "EmergenceError", "CheckpointError", "ConfigError", "InvalidArgument",
]
__version__ = "0.1.0"
