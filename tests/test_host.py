"""rim_agents.host: ``allocator=retain`` (freed memory reused instead of faulted in again, glibc)
and the CPU's name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rim_agents import host

# Allocate, touch and free a 64 MiB buffer 20 times; count the page faults of the last 19 rounds.
PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from rim_agents import host
    applied = host.apply_allocator(sys.argv[1])
    def touch():
        buf = torch.ones(64 << 18)  # 64 MiB of float32, written page by page
        del buf
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(19):
        touch()
    print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
    """
)


def probe(setting: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def huge_pages_always() -> bool:
    """Whether the kernel backs every large anonymous mapping with 2 MiB pages (one fault per 512
    pages: then faults do not count pages)."""
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(host._glibc() is None, reason="the C library is not glibc")
@pytest.mark.skipif(huge_pages_always(), reason="transparent huge pages for every mapping")
def test_retained_memory_is_reused_without_page_faults() -> None:
    system, retain = probe("system"), probe("retain")
    assert not system["applied"] and retain["applied"]
    pages = 19 * (64 << 20) // 4096
    assert system["faults"] > pages // 2  # glibc maps a fresh 64 MiB (more than 32 MiB) each time
    # The heap keeps the pages: measured, one or two rounds' worth in 19 (the first extends the heap).
    assert retain["faults"] < pages // 4


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="allocator='tcmalloc' is not one of retain, system"):
        host.apply_allocator("tcmalloc")


def test_the_cpu_is_named() -> None:
    name = host.cpu_name()
    assert name and name != "unknown" and "\n" not in name
    assert host.describe().startswith(f"{name}, ") and "torch threads" in host.describe()
