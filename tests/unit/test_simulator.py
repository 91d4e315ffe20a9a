"""`spotrag simulate`: the engine model, gateway resume vs no gateway, the real
policy under a spot outage, determinism, and refusal of bad traces and profiles."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spotrag_simulator import cli, compare
from spotrag_simulator.engine_model import Engine, Request
from spotrag_simulator.policies import SpotragController, Target, node_pool
from spotrag_simulator.presets import EngineSpec, ProfileError, build_profile, load_profile
from spotrag_simulator.report import minute_percentiles
from spotrag_simulator.run import KNOWN, NO_SPOT, PEAK, controller_for
from spotrag_simulator.sim import Simulation
from spotrag_simulator.sizing import engine_load
from spotrag_simulator.trace import TraceError, TraceRequest, generate_trace, load_trace

SPEC = EngineSpec(
    decode_step_seconds=0.05,
    seconds_per_token=0.001,
    seconds_per_context_token=1e-6,
    kv_cache_tokens=10_000,
    max_model_len=8192,
)


def steady_trace(
    rate: float, start: float, end: float, prompt: int = 1000, output: int = 100, first_row: int = 1
) -> list[TraceRequest]:
    count = int((end - start) * rate)
    return [
        TraceRequest(arrival=start + i / rate, prompt_tokens=prompt, output_tokens=output, row=first_row + i)
        for i in range(count)
    ]


# -- the engine model -------------------------------------------------------------------


def test_one_request_alone_takes_exactly_one_prefill_step_then_one_step_per_token():
    engine = Engine(0, "spot", 0.0, SPEC)
    request = Request(0, 0.0, prompt=1000, output=11)
    engine.accept(request, 0.0)
    kv = 1000 + 11
    prefill_step = 0.05 + 0.001 * 1000 + 1e-6 * kv  # the whole prompt fits one chunk
    assert engine.next_event() == pytest.approx(prefill_step)
    first, finished = engine.progress(engine.next_event())
    assert first == [request] and finished == []
    assert request.first_token == pytest.approx(prefill_step)
    decode_step = 0.05 + 0.001 * 1 + 1e-6 * kv
    assert engine.next_event() == pytest.approx(prefill_step + 10 * decode_step)
    _, finished = engine.progress(engine.next_event())
    assert finished == [request] and engine.empty and engine.kv_used == 0


def test_kv_cache_admits_no_more_than_it_holds():
    engine = Engine(0, "spot", 0.0, SPEC)
    big = [Request(i, 0.0, prompt=4000, output=500) for i in range(3)]
    for request in big:
        engine.accept(request, 0.0)
    assert len(engine.prefill) == 2 and len(engine.waiting) == 1  # 2 x 4500 fit in 10 000, a third does not
    assert engine.queued_tokens() == pytest.approx(3 * 4500)


# -- interruptions: the gateway resumes, a bare vLLM loses ----------------------------------


class TwoSpotEngines:
    interval = None
    name = "two-spot"

    def __init__(self, uses_gateway: bool) -> None:
        self.uses_gateway = uses_gateway

    def initial(self) -> Target:
        return Target(desired=2, by_capacity={"on-demand": 0, "spot": 2})

    def control(self, view) -> Target:
        return self.initial()


@pytest.mark.parametrize(("gateway", "lost", "resumed"), [(True, None, 1), (False, "interrupted", 0)])
def test_a_long_answer_on_an_interrupted_engine(gateway, lost, resumed):
    profile = build_profile({"spot": {"interruptionsPerHour": 0, "noticeSeconds": 30}})
    trace = [TraceRequest(arrival=0.0, prompt_tokens=1000, output_tokens=1500, row=1)]  # ~100 s of decoding
    result = Simulation(
        profile, trace, TwoSpotEngines(gateway), seed=1, horizon=600, outages=[], notices=[(5.0, 0)]
    ).run()
    request = result.requests[0]
    assert request.first_token is not None and request.first_token < 5.0
    assert request.lost == lost
    assert result.resumed == resumed
    assert result.interruptions == 1
    if gateway:
        assert request.done is not None and request.resumes == 1


# -- the operator's policy in the simulated cluster -------------------------------------------


def test_spot_outage_falls_back_to_on_demand_and_returns_to_spot():
    profile = build_profile(
        {
            "spot": {"interruptionsPerHour": 0, "outages": [{"startHour": 0.5, "hours": 0.75}]},
            "deployment": {
                "scaling": {
                    "minReplicas": 1,
                    "maxReplicas": 8,
                    "onDemandBaseline": 1,
                    "targetQueuedTokensPerReplica": 2000,
                }
            },
        }
    )
    # Light load, then from 0.75 h (spot gone since 0.5 h) a load that needs several engines.
    trace = steady_trace(0.2, 0, 2700) + steady_trace(2.0, 2700, 5400, first_row=541)
    controller = SpotragController(
        name="spotrag", policy=profile.scaling_policy(), spot=profile.spot_settings(), interval=10
    )
    result = Simulation(profile, trace, controller, seed=1, horizon=7200, outages=[(1800.0, 4500.0)]).run()
    log = controller.log
    assert log.placements["SpotShort"] > 0 and log.placements["SpotRetry"] > 0 and log.give_ups > 0
    samples = result.samples
    minute = {round(t / 60): i for i, t in enumerate(samples["time"])}
    during, after = minute[70], minute[119]  # 1h10 (outage) and 1h59 (spot back, load gone)
    assert samples["ready_on_demand"][during] > 1 and samples["ready_spot"][during] == 0
    assert samples["ready_on_demand"][after] == 1
    assert all(r.lost is None for r in result.requests)


def test_same_seed_same_report_and_another_seed_another():
    profile = build_profile({"spot": {"outagesPerDay": 12}})
    trace = generate_trace("bursty", hours=1, seed=3)
    first = compare(profile, trace, seed=3, horizon=3600)
    again = compare(profile, generate_trace("bursty", hours=1, seed=3), seed=3, horizon=3600)
    assert first.summaries == again.summaries and first.meta == again.meta
    other = compare(profile, generate_trace("bursty", hours=1, seed=4), seed=4, horizon=3600)
    assert other.summaries != first.summaries
    assert [s.policy for s in first.summaries] == [
        "on-demand-peak",
        "kubeai-requests",
        "keda-waiting",
        "spotrag-no-spot",
        "spotrag",
    ]
    assert first.summaries[0].cost_vs_peak == 1.0


def test_minute_percentiles_count_lost_requests_as_misses():
    arrivals = np.array([1.0, 2.0, 3.0, 4.0, 70.0, 130.0])
    ttft = np.array([0.1, 0.2, 0.3, 5.0, np.inf, 0.4])
    assert minute_percentiles(arrivals, ttft, 240.0, 50).tolist()[:3] == [0.2, np.inf, 0.4]
    assert np.isnan(minute_percentiles(arrivals, ttft, 240.0, 50)[3])
    assert minute_percentiles(arrivals, ttft, 240.0, 95)[0] == 5.0


def test_sized_queued_tokens_grow_with_utilization():
    loads = [engine_load(SPEC, 1400, 180, u).queued_tokens for u in (0.3, 0.5, 0.7, 0.9)]
    assert loads == sorted(loads) and loads[0] > 0
    with pytest.raises(ValueError, match="utilization must be in"):
        engine_load(SPEC, 1400, 180, 1.0)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "t.jsonl",
            '{"arrival": 0, "prompt_tokens": 10, "output_tokens": 5}\n{"arrival": 1, "prompt_tokens": 10\n',
            "t.jsonl line 2: not valid JSON",
        ),
        (
            "t.jsonl",
            '{"arrival": -1, "prompt_tokens": 10, "output_tokens": 5}\n',
            "t.jsonl line 1: arrival must be a finite number of seconds >= 0, got -1",
        ),
        (
            "t.jsonl",
            '\n{"arrival": 0, "prompt_tokens": "abc", "output_tokens": 5}\n',
            "t.jsonl line 2: prompt_tokens must be a whole number >= 1, got 'abc'",
        ),
        ("t.jsonl", '{"arrival": 0, "prompt_tokens": 10}\n', "t.jsonl line 1: missing output_tokens"),
        ("t.jsonl", "[1, 2, 3]\n", "t.jsonl line 1: expected an object"),
        (
            "t.csv",
            "arrival,prompt_tokens,output_tokens\n0,10,5\n1.5,12,0\n",
            "t.csv line 3: output_tokens must be a whole number >= 1, got '0'",
        ),
        (
            "t.csv",
            "arrival,prompt\n0,10\n",
            "t.csv line 1: the header must name arrival, prompt_tokens, output_tokens; missing prompt_tokens, output_tokens",
        ),
        ("t.csv", "arrival,prompt_tokens,output_tokens\n", "the trace has no requests"),
        ("t.txt", "whatever", "a trace must be .jsonl or .csv"),
    ],
)
def test_bad_trace_rows_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TraceError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_trace(path)


def test_a_request_longer_than_the_context_is_named_by_row(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("arrival,prompt_tokens,output_tokens\n0,100,10\n3,8000,500\n")
    with pytest.raises(
        TraceError, match=r"row 3: prompt_tokens \+ output_tokens = 8500 exceeds the model's context \(8192 tokens"
    ):
        compare(build_profile(), load_trace(path), seed=1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pricing": {"spotPerGpuHour": -0.1}}, "pricing.spotPerGpuHour must not be negative"),
        ({"engine": {"prefillTokensPerSecond": 0}}, "engine.prefillTokensPerSecond must be positive"),
        ({"engine": {"decodeTokensPerSecond": 0}}, "engine.decodeTokensPerSecond must be positive"),
        ({"engine": {"kvCacheTokens": 100}}, "the KV cache holds 100 tokens, less than maxModelLen 8192"),
        ({"gpu": "L4", "model": "13b"}, "model 13b .* does not fit on one L4"),
        ({"gpu": "TPU"}, "unknown gpu 'TPU'"),
        ({"spot": {"interuptionsPerHour": 1}}, "unknown key\\(s\\) interuptionsPerHour"),
        ({"spot": {"noticeSeconds": 0}}, "spot.noticeSeconds must be positive"),
        ({"spot": {"outages": [{"startHour": 1}]}}, r"spot.outages\[0\] must be"),
        ({"slo": {"percentile": 101}}, "slo.percentile must be in"),
        ({"deployment": {"scaling": {"minReplicas": 5, "maxReplicas": 2}}}, "minReplicas 5 exceeds maxReplicas 2"),
        ({"baselines": {"kubeai": {"targetRequests": 0}}}, "baselines.kubeai.targetRequests must be a positive number"),
    ],
)
def test_impossible_profiles_are_refused_up_front(data, message):
    with pytest.raises(ProfileError, match=message):
        build_profile(data)


def test_profile_file_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ProfileError, match="a profile must be a mapping"):
        load_profile(path)
    with pytest.raises(ProfileError, match="no such profile file"):
        load_profile(tmp_path / "missing.yaml")


# -- the command line ---------------------------------------------------------------------------


def test_cli_runs_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["--generate", "diurnal", "--hours", "0.5", "--seed", "2", "--out", str(out), "--no-png"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["policy"] for p in report["policies"]] == [
        "on-demand-peak",
        "kubeai-requests",
        "keda-waiting",
        "spotrag-no-spot",
        "spotrag",
    ]
    assert report["meta"]["seed"] == 2 and report["meta"]["requests"] == len(
        (out / "trace.jsonl").read_text().splitlines()
    )
    assert "| spotrag |" in capsys.readouterr().out
    # The generated trace replays to the same report.
    assert cli(["--trace", str(out / "trace.jsonl"), "--seed", "2", "--out", str(tmp_path / "replay"), "--no-png"]) == 0
    replay = json.loads((tmp_path / "replay" / "report.json").read_text())
    assert [p["requests"] for p in replay["policies"]] == [p["requests"] for p in report["policies"]]


def test_cli_draws_the_timeline(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert cli(["--hours", "0.25", "--policies", "on-demand-peak,spotrag", "--out", str(out)]) == 0
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace", "missing.jsonl"], "missing.jsonl: no such trace file"),
        (["--hours", "0.1", "--policies", "spotrag,magic"], "unknown policy magic"),
        (["--hours", "-1"], "--hours must be positive"),
        (["--hours", "0.1", "--utilization", "1.5"], "--utilization must be between 0 and 1"),
    ],
)
def test_cli_bad_input_exits_2_with_the_reason(tmp_path, capsys, argv, message):
    assert cli(argv + ["--out", str(tmp_path / "out"), "--no-png"]) == 2
    assert message in capsys.readouterr().err


# -- issue 12: sizing to the SLO, the truth of the comparison ---------------------------------


@pytest.mark.parametrize(
    ("kind", "prompt", "output"),
    [
        ("conversation", (1020, 2731), (129, 424)),  # p50 / p90 of the trace the issue measured
        ("code", (1469, 5186), (13, 55)),
    ],
)
def test_generated_shapes_follow_the_measured_percentiles(kind, prompt, output):
    from spotrag_simulator.trace import generate_trace

    trace = generate_trace(kind, hours=6, seed=2, peak_rps=2.0, start_hour=12)
    prompts = np.array([r.prompt_tokens for r in trace])
    outputs = np.array([r.output_tokens for r in trace])
    for values, (p50, p90) in ((prompts, prompt), (outputs, output)):
        assert abs(np.percentile(values, 50) / p50 - 1) < 0.08
        assert abs(np.percentile(values, 90) / p90 - 1) < 0.12


def test_a_generated_day_is_quiet_at_night_and_busy_in_the_afternoon():
    from spotrag_simulator.trace import generate_trace

    trace = generate_trace("conversation", hours=24, seed=1, peak_rps=1.0)
    per_hour = np.bincount([int(r.arrival // 3600) for r in trace], minlength=24)
    assert per_hour[4] * 3 < per_hour[16]


def test_on_demand_for_peak_is_the_smallest_fleet_that_meets_the_slo():
    from spotrag_simulator.run import _fleet_meets_slo, peak_fleet

    profile = build_profile()
    trace = steady_trace(3.0, 0, 1800)
    engines, minutes, meets = peak_fleet(profile, trace, 1800.0, seed=1)
    assert meets and len(minutes) >= 1
    assert all(_fleet_meets_slo(profile, trace, m, engines, 1) for m in minutes)
    assert not all(_fleet_meets_slo(profile, trace, m, engines - 1, 1) for m in minutes)


def test_an_slo_no_fleet_meets_is_said_and_the_search_stops():
    from spotrag_simulator.run import peak_fleet

    profile = build_profile({"slo": {"ttftSeconds": 0.05}})  # below one prefill of a 1,400-token prompt on an L4
    engines, _, meets = peak_fleet(profile, steady_trace(1.0, 0, 900), 900.0, seed=1)
    assert not meets and engines >= 1


@pytest.mark.parametrize(
    ("met", "warm"),
    [
        ([True] * 8, 0),
        ([False, False] + [True] * 6, 2),
        ([True, False] * 5, 10),
        ([False, True, True, True, True, True], 1),
    ],
)
def test_warm_up_lasts_until_five_minutes_in_a_row_meet_the_slo(met, warm):
    from spotrag_simulator.report import warmup_minutes

    assert warmup_minutes(np.array(met)) == warm


@pytest.mark.parametrize(
    ("desired", "enabled", "by_capacity"),
    [
        (5, True, None),  # the node pool picks: spot when there is any
        (5, False, {"on-demand": 5, "spot": 0}),
        (0, False, {"on-demand": 0, "spot": 0}),
    ],
)
def test_a_baselines_node_pool_is_on_demand_only_with_spot_off(desired, enabled, by_capacity):
    from spotrag_operator.placement import SpotSettings

    target = node_pool(desired, SpotSettings(enabled=enabled))
    assert target.desired == desired and target.by_capacity == by_capacity


@pytest.mark.parametrize("name", [n for n in KNOWN if n != PEAK])
def test_each_no_spot_variant_is_its_policy_with_spot_off(name):
    profile = build_profile({})
    controller = controller_for(name, profile, peak=4)
    twin = controller_for(NO_SPOT.get(name, name), profile, peak=4)
    assert controller.name == name and type(controller) is type(twin)
    assert controller.spot.enabled is (name not in NO_SPOT)


def test_baselines_with_spot_off_bill_no_spot_and_scale_alike():
    profile = build_profile({"spot": {"interruptionsPerHour": 0}})
    trace = steady_trace(0.2, 0, 600) + steady_trace(3.0, 600, 1800, first_row=121)
    names = ("kubeai-requests", "kubeai-requests-no-spot", "keda-waiting", "keda-waiting-no-spot")
    comparison = compare(profile, trace, seed=1, horizon=1800, policies=names)
    runs = {s.policy: s for s in comparison.summaries}
    for name in ("kubeai-requests", "keda-waiting"):
        on, off = runs[name], runs[f"{name}-no-spot"]
        assert on.gpu_hours_spot > 0 and off.gpu_hours_spot == 0
        # No interruptions: the same decisions, on dearer capacity.
        assert comparison.results[name].log.timeline == comparison.results[f"{name}-no-spot"].log.timeline
        assert off.cost > on.cost


def test_every_autoscaler_starts_from_the_same_stated_fleet():
    profile = build_profile({"spot": {"interruptionsPerHour": 0}})
    trace = steady_trace(1.0, 0, 600)
    comparison = compare(profile, trace, seed=1, horizon=600, start_engines=3)
    assert "every autoscaler starts with 3 engine(s) ready" in comparison.meta["start"]
    for name in ("kubeai-requests", "keda-waiting", "spotrag-no-spot", "spotrag"):
        assert comparison.results[name].samples["ready"][0] >= 1
        assert comparison.results[name].log.timeline[0] == (0.0, 3)


def test_drop_oversized_counts_what_it_dropped(tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"arrival": 0, "prompt_tokens": 100, "output_tokens": 10}\n'
        '{"arrival": 1, "prompt_tokens": 9000, "output_tokens": 10}\n'
        '{"arrival": 2, "prompt_tokens": 200, "output_tokens": 10}\n'
    )
    out = tmp_path / "out"
    argv = ["--trace", str(trace), "--out", str(out), "--no-png", "--policies", "on-demand-peak,spotrag"]
    assert cli(argv) == 2
    assert "row 2" in capsys.readouterr().err
    assert cli([*argv, "--drop-oversized"]) == 0
    assert json.loads((out / "report.json").read_text())["meta"]["dropped_oversized"] == 1


def test_the_operators_presets_are_the_simulated_engines():
    from spotrag_operator.calibration import PRESETS, EngineRates
    from spotrag_simulator.presets import GPUS, MODELS, OPERATOR_PRESETS, engine_spec_for, operator_rates

    for (gpu, model), name in OPERATOR_PRESETS.items():
        # H200: the preset is the measurement (128-token prompts, 256 out: ~256 tokens of context on
        # average), the simulated engine a fit to it; the others are the roofline at 1,500 tokens.
        numbers = operator_rates(
            engine_spec_for(GPUS[gpu], MODELS[model]), **({"context": 256} if gpu == "H200" else {})
        )
        simulated = EngineRates.from_measurements(
            prefill_tokens_per_second=numbers["prefillTokensPerSecond"],
            decode_tokens_per_second=numbers["decodeTokensPerSecond"],
            batch_decode_tokens_per_second=numbers["batchDecodeTokensPerSecond"],
        )
        preset = PRESETS[name]
        assert abs(preset.prefill_tokens_per_second / simulated.prefill_tokens_per_second - 1) < 0.01, name
        for batch in (1, 64):
            assert abs(preset.step_seconds(batch) / simulated.step_seconds(batch) - 1) < 0.01, (name, batch)


def test_sized_to_the_slo_a_steady_load_settles_without_flapping():
    profile = build_profile({"spot": {"interruptionsPerHour": 0}})
    trace = steady_trace(2.0, 0, 3600)
    comparison = compare(profile, trace, seed=1, horizon=3600, policies=("on-demand-peak", "spotrag"))
    spotrag = next(s for s in comparison.summaries if s.policy == "spotrag")
    timeline = comparison.results["spotrag"].log.timeline
    assert spotrag.steady_slo_minutes > 0.95 and spotrag.steady_lost == 0
    assert len([t for t, _ in timeline if t > spotrag.warmup_seconds + 600]) <= 2  # settled: at most a step or two
