"""Training data: shard discovery, the per-year sample order, the rehearsal sampler, the loader."""

from __future__ import annotations

import importlib
from typing import Any

# Names resolve on first use: `trainer.data.records` & co. are used by data-prep tools that should
# not pay for importing torch and webdataset.
_EXPORTS = {
    "DataError": "shards", "Shard": "shards", "YearShards": "shards", "find_years": "shards",
    "open_shard": "shards", "YearOrder": "order", "stable_hash": "order", "Ref": "rehearsal",
    "RehearsalSampler": "rehearsal", "Schedule": "rehearsal", "split_quotas": "rehearsal",
    "StreamDataset": "pipeline", "build_loader": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainer.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainer.data.{_EXPORTS[name]}"), name)
