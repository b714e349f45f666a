"""Session-wide fixtures: CPU threads, and one worker group per (TP, PP) size."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Tests use at most the machine's cores; worker processes get 2 // tp threads each.
torch.set_num_threads(min(2, os.cpu_count() or 1))
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py for test modules in subfolders


class WorkerGroups:
    """Spawned lazily, kept for the whole session: spawning ranks costs seconds each."""

    def __init__(self) -> None:
        self._groups = {}

    def get(self, tp: int, pp: int = 1):
        from tpserve.model.launcher import WorkerGroup

        group = self._groups.get((tp, pp))
        if group is None or not group.alive:
            # Stages take turns (one batch in flight), so only the TP ranks of one stage share the cores.
            group = self._groups[tp, pp] = WorkerGroup(tp, pp, threads_per_rank=max(1, 2 // tp))
        return group

    def close(self) -> None:
        for group in self._groups.values():
            group.close()


@pytest.fixture(scope="session")
def worker_groups():
    groups = WorkerGroups()
    yield groups
    groups.close()
