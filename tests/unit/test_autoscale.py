"""The autoscaling policy on constructed histories: exact decisions and reasons."""

from __future__ import annotations

import json

import pytest

from spotrag_operator import autoscale
from spotrag_operator.autoscale import AutoscalerState, InvalidScalingPolicy, Observation, ScalingPolicy, Slo, decide
from spotrag_operator.calibration import rates_from_spec
from spotrag_operator.crd import defaulted_spec

POLICY = ScalingPolicy(
    min_replicas=1,
    max_replicas=10,
    on_demand_baseline=1,
    target_queued_tokens_per_replica=1000,
    scale_up_stabilization_seconds=0,
    scale_down_stabilization_seconds=300,
    max_scale_up_step=4,
)


def run(steps, policy=POLICY, state=None):
    """Feed (time, queued tokens, ready, starting) steps; return [(desired, reason)] and the last state."""
    decisions = []
    for now, queued, ready, starting in steps:
        decision, state = decide(
            policy, Observation(now=now, queued_tokens=queued, ready=ready, starting=starting), state
        )
        decisions.append((decision.desired, decision.reason))
    return decisions, state


def test_burst_scales_up_at_most_max_step_per_period_then_the_rest():
    decisions, _ = run(
        [
            (0, 500, 1, 0),
            (10, 9000, 1, 0),  # needs 9: +4 now
            (20, 9000, 1, 4),  # same period (15 s): nothing more yet
            (30, 9000, 1, 4),  # next period: the remaining 4
            (40, 9000, 5, 4),
        ]
    )
    assert decisions == [
        (1, autoscale.STEADY),
        (5, autoscale.SCALE_UP_LIMITED),
        (5, autoscale.SCALE_UP_LIMITED),
        (9, autoscale.SCALE_UP),
        (9, autoscale.STEADY),
    ]


def test_scale_down_waits_for_the_whole_window_then_goes_to_its_highest():
    steps = [(0, 9000, 9, 0)] + [(t, 2000, 9, 0) for t in range(10, 301, 10)] + [(310, 2000, 9, 0)]
    decisions, _ = run(steps, state=AutoscalerState(desired=9))
    assert decisions[0] == (9, autoscale.STEADY)
    assert decisions[1:-1] == [(9, autoscale.SCALE_DOWN_STABILIZING)] * 30
    assert decisions[-1] == (2, autoscale.SCALE_DOWN)


def test_scale_down_goes_to_the_highest_recommendation_still_in_the_window():
    steps = [(0, 9000, 9, 0), (100, 6000, 9, 0), (200, 2000, 9, 0), (301, 2000, 9, 0), (401, 2000, 6, 0)]
    decisions, _ = run(steps, state=AutoscalerState(desired=9))
    assert decisions == [
        (9, autoscale.STEADY),
        (9, autoscale.SCALE_DOWN_STABILIZING),
        (9, autoscale.SCALE_DOWN_STABILIZING),
        (6, autoscale.SCALE_DOWN),  # the 9 left the window, the 6 from t=100 has not
        (2, autoscale.SCALE_DOWN),
    ]


def test_tolerance_band_holds_small_deviations():
    decisions, _ = run([(0, 5400, 5, 0), (10, 5600, 5, 0)], state=AutoscalerState(desired=5))
    assert decisions == [(5, autoscale.WITHIN_TOLERANCE), (6, autoscale.SCALE_UP)]
    # Below the target: 9000 alone would ask for 9 of 10, but is within 10%.
    decisions, _ = run([(0, 9000, 10, 0), (10, 8900, 10, 0)], state=AutoscalerState(desired=10))
    assert decisions == [(10, autoscale.WITHIN_TOLERANCE), (10, autoscale.SCALE_DOWN_STABILIZING)]


def test_flapping_input_moves_the_target_once():
    steps = [(t, 3000 if (t // 10) % 2 == 0 else 6000, 3, 0) for t in range(0, 290, 10)]
    decisions, _ = run(steps, state=AutoscalerState(desired=3))
    assert decisions[0] == (3, autoscale.STEADY)
    assert decisions[1] == (6, autoscale.SCALE_UP)
    assert {d for d, _ in decisions[1:]} == {6}
    changes = sum(1 for a, b in zip(decisions, decisions[1:], strict=False) if a[0] != b[0])
    assert changes == 1


def test_starting_engines_count_as_capacity_coming():
    # First run after a restart: 2 ready + 2 starting is the current size, and
    # 4 engines' worth of queue asks for nothing more.
    decision, state = decide(POLICY, Observation(now=0, queued_tokens=4000, ready=2, starting=2))
    assert (decision.desired, decision.reason) == (4, autoscale.STEADY)
    assert "2 of 4 still starting" in decision.message
    assert state.desired == 4


def test_stale_metric_holds_the_current_size_and_says_why():
    _, state = run([(0, 6000, 6, 0)], state=AutoscalerState(desired=6))
    decision, held = decide(
        POLICY,
        Observation(now=10, queued_tokens=None, ready=6, starting=0, metric_problem="gateway scrape timed out"),
        state,
    )
    assert (decision.desired, decision.reason) == (6, autoscale.METRIC_UNAVAILABLE)
    assert decision.recommendation is None
    assert "gateway scrape timed out" in decision.message
    assert held.highs == state.highs  # a missing sample is not a zero


def test_stale_metric_on_first_run_adopts_what_runs():
    decision, _ = decide(POLICY, Observation(now=0, queued_tokens=None, ready=3, starting=1))
    assert (decision.desired, decision.reason) == (4, autoscale.METRIC_UNAVAILABLE)


def test_maximum_and_floor():
    decisions, _ = run([(0, 10**6, 9, 0)], state=AutoscalerState(desired=9))
    assert decisions == [(10, autoscale.AT_MAXIMUM)]
    floor_policy = ScalingPolicy(
        min_replicas=0,
        max_replicas=10,
        on_demand_baseline=2,
        target_queued_tokens_per_replica=1000,
        scale_down_stabilization_seconds=0,
    )
    decisions, _ = run([(0, 0, 5, 0)], policy=floor_policy, state=AutoscalerState(desired=5))
    assert decisions == [(2, autoscale.AT_FLOOR)]


def test_scale_up_stabilization_takes_the_lowest_recommendation():
    policy = ScalingPolicy(
        min_replicas=1,
        max_replicas=10,
        on_demand_baseline=1,
        target_queued_tokens_per_replica=1000,
        scale_up_stabilization_seconds=30,
    )
    decisions, _ = run([(0, 500, 1, 0), (10, 5000, 1, 0), (20, 5000, 1, 0), (31, 5000, 1, 0)], policy=policy)
    assert decisions == [
        (1, autoscale.STEADY),
        (1, autoscale.SCALE_UP_LIMITED),
        (1, autoscale.SCALE_UP_LIMITED),
        (5, autoscale.SCALE_UP),
    ]


def test_scale_to_zero_and_back_when_allowed():
    policy = ScalingPolicy(
        min_replicas=0,
        max_replicas=4,
        on_demand_baseline=0,
        target_queued_tokens_per_replica=1000,
        scale_down_stabilization_seconds=0,
    )
    decisions, _ = run([(0, 0, 1, 0), (10, 1, 0, 0)], policy=policy, state=AutoscalerState(desired=1))
    assert decisions == [(0, autoscale.SCALE_DOWN), (1, autoscale.SCALE_UP)]


def test_state_survives_json_and_decisions_continue_identically():
    steps = [(0, 9000, 1, 0), (10, 9000, 5, 0), (20, 1000, 5, 0)]
    _, state = run(steps)
    stored = json.loads(json.dumps(state.to_dict()))
    restored = AutoscalerState.from_dict(stored)
    assert restored == state
    later = [(30, 1000, 5, 0), (400, 1000, 5, 0)]
    assert (
        run(later, state=restored)[0]
        == run(later, state=state)[0]
        == [(5, autoscale.SCALE_DOWN_STABILIZING), (1, autoscale.SCALE_DOWN)]
    )


def test_state_stays_small_however_often_it_reconciles():
    steps = [(t, 3000 + (t % 7) * 100, 3, 0) for t in range(0, 3000)]
    _, state = run(steps, state=AutoscalerState(desired=3))
    assert len(state.highs) <= 3 and len(state.lows) == 1


def test_entries_from_a_clock_that_went_back_are_dropped():
    state = AutoscalerState(desired=4, highs=[(1000.0, 9)], lows=[(1000.0, 9)])
    decision, new_state = decide(POLICY, Observation(now=500, queued_tokens=1000, ready=4, starting=0), state)
    assert (decision.desired, decision.reason) == (1, autoscale.SCALE_DOWN)
    assert new_state.highs == [(500, 1)]


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ({"desired": -1}, "'desired' must be a non-negative integer"),
        ({"highs": [[1, 2, 3]]}, "'highs' must be a list of [time, count] pairs"),
        ({"lastScaleTime": "yesterday"}, "'lastScaleTime' must be a number"),
        ([1, 2], "must be an object"),
    ],
)
def test_malformed_state_is_refused_naming_the_field(stored, problem):
    with pytest.raises(ValueError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        AutoscalerState.from_dict(stored)


def test_policy_from_the_crd_defaults():
    spec = defaulted_spec({"spec": {"model": {"name": "Qwen/Qwen2.5-7B-Instruct"}}})
    assert ScalingPolicy.from_spec(spec) == ScalingPolicy(
        min_replicas=1,
        max_replicas=4,
        on_demand_baseline=1,
        target_queued_tokens_per_replica=None,  # sized to the SLO
        scale_up_stabilization_seconds=30,
        scale_down_stabilization_seconds=300,
        max_scale_up_step=4,
        max_scale_up_percent=100,
        slo=Slo(ttft_seconds=2.0, percentile=95.0),
        engine_rates=rates_from_spec({"preset": "L4/Mistral-7B"}),
        max_inflight_tokens_per_engine=65536,
        max_model_len=8192,  # the default context: the longest prompt the SLO check allows for
    )


def test_inconsistent_settings_are_refused_naming_each_problem():
    with pytest.raises(InvalidScalingPolicy) as error:
        ScalingPolicy(min_replicas=5, max_replicas=3, on_demand_baseline=4, target_queued_tokens_per_replica=0)
    message = str(error.value)
    assert "minReplicas 5 exceeds maxReplicas 3" in message
    assert "onDemandBaseline must be in 0..maxReplicas (3), got 4" in message
    assert "targetQueuedTokensPerReplica must be positive" in message


def test_bad_observations_are_refused():
    with pytest.raises(ValueError, match="queued_tokens must be a non-negative number"):
        Observation(now=0, queued_tokens=-5, ready=1, starting=0)
    with pytest.raises(ValueError, match="engine counts must not be negative"):
        Observation(now=0, queued_tokens=5, ready=-1, starting=0)


ZERO = ScalingPolicy(
    min_replicas=0,
    max_replicas=4,
    on_demand_baseline=0,
    target_queued_tokens_per_replica=1000,
    scale_up_stabilization_seconds=60,
    scale_down_stabilization_seconds=30,
)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # Idle: the last engine goes once the scale-down window has seen no work.
        ([(0, 500, 1, 0), (20, 0, 1, 0), (31, 0, 1, 0)], [1, 1, 0]),
        # At zero, one held request's tokens ask for an engine at once, though the
        # scale-up window (60 s) would otherwise hold the size for a minute.
        ([(0, 0, 0, 0), (10, 12, 0, 0)], [0, 1]),
        # Its only engine draining (not counted as capacity): the next one is asked for at once.
        ([(0, 0, 0, 0), (5, 300, 0, 0)], [0, 1]),
        # Above zero the window holds as before.
        ([(0, 500, 1, 0), (10, 3000, 1, 0)], [1, 1]),
    ],
    ids=["idle-to-zero", "from-zero-at-once", "only-engine-draining", "window-above-zero"],
)
def test_scale_to_zero_and_from_zero(steps, expected):
    state = AutoscalerState(desired=steps[0][2])
    decisions, _ = run(steps, policy=ZERO, state=state)
    assert [desired for desired, _ in decisions] == expected


def test_scaling_from_zero_says_so():
    decision, _ = decide(ZERO, Observation(now=10, queued_tokens=12, ready=0, starting=0), AutoscalerState(desired=0))
    assert decision.reason == autoscale.SCALE_UP and "from zero" in decision.message
