"""``ExactSum``: the correctly rounded sum, whatever the order or grouping of the terms."""

from __future__ import annotations

import math

import numpy as np

from quantcli.compare.exact_sum import ExactSum


def test_equals_fsum_in_any_order_and_grouping(rng) -> None:
    terms = [float(x) for x in rng.normal(size=400) * 10.0 ** rng.integers(-300, 300, size=400)]
    terms += [5e-324, 1e308, -1e308, 0.1, 0.2]
    one = ExactSum()
    one.extend(terms)
    assert one.value == math.fsum(terms)
    shuffled = [terms[i] for i in rng.permutation(len(terms))]
    parts = [ExactSum(), ExactSum(), ExactSum()]
    for k, part in enumerate(parts):
        part.extend(shuffled[k::3])
    parts[0].merge(parts[1])
    parts[0].merge(parts[2])
    assert parts[0].value == one.value
    naive = 0.0
    for x in shuffled:
        naive += x
    assert naive != one.value  # a float running sum here depends on the order


def test_infinities_and_nan_win_as_in_float_addition() -> None:
    big = ExactSum()
    big.extend([1e308, 1e308])
    assert big.value == math.inf
    inf = ExactSum()
    inf.extend([1.0, math.inf])
    assert inf.value == math.inf
    nan = ExactSum()
    nan.extend([math.inf, -math.inf, 2.0])
    assert math.isnan(nan.value)
    assert ExactSum().value == 0.0 and np.float64(ExactSum().value) == 0
