"""dsjax: DeepSeek-V3/R1-class MoE inference in JAX with FP4 weights tiered over GPU, pinned host RAM and NVMe.

Public API:
    >>> import dsjax
    >>> engine = dsjax.load("path/to/checkpoint", dtype="bfloat16")
    >>> out = engine.generate("The tides are", max_new_tokens=32, temperature=0.7, seed=0)
    >>> print(out.text)
    >>> for ev in engine.stream("Hello", max_new_tokens=8): print(ev.text, end="")
"""

from dsjax.config import ConfigError, ModelConfig
from dsjax.runtime.engine import Engine, Generation, PromptError, TokenEvent
from dsjax.runtime.load import load
from dsjax.runtime.sampling import SamplingParams
from dsjax.runtime.tokenizer import Tokenizer, TokenizerError
from dsjax.store.safetensors_io import CheckpointError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Engine", "Generation", "ModelConfig", "PromptError", "SamplingParams",
           "TokenEvent", "Tokenizer", "TokenizerError", "load"]
