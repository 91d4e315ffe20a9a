"""Placement tables: on-demand baseline, spot, fallback after Pending, back-off, return to spot."""

from __future__ import annotations

import json

import pytest

from spotrag_operator import placement
from spotrag_operator.placement import (
    DRAINING,
    ON_DEMAND,
    PENDING,
    READY,
    SPOT,
    STARTING,
    EngineView,
    PlacementState,
    SpotSettings,
    place,
)

SETTINGS = SpotSettings(enabled=True, fallback_after_seconds=180, retry_after_seconds=600)
NOW = 10_000.0


def engine(name, capacity=SPOT, phase=READY, age=1000.0, zone=None, instance_type=None, at=0.0):
    """An engine that has been in its phase for `age` seconds at NOW + `at`."""
    return EngineView(
        name=name, capacity=capacity, phase=phase, since=NOW + at - age, zone=zone, instance_type=instance_type
    )


def split(result):
    return result.on_demand, result.spot, result.reason, result.give_up


@pytest.mark.parametrize(
    ("desired", "baseline", "engines", "expected"),
    [
        (4, 1, [], (1, 3, placement.SPOT_AVAILABLE, ())),
        (1, 2, [], (1, 0, placement.SPOT_AVAILABLE, ())),
        (0, 1, [], (0, 0, placement.SPOT_AVAILABLE, ())),
        # Pending, but not for long enough: wait for the node.
        (
            3,
            1,
            [engine("od", ON_DEMAND), engine("s1"), engine("s2", phase=PENDING, age=179)],
            (1, 2, placement.SPOT_AVAILABLE, ()),
        ),
        # Pending past fallbackAfter: give it up, keep the spot engine that has a node.
        (
            3,
            1,
            [engine("od", ON_DEMAND), engine("s1"), engine("s2", phase=PENDING, age=180)],
            (2, 1, placement.SPOT_SHORT, ("s2",)),
        ),
        # A spot engine loading its model counts as placed; a draining one does not.
        (
            5,
            1,
            [
                engine("s1", phase=STARTING),
                engine("s2", phase=DRAINING),
                engine("s3", phase=PENDING, age=400),
                engine("s4", phase=PENDING, age=200),
            ],
            (4, 1, placement.SPOT_SHORT, ("s3", "s4")),
        ),
        # Stuck on-demand engines are not placement's business.
        (2, 1, [engine("od", ON_DEMAND, phase=PENDING, age=900)], (1, 1, placement.SPOT_AVAILABLE, ())),
    ],
)
def test_split_from_nothing_remembered(desired, baseline, engines, expected):
    result, _ = place(desired=desired, baseline=baseline, settings=SETTINGS, engines=engines, now=NOW)
    assert split(result) == expected


def test_spot_off_puts_everything_on_demand():
    result, state = place(desired=4, baseline=1, settings=SpotSettings(enabled=False), engines=[engine("s1")], now=NOW)
    assert split(result) == (4, 0, placement.SPOT_DISABLED, ())
    assert state.short_until == {}


def test_fallback_marks_the_pool_of_the_pod_or_every_pool():
    engines = [
        engine("a", phase=PENDING, age=200, zone="us-east-1a", instance_type="g6.xlarge"),
        engine("b", phase=PENDING, age=200),
    ]
    result, state = place(desired=3, baseline=1, settings=SETTINGS, engines=engines, now=NOW)
    assert result.short_pools == ("*/*", "us-east-1a/g6.xlarge")
    assert state.short_until == {"us-east-1a/g6.xlarge": NOW + 600, "*/*": NOW + 600}


def test_an_engine_still_pending_in_a_marked_pool_does_not_extend_the_mark():
    state = PlacementState(short_until={"*/*": NOW + 300})
    result, new_state = place(
        desired=2, baseline=1, settings=SETTINGS, engines=[engine("s", phase=PENDING, age=500)], state=state, now=NOW
    )
    assert result.give_up == ("s",)
    assert new_state.short_until == {"*/*": NOW + 300}


def test_shortage_then_recovery_through_time():
    """Load needs 4: spot stays Pending → on-demand fills in → back-off → spot again, new first."""
    baseline, desired = 1, 4
    state = PlacementState()
    steps = [
        # (seconds after NOW, engines seen, expected (on-demand, spot, reason, give up))
        (0, [engine("od1", ON_DEMAND)], (1, 3, placement.SPOT_AVAILABLE, ())),
        (
            170,
            [engine("od1", ON_DEMAND)] + [engine(f"s{i}", phase=PENDING, age=170, at=170) for i in (1, 2, 3)],
            (1, 3, placement.SPOT_AVAILABLE, ()),
        ),
        (
            180,
            [engine("od1", ON_DEMAND)] + [engine(f"s{i}", phase=PENDING, age=180, at=180) for i in (1, 2, 3)],
            (4, 0, placement.SPOT_SHORT, ("s1", "s2", "s3")),
        ),
        (500, [engine(f"od{i}", ON_DEMAND) for i in (1, 2, 3, 4)], (4, 0, placement.SPOT_SHORT, ())),
        # The back-off (600 s from t=180) is over: ask for spot again; the
        # three on-demand engines above the baseline stay until spot is ready.
        (780, [engine(f"od{i}", ON_DEMAND) for i in (1, 2, 3, 4)], (1, 3, placement.SPOT_RETRY, ())),
        (
            900,
            [engine(f"od{i}", ON_DEMAND) for i in (1, 2, 3, 4)]
            + [engine(f"n{i}", phase=STARTING, age=20, at=900) for i in (1, 2, 3)],
            (1, 3, placement.SPOT_AVAILABLE, ()),
        ),
    ]
    for offset, engines, expected in steps:
        result, state = place(
            desired=desired, baseline=baseline, settings=SETTINGS, engines=engines, state=state, now=NOW + offset
        )
        assert split(result) == expected, f"at +{offset}s: {result.message}"
    assert state.short_until == {}


def test_retry_while_spot_is_still_short_falls_back_again():
    state = PlacementState(short_until={"*/*": NOW - 1})
    engines = [engine(f"od{i}", ON_DEMAND) for i in (1, 2, 3)]
    result, state = place(desired=3, baseline=1, settings=SETTINGS, engines=engines, state=state, now=NOW)
    assert split(result) == (1, 2, placement.SPOT_RETRY, ())
    assert "2 on-demand above the baseline leave once they are ready" in result.message
    engines += [engine("n1", phase=PENDING, age=180, at=180), engine("n2", phase=PENDING, age=180, at=180)]
    result, state = place(desired=3, baseline=1, settings=SETTINGS, engines=engines, state=state, now=NOW + 180)
    assert split(result) == (3, 0, placement.SPOT_SHORT, ("n1", "n2"))
    assert state.short_until == {"*/*": NOW + 780}


def test_state_survives_json():
    state = PlacementState(short_until={"us-east-1a/g6.xlarge": 123.5, "*/*": 99.0})
    assert PlacementState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert PlacementState.from_dict(None) == PlacementState()


def test_malformed_state_and_engines_are_refused():
    with pytest.raises(ValueError, match="'shortUntil' must map pools to times"):
        PlacementState.from_dict({"shortUntil": {"*/*": "soon"}})
    with pytest.raises(ValueError, match="capacity must be 'spot' or 'on-demand', not 'reserved'"):
        EngineView(name="x", capacity="reserved", phase=READY, since=0)
    with pytest.raises(ValueError, match="phase must be one of"):
        EngineView(name="x", capacity=SPOT, phase="Running", since=0)
    with pytest.raises(ValueError, match="must not be negative"):
        place(desired=-1, baseline=1, settings=SETTINGS, engines=[], now=NOW)


def test_settings_from_the_crd_defaults():
    from spotrag_operator.crd import defaulted_spec

    spec = defaulted_spec({"spec": {"model": {"name": "m"}}})
    assert SpotSettings.from_spec(spec) == SpotSettings(
        enabled=True, fallback_after_seconds=180, retry_after_seconds=600
    )
