"""saelab.stats: frontier interpolation, paired CIs and verdicts against hand computations and simulations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from saelab.stats import Measurement, compare, frontier_weights, seed_spread, verdict

W24 = math.log(24 / 16) / math.log(2)  # weight on L0 32 when interpolating at L0 24 between 16 and 32 in log L0


# ---------------------------------------------------------------- frontier_weights
def test_log_interpolation_between_16_and_32():
    w = frontier_weights([16, 32, 64], 24, log_x=True)
    assert set(w) == {0, 1}
    assert w[1] == pytest.approx(W24) and w[0] == pytest.approx(1 - W24)


def test_linear_interpolation_for_fve():
    w = frontier_weights([0.8, 0.9, 0.95], 0.82, log_x=False)
    assert w == pytest.approx({0: 0.8, 1: 0.2})


def test_unsorted_input_maps_back_to_original_indices():
    w = frontier_weights([64, 16, 32], 24, log_x=True)
    assert w == pytest.approx({1: 1 - W24, 2: W24})
    ys = np.array([5.0, 1.0, 2.0])
    assert sum(wi * ys[i] for i, wi in w.items()) == pytest.approx(1 + W24)


def test_outside_is_none_and_endpoints_are_exact():
    assert frontier_weights([16, 32, 64], 15.9, log_x=True) is None
    assert frontier_weights([16, 32, 64], 64.1, log_x=True) is None
    assert frontier_weights([16, 32, 64], 64, log_x=True) == {2: 1.0}
    assert frontier_weights([16, 32, 64], 16 * (1 - 1e-12), log_x=True) == {0: 1.0}  # within the 1e-9 slack
    assert frontier_weights([16, 32, 64], 32, log_x=True) == {1: 1.0}


def test_single_point_and_duplicates():
    assert frontier_weights([20.0], 20.0, log_x=True) == {0: 1.0}
    assert frontier_weights([20.0], 21.0, log_x=True) is None
    w = frontier_weights([16, 32, 32], 32, log_x=True)
    assert w == pytest.approx({1: 0.5, 2: 0.5})
    w = frontier_weights([16, 16, 32], 24, log_x=True)
    assert w == pytest.approx({0: (1 - W24) / 2, 1: (1 - W24) / 2, 2: W24})


def test_frontier_weights_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        frontier_weights([0, 16], 8, log_x=True)
    with pytest.raises(ValueError, match="finite"):
        frontier_weights([16, float("nan")], 20, log_x=True)


# ---------------------------------------------------------------- compare: hand-made tables
BASE_VALUES = {16: 1.0, 32: 2.0, 64: 4.0}


def _baseline(seeds=(0, 1, 2), items=None):
    return [Measurement(s, l0 * (1 + 0.01 * s), 0.8 + 0.01 * l0 / 16, v + 0.1 * s,
                        None if items is None else items(s, l0))
            for s in seeds for l0, v in BASE_VALUES.items()]


def _hand_base(s, arm_l0):
    l0s = [16 * (1 + 0.01 * s), 32 * (1 + 0.01 * s)]
    w = math.log(arm_l0 / l0s[0]) / math.log(l0s[1] / l0s[0])
    return (1 - w) * (1.0 + 0.1 * s) + w * (2.0 + 0.1 * s)


def test_delta_and_t_interval_match_hand_computation():
    arm_vals = [3.0, 3.2, 2.9]
    arm = [Measurement(s, 24.0, 0.85, v) for s, v in enumerate(arm_vals)]
    c = compare(arm, _baseline(), metric="m", direction="up")
    d = np.array([arm_vals[s] - _hand_base(s, 24.0) for s in range(3)])
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert c.delta == pytest.approx(d.mean())
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert c.n_seeds == 3 and c.n_items == 0 and c.method == "paired t over 3 seeds"
    assert c.arm_value == pytest.approx(np.mean(arm_vals))
    assert c.base_value == pytest.approx(np.mean([_hand_base(s, 24.0) for s in range(3)]))
    assert not c.out_of_range and "interpolated between L0" in c.matched_at


def test_fve_match_is_linear():
    base = [Measurement(0, 16, 0.80, 1.0), Measurement(0, 32, 0.90, 2.0)]
    c = compare([Measurement(0, 99.0, 0.82, 5.0)], base, metric="m", direction="up", match="fve")
    assert c.delta == pytest.approx(5.0 - (0.8 * 1.0 + 0.2 * 2.0))
    assert math.isnan(c.ci_low) and c.method == "none (1 seed, no items)"
    assert verdict(c)[0] == "inconclusive" and "no CI" in verdict(c)[1]


def test_items_are_interpolated_with_the_value_weights_and_keys_intersected():
    keys = ["a", "b", "c"]
    base = _baseline(seeds=(0,), items=lambda s, l0: {k: j * l0 for j, k in enumerate(keys)})
    arm_items = {"a": 1.0, "b": 30.0, "c": 70.0, "z": 1e6}  # "z" is missing on the baseline: ignored
    c = compare([Measurement(0, 24.0, 0.85, 0.0, arm_items)], base, metric="m", direction="up")
    lo, hi = 16.0, 32.0
    w = math.log(24 / lo) / math.log(hi / lo)
    hand = np.mean([arm_items[k] - ((1 - w) * j * lo + w * j * hi) for j, k in enumerate(keys)])
    assert c.n_items == 3 and c.delta == pytest.approx(hand)
    assert "seeds fixed" in c.method


def _item_tables(n_items, rng, effect=0.1, noise=1.0, seeds=3):
    keys = [f"i{j}" for j in range(n_items)]
    arm, base = [], []
    for s in range(seeds):
        mu = rng.normal(0, 1, n_items)
        a = mu + effect + rng.normal(0, noise, n_items)
        arm.append(Measurement(s, 32.0, 0.9, float(a.mean()), dict(zip(keys, a))))
        base.append(Measurement(s, 32.0, 0.9, float(mu.mean()), dict(zip(keys, mu))))
    return arm, base


def test_bootstrap_brackets_delta_and_shrinks_with_items():
    rng = np.random.default_rng(1)
    widths = []
    for n_items in (10, 400):
        arm, base = _item_tables(n_items, rng)
        c = compare(arm, base, metric="m", direction="up", match="none")
        assert c.ci_low < c.delta < c.ci_high
        assert c.method == f"paired bootstrap over {n_items} items × 3 seeds ∪ paired t over 3 seeds"
        assert c.n_items == n_items
        widths.append(c.ci_high - c.ci_low)
    assert widths[1] < widths[0] / 3  # ~sqrt(40) narrower


def test_bootstrap_identical_sides_gives_zero():
    rng = np.random.default_rng(2)
    keys = [f"i{j}" for j in range(26)]
    meas = [Measurement(s, 32.0, 0.9, 0.5, dict(zip(keys, rng.normal(size=26)))) for s in range(3)]
    c = compare(meas, meas, metric="m", direction="up", match="none")
    assert (c.delta, c.ci_low, c.ci_high) == (0.0, 0.0, 0.0)
    assert verdict(c)[0] == "inconclusive"


def test_bootstrap_is_seeded():
    arm, base = _item_tables(20, np.random.default_rng(3))
    arm, base = arm[:2], [m for m in base if m.seed < 2]  # two seeds: the interval is the bootstrap's alone
    a = compare(arm, base, metric="m", direction="up", match="none", rng_seed=5)
    b = compare(arm, base, metric="m", direction="up", match="none", rng_seed=5)
    c = compare(arm, base, metric="m", direction="up", match="none", rng_seed=6)
    assert a == b and a.ci_low != c.ci_low


# ---------------------------------------------------------------- compare: edge cases and errors
def test_single_point_baseline_falls_back_to_unmatched():
    base = [Measurement(s, 29.4, 0.9, 1.0) for s in range(2)]
    arm = [Measurement(s, 31.9, 0.9, 1.5 + 0.1 * s) for s in range(2)]
    c = compare(arm, base, metric="m", direction="up")
    assert c.delta == pytest.approx(0.55) and not c.out_of_range
    assert c.matched_at.startswith("unmatched: the baseline has one sparsity (L0 29.4 vs arm 31.9")


def test_out_of_range_is_excluded_and_inconclusive():
    arm = [Measurement(s, 200.0, 0.95, 9.0) for s in range(3)]
    c = compare(arm, _baseline(), metric="m", direction="up")
    assert c.out_of_range and c.n_seeds == 0 and math.isnan(c.delta)
    v, reason = verdict(c)
    assert v == "inconclusive"
    assert "arm L0 200 outside the baseline frontier [16, 65.3] for 3 seed(s)" in reason
    assert "add baseline sparsities" in reason


def test_partly_out_of_range_is_inconclusive_even_with_a_clear_effect():
    arm = [Measurement(0, 24.0, 0.85, 10.0), Measurement(1, 24.0, 0.85, 10.1), Measurement(2, 500.0, 0.9, 10.0)]
    c = compare(arm, _baseline(), metric="m", direction="up")
    assert c.out_of_range and c.n_seeds == 2 and c.ci_low > 0
    assert verdict(c)[0] == "inconclusive" and "seed 2 excluded" in c.notes[0]


def test_nan_seed_is_dropped_and_said():
    arm = [Measurement(0, 24.0, 0.85, 3.0), Measurement(1, 24.0, 0.85, float("nan")),
           Measurement(2, 24.0, 0.85, 3.1)]
    c = compare(arm, _baseline(), metric="m", direction="up")
    assert c.n_seeds == 2 and "seed 1 dropped" in c.notes[0] and "seed 1 dropped" in verdict(c)[1]
    assert c.delta == pytest.approx(np.mean([3.0 - _hand_base(0, 24), 3.1 - _hand_base(2, 24)]))


def test_nan_item_is_dropped_and_said():
    keys = ["a", "b", "c"]
    meas = [Measurement(s, 32.0, 0.9, 1.0, {"a": 1.0, "b": 2.0, "c": float("nan")}) for s in range(3)]
    arm = [Measurement(s, 32.0, 0.9, 1.0, {k: 5.0 for k in keys}) for s in range(3)]
    c = compare(arm, meas, metric="m", direction="up", match="none")
    assert c.n_items == 2 and c.delta == pytest.approx(3.5) and "['c']" in c.notes[0]


def test_errors_name_the_problem():
    arm = [Measurement(0, 24.0, 0.85, 3.0)]
    with pytest.raises(ValueError, match="direction"):
        compare(arm, _baseline(), metric="m", direction="higher")
    with pytest.raises(ValueError, match="match"):
        compare(arm, _baseline(), metric="m", direction="up", match="k")
    with pytest.raises(ValueError, match="choose match='l0'"):
        compare(arm, _baseline(), metric="m", direction="up", match="none")
    with pytest.raises(ValueError, match="duplicate arm seeds"):
        compare(arm * 2, _baseline(), metric="m", direction="up")


# ---------------------------------------------------------------- verdicts
def _seeds_table(deltas):
    arm = [Measurement(s, 24.0, 0.85, _hand_base(s, 24.0) + d) for s, d in enumerate(deltas)]
    return compare(arm, _baseline(), metric="m", direction="up")


def test_verdicts_on_synthetic_tables():
    better = _seeds_table([0.50, 0.52, 0.49])
    assert verdict(better)[0] == "reproduced" and "claimed direction (up)" in verdict(better)[1]
    worse = _seeds_table([-0.50, -0.52, -0.49])
    assert verdict(worse)[0] == "contradicted"
    down = compare([Measurement(s, 24.0, 0.85, _hand_base(s, 24.0) - 0.5 - 0.01 * s) for s in range(3)],
                   _baseline(), metric="m", direction="down")
    assert verdict(down)[0] == "reproduced"
    noisy = _seeds_table([0.5, -0.4, 0.1])
    v, reason = verdict(noisy)
    assert v == "inconclusive" and "includes 0" in reason
    v, reason = verdict(better, reconstruction_ok=False, reconstruction_note="FVE 0.81 < 0.85")
    assert v == "inconclusive" and "reconstruction condition failed (FVE 0.81 < 0.85)" in reason


def test_seed_spread():
    assert seed_spread([1.0]) is None
    assert seed_spread([1.0, 2.0, 4.0]) == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert seed_spread([1.0, float("nan"), 3.0]) == pytest.approx(math.sqrt(2))


# ---------------------------------------------------------------- calibration
def _simulate(effect_se: float, n_exp: int = 300, seeds: int = 3, n_items: int = 20, rng_seed: int = 0,
              sd_seed: float = 0.5, sd_item: float = 0.5, sd_resid: float = 1.0) -> float:
    """Share of 'reproduced' verdicts when the arm's true per-item shift is ``effect_se`` standard errors.

    The paired difference follows a crossed random-effects model d_si = effect + a_s + b_i + e_si with
    sd(a) = sd_seed, sd(b) = sd_item, sd(e) = sd_resid (seed, item and residual components), so
    SE(delta)² = sd_seed²/S + sd_item²/I + sd_resid²/(S I).
    """
    rng = np.random.default_rng(rng_seed)
    se = math.sqrt(sd_seed**2 / seeds + sd_item**2 / n_items + sd_resid**2 / (seeds * n_items))
    half_resid = sd_resid / math.sqrt(2)
    keys = [f"i{j}" for j in range(n_items)]
    hits = 0
    for e in range(n_exp):
        mu, b = rng.normal(0, 1, n_items), rng.normal(0, sd_item, n_items)
        arm, base = [], []
        for s in range(seeds):
            a = mu + effect_se * se + rng.normal(0, sd_seed) + b + rng.normal(0, half_resid, n_items)
            z = mu + rng.normal(0, half_resid, n_items)
            arm.append(Measurement(s, 32.0, 0.9, float(a.mean()), dict(zip(keys, a))))
            base.append(Measurement(s, 32.0, 0.9, float(z.mean()), dict(zip(keys, z))))
        c = compare(arm, base, metric="m", direction="up", match="none", n_boot=1000, rng_seed=e)
        hits += verdict(c)[0] == "reproduced"
    return hits / n_exp


def test_null_false_reproduced_rate_is_controlled():
    assert _simulate(0.0) < 0.05
    # seeds dominate the noise: the item bootstrap alone would call 13 % of these nulls "reproduced"
    assert _simulate(0.0, sd_seed=1.0, sd_item=0.0, sd_resid=0.1) < 0.05


def test_planted_effect_is_detected():
    """With 3 seeds the seed-level t interval (t_0.975, df 2 = 4.30) sets the detectable effect: about 6 SE."""
    assert _simulate(6.0, rng_seed=1) > 0.80
    assert _simulate(5.0, rng_seed=1, seeds=5) > 0.95
