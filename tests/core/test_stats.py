import math

import pytest

from esd.core.stats import Rate, SeedMean, pooled, verdict, wilson


def test_wilson_matches_its_formula_and_known_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662; 0/20 -> 0 to 0.1611; 20/20 -> 0.8389 to 1.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    low, high = wilson(5, 100)
    assert low < 0.05 < high and 0 < low
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(3, 2)


def test_rates_pool_over_images_and_print_with_their_interval():
    r = pooled([Rate(1, 100), Rate(3, 100)])
    assert (r.k, r.n, r.p) == (4, 200, 0.02)
    assert str(Rate(0, 100)) == "0.0% [0.0, 3.7]"
    assert Rate(4, 200).record()["interval"] == "Wilson 95%"


def test_seed_means_carry_a_t_interval():
    m = SeedMean((0.10, 0.12, 0.08, 0.11, 0.09))
    assert m.mean == pytest.approx(0.10)
    sd = math.sqrt(sum((v - 0.10) ** 2 for v in m.values) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert m.interval == pytest.approx((0.10 - half, 0.10 + half))
    assert SeedMean((0.3,)).interval is None and "1 seed" in str(SeedMean((0.3,)))


def test_a_target_is_met_only_at_the_intervals_far_end():
    assert verdict(0.03, (0.01, 0.045), 0.05) == "met"
    assert verdict(0.03, (0.01, 0.07), 0.05) == "point estimate"
    assert verdict(0.03, None, 0.05) == "point estimate"
    assert verdict(0.08, (0.06, 0.10), 0.05) == "not met"
    assert verdict(0.97, (0.95, 0.99), 0.9, lower_is_better=False) == "met"
