"""SIGTERM (SLURM preemption) or Ctrl-C remembered until the loop reaches a step it can save at."""

from __future__ import annotations

import signal
from typing import Any

import torch.distributed as tdist

from trainer.distributed import all_reduce_sum


class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint was saved and the run should exit 0."""


class StopFlag:
    """Set by SIGTERM or a first SIGINT; `agreed()` tells every rank at once, so all stop at the same step.

    A second SIGINT interrupts at once, as Ctrl-C does elsewhere: whoever presses it twice would
    rather lose the steps since the last checkpoint than wait for the next one.
    """

    def __init__(self) -> None:
        self.raised = False
        self.name = "SIGTERM"
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.raised, self.name = True, signal.Signals(signum).name

    def agreed(self) -> bool:
        """True when any rank was signalled: ranks must stop at the same step or they hang."""
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return self.raised
        return all_reduce_sum([float(self.raised)])[0] > 0
