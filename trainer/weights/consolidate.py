"""Plain fp32 weights out of a DeepSpeed checkpoint, for warm starts and export."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainer.checkpoint import is_complete
from trainer.rundir import CheckpointError
from trainer.safe_load import restricted_unpickling

HANDED_ON = "handed_on.safetensors"
"""The weights a plan step hands on when a method merged them (methods/merge.py), beside the trained ones."""


def load_weights(ckpt_dir: Path, tag: str, trained: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated fp32 state dict of checkpoint `tag`, whatever the ZeRO stage that wrote it.

    A yearly checkpoint whose step merged weights hands those on (HANDED_ON) unless `trained`;
    resuming never reads this: DeepSpeed restores the trained weights.

    ZeRO checkpoints keep the fp32 master weights in per-rank optimizer shards; DeepSpeed's own
    consolidation reads them on the CPU without an engine. A ZeRO-0 fp32 checkpoint holds the
    module's state dict directly.
    """
    tag_dir = Path(ckpt_dir) / tag
    if not is_complete(tag_dir):
        raise CheckpointError(f"{tag_dir}: not a complete checkpoint")
    if not trained and (tag_dir / HANDED_ON).is_file():
        # safetensors holds tensors only: nothing in it can run code.
        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(tag_dir / HANDED_ON)).items()}
    with restricted_unpickling(tag_dir):
        if any(tag_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # It prints progress lines and bars, noise around our one line of outcome.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        else:
            files = sorted(tag_dir.glob("*model_states.pt"))
            if not files:
                raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file")
            state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    out = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    out["logit_scale"] = out["logit_scale"].reshape(())  # open_clip's shape; training uses [1]
    return out
