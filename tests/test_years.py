"""One --years syntax for launch/train.py and tools/make_shards.py; the old spellings of both still work."""

from __future__ import annotations

import pytest

from trainer.years import YearsError, expand, select

TAGS = ["2014", "2015", "2016", "2017", "2018"]


@pytest.mark.parametrize(
    ("spec", "chosen"),
    [
        ("2015..2017", ["2015", "2016", "2017"]),  # train.py's old range
        ("2014,2016", ["2014", "2016"]),  # train.py's old list
        ("2014-2015,2018", ["2014", "2015", "2018"]),  # make_shards' old spelling, now for training too
        ("2017..", ["2017", "2018"]),
        ("..2015", ["2014", "2015"]),
        ("2014, 2016..2017", ["2014", "2016", "2017"]),
        ("2016,2014", ["2014", "2016"]),  # plan order, not the order written
    ],
)
def test_select_steps_by_any_spelling(spec: str, chosen: list[str]) -> None:
    assert select(spec, TAGS, "step of the plan") == chosen


@pytest.mark.parametrize(
    ("spec", "years"),
    [("2014-2016,2018", [2014, 2015, 2016, 2018]), ("2014..2016", [2014, 2015, 2016]), ("2020", [2020])],
)
def test_expand_years_to_generate(spec: str, years: list[int]) -> None:
    assert expand(spec) == years


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: select("2031", TAGS, "step of the plan"), "--years: 2031 is not a step of the plan"),
        (lambda: select("2030..2040", TAGS, "step of the plan"), "2030..2040 selects no step of the plan"),
        (lambda: select("2016-2014", TAGS, "x"), "2014 comes before 2016"),
        (lambda: select("2014-", TAGS, "x"), "expected years or ranges"),
        (lambda: select("", TAGS, "x"), "expected years or ranges"),
        (lambda: expand("2019.."), "closed ranges"),
        (lambda: expand("2014-2016x"), "expected"),
    ],
)
def test_bad_years_are_user_errors(call, message: str) -> None:
    with pytest.raises(YearsError, match=message):
        call()
