"""A default home for JAX's persistent compilation cache, so a re-run loads its compiled steps instead of compiling.

`crosswrite` commands other than bench (which measures compilation) keep compiled XLA programs under
$XDG_CACHE_HOME/crosswrite_jax/xla/<host fingerprint> (XDG_CACHE_HOME defaults to ~/.cache). JAX's own
JAX_COMPILATION_CACHE_DIR wins when it is set; set it to the empty string to turn the cache off.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

ENV = "JAX_COMPILATION_CACHE_DIR"


def host_fingerprint() -> str:
    """A short hash of the host's architecture and CPU instruction-set flags (cached CPU code runs only there)."""
    text = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next((line for line in lines if line.startswith(("flags", "Features"))), "")
        text += " " + " ".join(sorted(flags.partition(":")[2].split()))
    except OSError:
        text += " " + platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_home() -> Path:
    """$XDG_CACHE_HOME/crosswrite_jax (~/.cache by default): the compilation cache, the host's matmul peak and
    trained tokenizers live under it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crosswrite_jax"


def default_dir() -> Path:
    return cache_home() / "xla" / host_fingerprint()


def enable_default() -> str | None:
    """Points JAX's compilation cache at default_dir() unless JAX_COMPILATION_CACHE_DIR is set; the folder in use."""
    if ENV in os.environ:
        return os.environ[ENV] or None
    import jax

    folder = str(default_dir())
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder
