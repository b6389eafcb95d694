"""dsjax: DeepSeek-V3/R1-class MoE inference in JAX with FP4 weights tiered over GPU, pinned host RAM and NVMe.

Public API:
    >>> import dsjax
    >>> engine = dsjax.load("path/to/checkpoint", dtype="bfloat16")
    >>> out = engine.generate("The tides are", max_new_tokens=32, temperature=0.7, seed=0)
    >>> print(out.text)
    >>> for ev in engine.stream("Hello", max_new_tokens=8): print(ev.text, end="")
"""

import os as _os

# PJRT caps pinned host memory (allocations fail at ~62 GiB on the H200 machine) unless the cap is raised before the
# GPU backend starts. dsjax enforces its own host budget, so when the user has not set the cap it is lifted to 90% of
# the machine's RAM; this must run before JAX creates its GPU client, i.e. before the first jax.devices().
# The first tiered engine then lowers it to what its plan pins (runtime/memory.py, cap_pinned_host): the pool grows in
# regions of doubling size, so a lifted limit alone lets it pin up to twice the plan.
# DSJAX_PINNED_LIMIT_GB marks a value dsjax set, so a child process (a notebook kernel, a CLI run from Python) that
# inherits it starts from the default again instead of taking its parent's cap for the user's own setting.
PINNED_LIMIT_SET_BY_DSJAX = False
if _os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB") in (None, _os.environ.get("DSJAX_PINNED_LIMIT_GB")):
    try:
        _ram = _os.sysconf("SC_PAGE_SIZE") * _os.sysconf("SC_PHYS_PAGES")
        _os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = _os.environ["DSJAX_PINNED_LIMIT_GB"] = \
            str(max(1, int(0.9 * _ram / 2**30)))
        PINNED_LIMIT_SET_BY_DSJAX = True
    except (ValueError, OSError):
        pass

# The persistent compilation cache (dsjax/compile_cache.py): a new process reuses what earlier ones compiled. JAX opens
# it at the first compile, so it is configured here, at import.
from dsjax.compile_cache import enable_compile_cache as _enable_compile_cache  # noqa: E402

_enable_compile_cache()

from dsjax.config import ConfigError, ModelConfig  # noqa: E402
from dsjax.runtime.engine import Engine, Generation, PromptError, TokenEvent  # noqa: E402
from dsjax.runtime.load import load  # noqa: E402
from dsjax.runtime.sampling import SamplingParams  # noqa: E402
from dsjax.runtime.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from dsjax.store.safetensors_io import CheckpointError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "Engine", "Generation", "ModelConfig", "PromptError", "SamplingParams",
           "TokenEvent", "Tokenizer", "TokenizerError", "load"]
