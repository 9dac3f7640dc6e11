"""The sample record every input kind produces and the shard writer consumes, and the skip reasons."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

# Skip reasons that count towards --max-bad-frac; the others only filter samples out by design.
BAD_REASONS = (
    "corrupt_image",
    "missing_image",
    "missing_caption",
    "bad_timestamp",
    "missing_year",
    "bad_row",
    "bad_class",
    "bad_encoding",
    "field_too_large",
    "image_outside_root",
    "image_too_large",
    "member_too_large",
)
FILTER_REASONS = ("uid_not_listed", "year_not_selected")

# Short enough that "<key>.json" fits a USTAR member name.
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class Sample:
    """One output sample: where it goes (split, year) and its encoded tar members by extension."""

    key: str
    split: str
    year: int
    members: dict[str, bytes]


# A unit yields either a sample or the reason it skipped one.
UnitItem = Sample | str


class Unit(Protocol):
    """An independent piece of input work; its items come out in a fixed order."""

    def items(self) -> Iterator[UnitItem]:
        """The samples of this unit in input order, or skip reasons in their place."""


def key_for(uid: str) -> str:
    """A tar key for `uid`: the uid itself when it is dot-free and safe, else a stable hash of it."""
    if _SAFE_KEY.fullmatch(uid):
        return uid
    return hashlib.blake2b(uid.encode("utf-8"), digest_size=16).hexdigest()


def eval_draw(uid: str) -> float:
    """A uniform number in [0, 1) fixed by the uid alone, so the eval split never depends on the seed."""
    digest = hashlib.blake2b(uid.encode("utf-8"), digest_size=8, person=b"tic-eval").digest()
    return int.from_bytes(digest, "big") / 2**64


def make_sample(
    uid: str, year: int, split: str, image: bytes, ext: str, caption: str, meta: dict[str, Any], cls: int | None = None
) -> Sample:
    """Build a Sample with the DataComp-compatible members (.jpg/.png/.webp, .txt, .json, optional .cls)."""
    fields = dict(meta)
    fields.update(uid=uid, year=year)
    members = {
        ext: image,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8"),
    }
    if cls is not None:
        members["cls"] = str(cls).encode("ascii")
    return Sample(key=key_for(uid), split=split, year=year, members=members)
