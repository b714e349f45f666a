"""What the host CPU is and can do, read from /proc/cpuinfo, and where per-machine results are cached."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# Flags under which a CPU computes bfloat16 dot products in hardware (oneDNN then runs bf16
# matmuls at about twice the float32 rate); without them bf16 is converted and runs slower.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cache_root() -> Path:
    """$XDG_CACHE_HOME/tpserve, or ~/.cache/tpserve."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpserve"


@functools.cache
def _cpuinfo_field(name: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
