"""SIGTERM (SLURM preemption) remembered until the loop reaches a step it can save at."""

from __future__ import annotations

import signal
from typing import Any

import torch.distributed as tdist

from trainer.distributed import all_reduce_sum


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run should exit 0."""


class StopFlag:
    """Set by SIGTERM; `agreed()` tells every rank at once, so all stop at the same step."""

    def __init__(self) -> None:
        self.raised = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def agreed(self) -> bool:
        """True when any rank was signalled: ranks must stop at the same step or they hang."""
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return self.raised
        return all_reduce_sum([float(self.raised)])[0] > 0
