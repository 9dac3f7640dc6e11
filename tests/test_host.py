"""CPU process settings: threads per rank from the launcher's variables, heap reuse on glibc."""

from __future__ import annotations

import os
import platform

import pytest

from trainer.host import keep_freed_memory, threads_per_rank


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_the_users_thread_count_wins() -> None:
    assert threads_per_rank({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}) == 3


@pytest.mark.parametrize("variable", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE"])
def test_local_ranks_share_the_cores(variable: str) -> None:
    assert threads_per_rank({}) == _cores()
    assert threads_per_rank({variable: "2"}) == max(1, _cores() // 2)
    assert threads_per_rank({variable: str(4 * _cores())}) == 1


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_heap_reuse_applies_on_glibc() -> None:
    assert keep_freed_memory() is True
