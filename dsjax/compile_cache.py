"""The persistent XLA compilation cache dsjax turns on by default, so a new process (each `dsjax generate`, each
notebook kernel) loads the executables an earlier one compiled instead of compiling them again (on the H200 the first
generation of a real-width V3 slice spent 58 s compiling at batch 1 and 155 s at batch 8).

Where: `$DSJAX_COMPILE_CACHE` (`off` or `0` turns it off), else `$XDG_CACHE_HOME/dsjax/xla`, else
`~/.cache/dsjax/xla`. A cache the user configured for JAX (`JAX_COMPILATION_CACHE_DIR`, `jax.config.update(
"jax_compilation_cache_dir", ...)` before `import dsjax`, or `JAX_ENABLE_COMPILATION_CACHE=false`) is left alone.
JAX keys each entry by the computation, the compile options, the backend and jax/jaxlib versions, so one directory
serves every model, batch size and machine. JAX writes only compiles that took at least
`jax_persistent_cache_min_compile_time_secs`; its default, 1 s, keeps most of dsjax's compile time out of the cache:
the executables (per layer kind, attention form, look-ahead depth and batch shape) are many and mostly sub-second.
On the CPU demo store under a streaming budget, 1 to 3 of the first generation's 59 compiles passed 1 s, and a
second process's first generation took 9.1 s instead of 11.1 s; at 0.1 s, 17 entries (0.7 MB) bring it to 2.3 s
(1.9 s with all 59). So dsjax lowers the threshold to MIN_COMPILE_SECS unless the user set it. The directory is not
size-bounded: delete it to reclaim the space.

This module owns the decision and nothing else; JAX reads and writes the entries.
"""

from __future__ import annotations

import os
import warnings

OFF = ("off", "0")
MIN_COMPILE_SECS = 0.1     # shorter compiles cost about what reading their entry back would


def default_cache_dir(environ=os.environ) -> str | None:
    """The directory dsjax would use, or None when `DSJAX_COMPILE_CACHE` turns the cache off."""
    value = environ.get("DSJAX_COMPILE_CACHE", "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dsjax", "xla")


def enable_compile_cache() -> str | None:
    """Point JAX's persistent compilation cache at dsjax's directory, with dsjax's write threshold, unless the user
    configured one (or turned it off). Returns the directory it set, else None. Runs from `import dsjax`; JAX opens
    the cache at the first compile, so this must come before it. A directory that cannot be created or written
    disables the cache with one warning: a cache must never stop the engine from running.

    Example:
        >>> import dsjax.compile_cache as cc
        >>> cc.default_cache_dir()           # '/home/me/.cache/dsjax/xla'; `import dsjax` already enabled it
    """
    import jax   # already imported by dsjax's modules; the GPU client is not started by reading or setting a flag

    if jax.config.jax_compilation_cache_dir is not None or not jax.config.jax_enable_compilation_cache:
        return None
    path = default_cache_dir()
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable")
    except OSError as e:
        warnings.warn(f"dsjax: no persistent compilation cache ({e}); set DSJAX_COMPILE_CACHE to a writable "
                      "directory, or to 'off' to silence this", RuntimeWarning, stacklevel=2)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ and \
            jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:       # JAX's default, not the user's
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path
