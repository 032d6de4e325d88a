"""What the package knows of, and asks of, the machine it runs on: the CPU's name (for the run's
record and the benchmarks' headers), and how the process's C allocator treats freed memory
(``allocator`` in the training config).

glibc's ``malloc`` serves each block above a threshold (128 KiB, raised on the fly up to 32 MiB) by
a fresh ``mmap`` and unmaps it when it is freed, and it returns free memory at the top of its heap
to the system once more than a trim threshold is free. A PPO update allocates and frees the same
large tensors on every minibatch (a batch of 256 Atari observations is 29 MB as floats, and the
convolutions' activations and gradients are of that order), so each of them comes back as new
pages that the kernel must fault in and zero: 96-283 thousand page faults per Atari update of
RIM-PPO (``benchmarks/allocator.py``).
:func:`retain_freed_memory` raises both thresholds so that freed blocks stay in the heap for the
next minibatch. The numbers computed are the same; the process's peak memory is the same (it still
needs its largest working set); what changes is that memory freed after the peak is kept for reuse
instead of being handed back (``benchmarks/allocator.py``: at most 4.5 thousand faults per update).

Elsewhere than on glibc (macOS, musl) the setting does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
from pathlib import Path

import torch as th

from rim_agents.config import ALLOCATORS

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this size come from the heap, and up to this much free memory stays there.
RETAIN_BYTES = 1 << 30


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory(limit: int = RETAIN_BYTES) -> bool:
    """Keep freed blocks of up to ``limit`` bytes, and up to ``limit`` bytes of free heap, for reuse
    in this process (glibc); False where the C library is not glibc or refuses the setting.

    It applies to the whole process from the call on and cannot be undone to glibc's adaptive
    default, so the training job calls it, not the library on import."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))


def apply_allocator(setting: str) -> bool:
    """Apply an ``allocator`` setting (:data:`ALLOCATORS`); whether it changed anything."""
    if setting not in ALLOCATORS:
        raise ValueError(f"allocator={setting!r} is not one of {', '.join(ALLOCATORS)}")
    return retain_freed_memory() if setting == "retain" else False


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` says, else "unknown"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe() -> str:
    """One line for a benchmark's header: the CPU, its cores and the torch threads in use (speed
    ratios differ from one CPU to another: quote them with the machine)."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {th.get_num_threads()} torch threads"
