"""The equal-cost reading of swept curves (simulator/spotrag_simulator/sweep.py)."""

from __future__ import annotations

import pytest

from spotrag_simulator.presets import build_profile
from spotrag_simulator.run import KEDA, KEDA_NO_SPOT, KUBEAI, KUBEAI_NO_SPOT, SPOTRAG, SPOTRAG_NO_SPOT
from spotrag_simulator.sweep import Point, at_cost, equal_cost_table, with_knob


def point(value: float, cost: float, slo: float, lost: int = 0, policy: str = KUBEAI) -> Point:
    return Point(
        policy=policy, value=value, cost_vs_peak=cost, slo_minutes=slo, lost=lost, warmup_lost=0, scale_changes=0
    )


CURVE = [point(9, 0.28, 0.990, 4), point(5, 0.40, 1.0, 0), point(7, 0.32, 0.998, 2)]  # unsorted on purpose


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        (0.30, (0.994, 3.0, (9, 7))),  # halfway between the points at 0.28 and 0.32
        (0.28, (0.990, 4.0, (9, 7))),  # on a point
        (0.36, (0.999, 1.0, (7, 5))),
        (0.40, (1.0, 0.0, (7, 5))),
        (0.27, None),  # cheaper than any setting tried: not reachable
        (0.41, None),
    ],
)
def test_a_curve_is_read_at_a_cost_between_the_bracketing_points(cost, expected):
    found = at_cost(CURVE, cost)
    if expected is None:
        assert found is None
        return
    slo, lost, between = expected
    assert found.slo_minutes == pytest.approx(slo)
    assert found.lost == pytest.approx(lost)
    assert found.between == between


def test_a_single_point_is_read_only_at_its_own_cost():
    assert at_cost([point(1, 0.3, 0.99)], 0.3).slo_minutes == 0.99
    assert at_cost([point(1, 0.3, 0.99)], 0.31) is None
    assert at_cost([], 0.3) is None


@pytest.mark.parametrize(
    ("policy", "value", "read"),
    [
        (SPOTRAG, 0.6, lambda p: p.spec["scaling"]["slo"]["targetUtilization"]),
        (KUBEAI, 9, lambda p: p.kubeai.target_requests),
        (KEDA, 0.5, lambda p: p.keda.waiting_threshold),
        # Spot off: the same knob.
        (SPOTRAG_NO_SPOT, 0.6, lambda p: p.spec["scaling"]["slo"]["targetUtilization"]),
        (KUBEAI_NO_SPOT, 8, lambda p: p.kubeai.target_requests),
        (KEDA_NO_SPOT, 32, lambda p: p.keda.waiting_threshold),
    ],
)
def test_each_policy_sweeps_its_own_knob(policy, value, read):
    profile = build_profile({"slo": {"ttftSeconds": 2, "percentile": 95}})
    assert read(with_knob(profile, policy, value)) == value
    assert with_knob(profile, SPOTRAG, 0.6).utilization_set  # the simulator does not resize it


def test_the_table_says_where_a_baseline_cannot_reach():
    points = [point(0.5, 0.25, 0.995, policy=SPOTRAG), point(0.4, 0.30, 1.0, policy=SPOTRAG), *CURVE]
    table = equal_cost_table(points, (SPOTRAG,), (KUBEAI,))
    assert "not reachable in the sweep" in table  # 0.25 is cheaper than KubeAI's cheapest setting
    assert "99.40% / 3 (9–7)" in table  # 0.30: interpolated


def test_spot_off_is_read_against_the_baselines_on_demand_only():
    points = [
        point(0.5, 0.68, 1.0, policy=SPOTRAG_NO_SPOT),
        point(7, 0.60, 0.99, 3, policy=KUBEAI_NO_SPOT),
        point(5, 0.76, 1.0, 1, policy=KUBEAI_NO_SPOT),
        point(7, 0.33, 1.0, 0, policy=KUBEAI),  # on spot: not at the same prices
    ]
    table = equal_cost_table(points, (SPOTRAG_NO_SPOT,), (KUBEAI_NO_SPOT,))
    assert "| spotrag-no-spot targetUtilization 0.5 | 0.680 | 100.00% / 0 | 99.50% / 2 (7–5) |" in table
