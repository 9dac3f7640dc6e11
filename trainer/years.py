"""One --years syntax for every tool: 2018, 2014-2016 or 2014..2016, open 2019.. or ..2016, and lists of these.

Years (tasks) compare as strings, so yearly (2016) and monthly (201603) tags both work; open ranges
and named tasks only make sense against a list of tags that exist (`select`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.errors import UserError

_ITEM = re.compile(r"^\s*(?P<lo>[^\s.,-]*)\s*(?:(?P<sep>\.\.|-)\s*(?P<hi>[^\s.,-]*)\s*)?$")
EXAMPLE = "2014-2016,2018 (or 2014..2016, 2019..)"


class YearsError(UserError, ValueError):
    """A --years value that is malformed or selects nothing."""


@dataclass(frozen=True)
class Span:
    """One item of a --years list: first..last inclusive; None is open."""

    first: str | None
    last: str | None

    def __contains__(self, tag: str) -> bool:
        return (self.first is None or tag >= self.first) and (self.last is None or tag <= self.last)


def parse(spec: str) -> list[Span]:
    """The spans of `spec`; a single year is a span of one."""
    spans = []
    for part in spec.split(","):
        m = _ITEM.match(part)
        if not m or not (m["lo"] or m["hi"]) or (m["sep"] == "-" and not (m["lo"] and m["hi"])):
            raise YearsError(f"--years {spec!r}: expected years or ranges like {EXAMPLE}")
        lo, hi = m["lo"] or None, (m["hi"] or None) if m["sep"] else m["lo"]
        if lo is not None and hi is not None and hi < lo:
            raise YearsError(f"--years {spec!r}: {hi} comes before {lo}")
        spans.append(Span(lo, hi))
    return spans


def select(spec: str, tags: Sequence[str], what: str) -> list[str]:
    """The tags (in their order) that `spec` selects; a named year that is not a tag is an error."""
    spans = parse(spec)
    unknown = sorted({s.first for s in spans if s.first is not None and s.first == s.last and s.first not in tags})
    if unknown:
        raise YearsError(f"--years: {', '.join(unknown)} is not a {what} ({', '.join(tags)})")
    chosen = [t for t in tags if any(t in s for s in spans)]
    if not chosen:
        raise YearsError(f"--years: {spec} selects no {what} ({', '.join(tags)})")
    return chosen


def expand(spec: str) -> list[int]:
    """Every calendar year `spec` names, sorted (closed ranges of 4-digit years: data to generate or keep)."""
    years: set[int] = set()
    for s in parse(spec):
        if s.first is None or s.last is None or not (_is_year(s.first) and _is_year(s.last)):
            raise YearsError(f"--years {spec!r}: expected 4-digit years or closed ranges like 2014-2016,2018")
        years.update(range(int(s.first), int(s.last) + 1))
    return sorted(years)


def _is_year(tag: str) -> bool:
    return len(tag) == 4 and tag.isdigit()
