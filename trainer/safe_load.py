"""Loading checkpoint files without executing them: tensors, containers and a short DeepSpeed allow-list.

A `.pt` file is a pickle, and a pickle can name any callable to run while it loads. DeepSpeed
loads its own states with `weights_only=False` (its checkpoint engine and `zero_to_fp32`), so a
crafted `mp_rank_00_model_states.pt` in a run folder would run its payload on `--resume`,
`--start-from run:...`, `tools/export.py --run` or `tools/evaluate.py --run`. Inside
`restricted_unpickling()` every `torch.load` of the process, DeepSpeed's included, uses torch's
weights-only unpickler, which builds tensors, plain containers and numbers, and beyond them only
the classes in `ALLOWED`: the plain-data records DeepSpeed writes into its optimizer states.
"""

from __future__ import annotations

import os
import pickle
import re
import runpy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaleConfig, LossScaleProfile, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from trainer.rundir import CheckpointError

ALLOWED: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    LossScaler,
    DynamicLossScaler,
    LossScaleConfig,
    LossScaleProfile,
    ZeroStageEnum,
    fragment_address,
]
"""What DeepSpeed 0.19's ZeRO 0-3 and universal checkpoints hold besides tensors (measured with
torch.serialization.get_unsafe_globals_in_checkpoint), plus the fp16 scaler's records."""

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
"""torch's switch that makes every torch.load weights-only, even where the caller says otherwise."""


@contextmanager
def restricted_unpickling(where: Path | str) -> Iterator[None]:
    """Every torch.load inside is weights-only with ALLOWED; a file that needs more is a CheckpointError."""
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(ALLOWED):
            yield
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where}: not loaded, {_what_it_needs(str(e))}") from None
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def _what_it_needs(message: str) -> str:
    """torch's many-line refusal reduced to the object the file asked for."""
    found = re.search(r"(?:unsupported|Unsupported) (?:GLOBAL|global|operand) ([^\s,]+)", message)
    if found:
        return f"a file in it is not plain tensor data (it asks for {found.group(1)})"
    return "a file in it is not plain tensor data"


def main(argv: list[str]) -> int:
    """`python -m trainer.safe_load MODULE ARGS...`: run MODULE's command line with restricted unpickling.

    DeepSpeed's universal converter is such a command line; its worker processes are forked, so
    they inherit the restriction.
    """
    module, *args = argv
    sys.argv = [module, *args]
    try:
        with restricted_unpickling(module):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except CheckpointError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
