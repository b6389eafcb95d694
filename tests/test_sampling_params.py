"""SamplingParams refuses values that would sample garbage or crash later, naming the parameter and the fix."""

import math

import pytest

from dsjax.runtime.sampling import SamplingParams


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=math.nan), r"temperature=nan must be a finite number >= 0"),
    (dict(temperature=math.inf), r"temperature=inf must be a finite number >= 0"),
    (dict(top_p=math.nan), r"top_p=nan must lie in \(0, 1\]"),
    (dict(top_p=math.inf), r"top_p=inf must lie in \(0, 1\]"),
    (dict(stop=[""]), r"stop=\[''\]: an empty stop string matches everywhere"),
    (dict(stop=("END", "")), r"an empty stop string matches everywhere"),
    (dict(seed=2**70), r"seed=1180591620717411303424 must be an integer in \[0, 2\*\*64\), or None"),
    (dict(seed=-1), r"seed=-1 must be an integer in \[0, 2\*\*64\)"),
    (dict(seed=1.5), r"seed=1.5 must be an integer"),
], ids=["temperature-nan", "temperature-inf", "top_p-nan", "top_p-inf", "stop-empty", "stop-empty-among-others",
        "seed-2**70", "seed-negative", "seed-float"])
def test_bad_values_name_the_parameter(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_seed_none_and_the_ends_of_the_range_are_accepted():
    assert SamplingParams(seed=None).seed is None               # the engine draws a fresh random seed
    assert SamplingParams(seed=0).seed == 0 and SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(stop="END").stop == ("END",)
