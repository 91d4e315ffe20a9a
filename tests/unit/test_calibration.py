"""Sizing to the SLO and calibrating engine rates: tables over the pure functions."""

from __future__ import annotations

import json

import pytest

from spotrag_operator import autoscale, calibration
from spotrag_operator.autoscale import (
    AutoscalerState,
    Observation,
    ScalingPolicy,
    Slo,
    decide,
    engines_needed,
    scale_up_step,
    slo_reach,
)
from spotrag_operator.calibration import (
    PRESETS,
    CalibrationState,
    EngineRates,
    EngineSample,
    calibrate,
    feedback,
    histogram_quantile,
    interval_row,
    parse_engine_metrics,
    rates_from_spec,
)

H200 = PRESETS["H200/Llama-3.1-8B"]
L4 = PRESETS["L4/Mistral-7B"]
SLO = Slo(ttft_seconds=2.0, percentile=95.0)


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


# -- engine rates ---------------------------------------------------------------------


def test_the_h200_preset_reproduces_the_measurements_it_comes_from():
    assert close(H200.decode_tokens_per_second(1), 206, 1e-3)
    assert close(H200.decode_tokens_per_second(64), 9545, 1e-3)
    assert H200.prefill_tokens_per_second == 40_000 and H200.kv_cache_tokens == 896_912
    assert "vLLM 0.26.0 on H200, 3 repeats, bench/vllm/capacity.json" in H200.source


@pytest.mark.parametrize(
    ("itl", "tokens_per_request", "expected"),
    [
        (None, None, 256),  # vLLM's max_num_seqs
        (None, 1500, 256),  # the KV cache (896,912 tokens) holds 597 such requests: max_num_seqs binds
        (None, 8000, 896_912 / 8000),  # long requests: the KV cache binds
        (0.010, None, (0.010 - H200.decode_step_seconds) / H200.seconds_per_sequence),  # the ITL binds
        (0.004, None, 1),  # an ITL below a lone step: one stream, never less
    ],
)
def test_batch_one_engine_runs(itl, tokens_per_request, expected):
    assert close(H200.batch_for(inter_token_latency=itl, tokens_per_request=tokens_per_request), expected, 1e-9)


@pytest.mark.parametrize(
    ("spec", "prefill", "single", "kv"),
    [
        (None, L4.prefill_tokens_per_second, L4.decode_tokens_per_second(1), L4.kv_cache_tokens),
        ({"preset": "H200/Llama-3.1-8B"}, 40_000, 206, 896_912),
        ({"preset": "H200/Llama-3.1-8B", "prefillTokensPerSecond": 20_000}, 20_000, 206, 896_912),
        ({"preset": "H200/Llama-3.1-8B", "decodeTokensPerSecond": 150, "kvCacheTokens": 5000}, 40_000, 150, 5000),
    ],
)
def test_rates_from_the_spec(spec, prefill, single, kv):
    rates = rates_from_spec(spec)
    assert close(rates.prefill_tokens_per_second, prefill, 1e-6)
    assert close(rates.decode_tokens_per_second(1), single, 1e-3)
    assert rates.kv_cache_tokens == kv


def test_rates_with_the_specs_decode_numbers_still_name_the_preset_they_start_from():
    rates = rates_from_spec({"decodeTokensPerSecond": 125})
    assert rates.source.startswith("L4/Mistral-7B (datasheet roofline") and rates.source.endswith(
        "with the spec's numbers"
    )


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown engine preset 'TPU'"):
        rates_from_spec({"preset": "TPU"})


# -- weighing the work ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "work", "expected"),
    [
        ("nothing", {"prompt_tokens": 0, "output_tokens": 0, "requests": 0}, (0.0, 0.0, 0.0)),
        # 80,000 prompt tokens = 2 s of one engine; to drain within half the 2 s SLO: 2 engines.
        ("prompt backlog", {"prompt_tokens": 80_000, "output_tokens": 0, "requests": 0}, (0.0, 2.0, 0.0)),
        # 20,000 prompt tok/s arriving = half an engine, sized for engines half busy: 1 engine.
        (
            "prompt flow",
            {"prompt_tokens": 0, "output_tokens": 0, "requests": 0, "prompt_tokens_per_second": 20_000},
            (1.0, 0.0, 0.0),
        ),
        # 256 short requests decoding: one engine's full batch, sized for engines half busy: 2 engines.
        ("decode", {"prompt_tokens": 0, "output_tokens": 25_600, "requests": 256}, (0.0, 0.0, 2.0)),
        # Output tokens with no request count: guessed at 256 allowed per request.
        ("decode, requests unknown", {"prompt_tokens": 0, "output_tokens": 65_536, "requests": None}, (0.0, 0.0, 2.0)),
    ],
)
def test_engines_needed_weighs_prompt_and_output_apart(case, work, expected):
    need = engines_needed(rates=H200, slo=SLO, **work)
    flow, backlog, decode = expected
    assert (close(need.prefill_flow, flow), close(need.prefill_backlog, backlog), close(need.decode, decode)) == (
        True,
        True,
        True,
    ), need
    assert close(need.engines, flow + backlog + decode)


def test_the_same_tokens_weigh_differently_as_prompt_or_as_output():
    prompt_heavy = engines_needed(prompt_tokens=200_000, output_tokens=10_000, requests=100, rates=H200, slo=SLO)
    output_heavy = engines_needed(prompt_tokens=10_000, output_tokens=200_000, requests=800, rates=H200, slo=SLO)
    assert round(prompt_heavy.engines, 2) == 5.78  # 5 for the prompt backlog, 100/(256 × 0.5) for decode
    assert round(output_heavy.engines, 2) == 6.5  # 0.25 for the prompt backlog, 800/(256 × 0.5) for decode


def test_a_slower_engine_needs_more_of_itself_for_the_same_work():
    work = {"prompt_tokens": 40_000, "output_tokens": 20_000, "requests": 100, "prompt_tokens_per_second": 20_000}
    fast, slow = engines_needed(rates=H200, slo=SLO, **work), engines_needed(rates=L4, slo=SLO, **work)
    assert fast.engines < 3 and slow.engines > 15  # 2.0 vs 17.0


def test_the_kv_cache_holds_whole_prompts_not_the_queued_part():
    # 30 requests, all prefilled (no prompt queued), 100 output tokens left each, prompts of 7,000 on average:
    # an L4's 42,724 KV tokens hold 5.99 of them, not 427.
    need = engines_needed(
        prompt_tokens=0, output_tokens=3_000, requests=30, rates=L4, slo=SLO, mean_prompt_tokens=7_000
    )
    assert close(need.batch, L4.kv_cache_tokens / 7_100, 1e-9)


@pytest.mark.parametrize(("utilization", "engines"), [(0.25, 4.0), (0.5, 2.0), (1.0, 1.0)])
def test_target_utilization_scales_the_steady_work(utilization, engines):
    need = engines_needed(
        prompt_tokens=0,
        output_tokens=0,
        requests=0,
        prompt_tokens_per_second=40_000,
        rates=H200,
        slo=Slo(target_utilization=utilization),
    )
    assert close(need.engines, engines)


@pytest.mark.parametrize(
    ("itl", "gateway_cap", "batch"),
    [
        (None, None, 256),
        (0.010, None, (0.010 - H200.decode_step_seconds) / H200.seconds_per_sequence),
        (None, 65_536, 65_536 / 1_000),  # 100 requests of 1,000 tokens: the gateway lets 65 onto one engine
    ],
)
def test_the_decode_batch_follows_the_itl_slo_and_the_gateway_cap(itl, gateway_cap, batch):
    need = engines_needed(
        prompt_tokens=50_000,
        output_tokens=50_000,
        requests=100,
        rates=H200,
        slo=Slo(inter_token_latency_seconds=itl),
        max_inflight_tokens_per_engine=gateway_cap,
    )
    assert close(need.batch, batch, 1e-9)
    assert close(need.decode, 100 / (batch * 0.5), 1e-9)  # engines half busy (slo.targetUtilization)


@pytest.mark.parametrize(("factor", "engines"), [(0.5, 8.0), (1.0, 4.0), (1.5, 4.0 / 1.5)])
def test_feedback_divides_the_need(factor, engines):
    need = engines_needed(
        prompt_tokens=160_000, output_tokens=0, requests=0, rates=H200, slo=SLO, feedback=factor
    )  # 4 engines by the model
    assert close(need.engines, engines)


@pytest.mark.parametrize(
    ("ttft", "mean_prompt", "unmeetable"),
    [(2.0, 1_000, False), (0.02, 1_000, True), (0.02, None, False), (0.1, 4_000, True)],
)
def test_an_slo_below_one_prefill_is_reported_with_the_numbers(ttft, mean_prompt, unmeetable):
    message = slo_reach(
        Slo(ttft_seconds=ttft), H200, percentile_prompt_tokens=None, mean_prompt_tokens=mean_prompt
    ).message
    assert (message is not None) == unmeetable
    if unmeetable:
        assert f"{mean_prompt} tokens at 40000 tok/s" in message


# -- scale-up steps ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "percent", "size", "allowed"),
    [(4, 100, 1, 4), (4, 100, 5, 5), (4, 100, 10, 10), (4, 0, 10, 4), (2, 50, 9, 5), (4, 100, 0, 4)],
)
def test_scale_up_step_is_n_or_a_percentage_whichever_is_more(step, percent, size, allowed):
    policy = ScalingPolicy(
        min_replicas=1, max_replicas=100, on_demand_baseline=1, max_scale_up_step=step, max_scale_up_percent=percent
    )
    assert scale_up_step(policy, size) == allowed


def test_a_burst_at_the_floor_gets_its_engines_in_three_periods_not_four_per_period():
    policy = ScalingPolicy(
        min_replicas=1,
        max_replicas=40,
        on_demand_baseline=1,
        max_scale_up_step=4,
        max_scale_up_percent=100,
        engine_rates=H200,
    )
    # 560,000 prompt tokens queued = 14 s of one engine, to drain in 1 s: 14 engines.
    burst = {"queued_tokens": 600_000, "prompt_tokens": 560_000, "output_tokens": 40_000, "requests": 0}
    state, sizes = AutoscalerState(desired=1), []
    for now, ready, starting in [(0, 1, 0), (10, 1, 4), (16, 1, 4), (31, 1, 9), (46, 1, 13)]:
        decision, state = decide(policy, Observation(now=now, ready=ready, starting=starting, **burst), state)
        sizes.append((decision.desired, decision.reason))
    assert sizes == [
        (5, autoscale.SCALE_UP_LIMITED),
        (5, autoscale.SCALE_UP_LIMITED),
        (10, autoscale.SCALE_UP_LIMITED),
        (14, autoscale.SCALE_UP),
        (14, autoscale.STEADY),
    ]
    assert "prefill 14.00" in decision.message and decision.need.to_dict()["basis"] == "slo"


def test_without_the_split_and_without_a_target_it_falls_back_and_says_so():
    policy = ScalingPolicy(min_replicas=1, max_replicas=10, on_demand_baseline=1)
    decision, _ = decide(policy, Observation(now=0, queued_tokens=4096, ready=1, starting=0), AutoscalerState())
    assert decision.desired == 2
    assert "at 2048 per engine (the gateways export no prompt/output split)" in decision.message


# -- what engines report --------------------------------------------------------------------

METRICS = """# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 1000.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 500.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 300.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:request_prompt_tokens histogram
vllm:request_prompt_tokens_sum{engine="0",model_name="m"} 1200.0
vllm:request_prompt_tokens_count{engine="0",model_name="m"} 4.0
"""


def test_vllm_metrics_are_parsed_and_summed_over_ranks():
    sample = parse_engine_metrics(METRICS, name="e", time=5.0)
    assert (sample.prompt_tokens, sample.generation_tokens, sample.running, sample.waiting) == (1500, 300, 3, 1)
    assert (sample.finished_prompt_tokens, sample.finished_requests) == (1200, 4)


def test_an_engine_without_token_counters_is_refused_by_name():
    with pytest.raises(ValueError, match="engine e exports no vllm:generation_tokens_total"):
        parse_engine_metrics("vllm:prompt_tokens_total 1\n", name="e", time=0)


def sample(name, time, prompt, generated, running=8, waiting=0, state=calibration.SERVING, done=(0.0, 0.0)):
    return EngineSample(
        name=name,
        time=time,
        prompt_tokens=prompt,
        generation_tokens=generated,
        running=running,
        waiting=waiting,
        state=state,
        finished_prompt_tokens=done[0],
        finished_requests=done[1],
    )


@pytest.mark.parametrize(
    ("previous", "now", "fitted", "tokens"),
    [
        ([0, 100, 100, 4, 0, 0], sample("e", 10, 2100, 500, running=4), True, (2000, 400)),
        ([0, 100, 100, 4, 0, 0], sample("e", 10, 50, 500, running=4), False, (0, 0)),  # restart: not negative
        ([0, 100, 100, 0, 0, 0], sample("e", 10, 2100, 500, running=4), False, (2000, 400)),  # idle at the start
        ([0, 100, 100, 4, 0, 0], sample("e", 10, 2100, 500, running=0), False, (2000, 400)),  # idle at the end
        ([0, 100, 100, 4, 0, 0], sample("e", 500, 2100, 500, running=4), False, (2000, 400)),  # a scrape missed
        ([0, 100, 100, 4, 0, 0], sample("e", 0.5, 2100, 500, running=4), False, (2000, 400)),  # too short
    ],
)
def test_which_intervals_are_fitted(previous, now, fitted, tokens):
    row, d_prompt, d_generated = interval_row(previous, now)
    assert (row is not None, (d_prompt, d_generated)) == (fitted, tokens)


def synthetic_engine(rates: EngineRates, name: str = "e", *, seconds: float = 10.0, intervals: int = 60):
    """An engine that truly runs at `rates`, scraped every `seconds` with varied work."""
    prompt = generated = 0.0
    out = [sample(name, 0.0, 0, 0)]
    for i in range(1, intervals + 1):
        batch = 4 + (i // 5 * 7) % 60  # batches from 4 to 63, each held for 5 scrapes (as a gauge sees it)
        prefill_share = 0.1 + 0.05 * (i % 9)  # time spent prefilling, 10% .. 50%
        prompt += seconds * prefill_share * rates.prefill_tokens_per_second
        generated += seconds * (1 - prefill_share) / rates.step_seconds(batch) * batch
        out.append(sample(name, i * seconds, prompt, generated, running=batch))
    return out


def run(samples_by_time, preset, state=None):
    result = None
    for now, samples in samples_by_time:
        result, state = calibrate(state, preset, samples, now=now)
    return result, state


def test_the_fit_starts_at_the_preset_and_moves_to_what_the_engine_does():
    truth = EngineRates(
        prefill_tokens_per_second=20_000, decode_step_seconds=0.008, seconds_per_sequence=0.00005, source="truth"
    )
    series = [(s.time, [s]) for s in synthetic_engine(truth, intervals=200)]
    first, _ = run(series[:1], H200)
    assert first.rates.prefill_tokens_per_second == H200.prefill_tokens_per_second and first.intervals == 0
    early, _ = run(series[:61], H200)  # ten minutes of scrapes: most of the way from 40,000 to 20,000
    assert 20_000 < early.rates.prefill_tokens_per_second < 27_000
    result, _ = run(series, H200)
    assert close(result.rates.prefill_tokens_per_second, 20_000, 0.1)
    for batch in (8, 64):
        assert close(result.rates.step_seconds(batch), truth.step_seconds(batch), 0.1)
    assert "calibrated online" in result.rates.source
    assert close(result.prompt_tokens_per_second, series[-1][1][0].prompt_tokens / series[-1][0], 0.5)


def test_starting_draining_and_erroring_engines_do_not_calibrate():
    truth = EngineRates(prefill_tokens_per_second=10_000, decode_step_seconds=0.02, seconds_per_sequence=0.001)
    for state_name in (calibration.STARTING, calibration.DRAINING, calibration.ERRORING):
        series = [(s.time, [EngineSample(**{**s.__dict__, "state": state_name})]) for s in synthetic_engine(truth)]
        result, state = run(series, H200)
        assert (result.intervals, result.rates.prefill_tokens_per_second, state.last) == (0, 40_000, {})


def test_a_restart_is_not_a_negative_rate_and_the_fit_continues_after_it():
    truth = EngineRates(prefill_tokens_per_second=20_000, decode_step_seconds=0.008, seconds_per_sequence=0.00005)
    before = synthetic_engine(truth, intervals=20)
    after = synthetic_engine(truth, intervals=20)  # counters from zero again
    series = [(s.time, [s]) for s in before] + [
        (200 + s.time, [sample("e", 200 + s.time, s.prompt_tokens, s.generation_tokens, s.running)]) for s in after
    ]
    state, rates = None, []
    for now, samples in series:
        result, state = calibrate(state, H200, samples, now=now)
        rates.append(result.prompt_tokens_per_second)
    assert min(r for r in rates if r is not None) >= 0
    assert result.intervals > 25  # 39 of the 40 intervals (not the one across the restart), the old ones discounted


def test_engines_that_left_are_forgotten():
    _, state = calibrate(None, H200, [sample("a", 0, 0, 0), sample("b", 0, 0, 0)], now=0)
    _, state = calibrate(state, H200, [sample("a", 10, 100, 100)], now=10)
    assert sorted(state.last) == ["a"]


def test_the_state_survives_json_and_the_fit_continues_identically():
    truth = EngineRates(prefill_tokens_per_second=20_000, decode_step_seconds=0.008, seconds_per_sequence=0.00005)
    series = [(s.time, [s]) for s in synthetic_engine(truth, intervals=30)]
    straight, _ = run(series, H200)
    _, half = run(series[:15], H200)
    stored = CalibrationState.from_dict(json.loads(json.dumps(half.to_dict())))
    resumed, _ = run(series[15:], H200, stored)
    assert resumed == straight


@pytest.mark.parametrize(
    ("stored", "problem"),
    [
        ({"xx": [[1, 2]], "xy": [0, 0, 0]}, "xx must be 3×3"),
        ({"last": {"e": [1, 2]}}, "6 numbers"),
        ({"feedback": 9}, "outside its bounds"),
        ({"xy": "nope"}, "malformed"),
    ],
)
def test_a_malformed_state_is_refused(stored, problem):
    with pytest.raises(ValueError, match=problem):
        CalibrationState.from_dict(stored)


def test_mean_prompt_comes_from_finished_requests():
    _, state = calibrate(None, H200, [sample("e", 0, 0, 0, done=(0, 0))], now=0)
    result, _ = calibrate(state, H200, [sample("e", 10, 5000, 100, done=(4000, 4))], now=10)
    assert result.mean_prompt_tokens == 1000


# -- the TTFT feedback ------------------------------------------------------------------------


def buckets(counts):
    return dict(zip(("0.5", "1.0", "2.0", "4.0", "+Inf"), counts, strict=True))


@pytest.mark.parametrize(
    ("previous", "current", "q", "expected"),
    [
        (buckets([0] * 5), buckets([50, 90, 100, 100, 100]), 0.5, (0.5, 100)),
        (buckets([0] * 5), buckets([50, 90, 100, 100, 100]), 0.95, (1.5, 100)),
        (buckets([50, 90, 100, 100, 100]), buckets([50, 90, 100, 200, 200]), 0.95, (3.9, 100)),
        (buckets([0] * 5), buckets([0, 0, 0, 0, 10]), 0.95, (4.0, 10)),  # beyond the last bound: that bound
        (buckets([5] * 5), buckets([1] * 5), 0.95, (None, 0)),  # a reset
        (buckets([0] * 5), buckets([0] * 5), 0.95, (None, 0)),  # nothing new
    ],
)
def test_histogram_quantile(previous, current, q, expected):
    value, count = histogram_quantile(previous, current, q)
    assert count == expected[1]
    assert (value is None) if expected[0] is None else close(value, expected[0], 1e-9)


CALM = calibration.CALM_PERIODS


@pytest.mark.parametrize(
    ("ttft_p95_bucket", "start", "calm_before", "factor", "calm_after"),
    [
        ("4.0", 1.0, 0, calibration.FEEDBACK_DOWN, 0),  # over the SLO: more engines
        ("4.0", 1.0, CALM + 5, calibration.FEEDBACK_DOWN, 0),  # a miss ends the calm
        ("2.0", 1.0, 3, 1.0, 0),  # between half the SLO and the SLO: leave it, and the calm ends
        ("0.5", 1.0, 0, 1.0, 1),  # one calm minute: no fewer engines than the model asks
        ("0.5", 1.0, CALM - 2, 1.0, CALM - 1),
        ("0.5", 1.0, CALM - 1, calibration.FEEDBACK_UP, CALM),  # half an hour of calm: fewer
        ("0.5", 0.85, 0, 0.85 * calibration.FEEDBACK_UP, 1),  # under 1: back towards the model at once
        ("0.5", 0.99, 0, 1.0, 1),  # ... but not past it
        ("0.5", 1.45, CALM, calibration.FEEDBACK_MAX, CALM + 1),  # bounded
    ],
)
def test_feedback_moves_only_outside_its_dead_band(ttft_p95_bucket, start, calm_before, factor, calm_after):
    counts = {"0.5": 0, "1.0": 0, "2.0": 0, "4.0": 0, "+Inf": 100}
    for le in ("0.5", "1.0", "2.0", "4.0"):
        if float(le) >= float(ttft_p95_bucket):
            counts[le] = 100
    before = CalibrationState(feedback=start, calm_periods=calm_before)
    value, _, state = feedback(before, counts, slo_seconds=2.0, percentile=95, now=0)
    assert close(value, factor)
    assert state.calm_periods == calm_after


@pytest.mark.parametrize(
    ("previous", "at", "requests", "now", "expected"),
    [
        (None, None, 40, 0.0, 40.0),  # first reading: taken as it is
        (40.0, 0.0, 40, 10.0, 40.0),  # steady
        (40.0, 0.0, 100, 180.0, 40.0 + 60.0 * (1 - 0.36787944)),  # one time constant: 63% of the step
        (40.0, 0.0, 100, 0.0, 40.0),  # no time passed: no weight
        (40.0, 50.0, 100, 10.0, 100.0),  # the clock went back: start afresh
        (40.0, 0.0, None, 10.0, None),  # not observed: nothing to average
    ],
)
def test_requests_in_flight_are_averaged_over_minutes(previous, at, requests, now, expected):
    state = CalibrationState(requests=previous, requests_at=at)
    value, after = calibration.smooth_requests(state, requests, now=now)
    assert (value is None) if expected is None else close(value, expected, 1e-6)
    if requests is None:
        assert after == state
    else:
        assert after.requests == value and after.requests_at == now


@pytest.mark.parametrize(
    ("scale_down_window", "time_constant"),
    [
        (300.0, 180.0),  # the default window: averaged over three minutes
        (180.0, 180.0),
        (10.0, 10.0),  # a window asked short: the average no longer than it
        (0.0, 0.0),  # no window: the count as it is
    ],
)
def test_the_requests_average_is_never_longer_than_the_scale_down_window(scale_down_window, time_constant):
    assert calibration.requests_time_constant(scale_down_window) == time_constant


def test_a_zero_time_constant_takes_the_count_as_it_is():
    state = CalibrationState(requests=40.0, requests_at=0.0)
    value, _ = calibration.smooth_requests(state, 3, now=1.0, time_constant=0.0)
    assert value == 3.0


def test_feedback_waits_a_period_needs_enough_requests_and_stays_bounded():
    over = {"0.5": 0, "1.0": 0, "2.0": 0, "4.0": 0, "+Inf": 0}
    state, values = CalibrationState(), []
    for minute in range(30):
        over = {le: count + 100 if le in ("4.0", "+Inf") else count for le, count in over.items()}
        value, _, state = feedback(state, over, slo_seconds=2.0, percentile=95, now=minute * 60.0)
        _, _, state = feedback(state, over, slo_seconds=2.0, percentile=95, now=minute * 60.0 + 10)  # same period
        values.append(value)
    assert values[0] == calibration.FEEDBACK_DOWN and values[-1] == calibration.FEEDBACK_MIN
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))  # moved once per period, one way
    few = {le: 5 for le in over}
    value, _, _ = feedback(CalibrationState(), few, slo_seconds=2.0, percentile=95, now=0)
    assert value == 1.0  # 5 requests say nothing about a p95


# -- what gateways report -------------------------------------------------------------------

GATEWAY = """# TYPE spotrag_queued_tokens gauge
spotrag_queued_tokens 150.0
# TYPE spotrag_queued_prompt_tokens gauge
spotrag_queued_prompt_tokens 100.0
# TYPE spotrag_queued_output_tokens gauge
spotrag_queued_output_tokens 50.0
# TYPE spotrag_waiting_requests gauge
spotrag_waiting_requests 2.0
# TYPE spotrag_time_to_first_token_seconds histogram
spotrag_time_to_first_token_seconds_bucket{le="1.0"} 3.0
spotrag_time_to_first_token_seconds_bucket{le="+Inf"} 4.0
spotrag_time_to_first_token_seconds_count 4.0
spotrag_time_to_first_token_seconds_sum 5.0
"""


def test_gateway_readings_are_parsed_and_summed_and_an_old_gateway_drops_the_parts():
    from spotrag_operator.queued_tokens import QueuedWork, parse_gateway, sum_work

    new = parse_gateway(GATEWAY)
    assert new == QueuedWork(150, 100, 50, 2, {"1.0": 3, "+Inf": 4})
    assert sum_work([new, new]) == QueuedWork(300, 200, 100, 4, {"1.0": 6, "+Inf": 8})
    old = parse_gateway("spotrag_queued_tokens 10\n")
    assert sum_work([new, old]) == QueuedWork(160, None, None, None, None)
    assert parse_gateway("something_else 1\n") is None


# -- one reconcile: calibrate → feedback → decide ----------------------------------------------


def test_scale_runs_calibration_feedback_and_decide_and_reports_them():
    from spotrag_operator.autoscale import scale

    policy = ScalingPolicy(min_replicas=1, max_replicas=20, on_demand_baseline=1, engine_rates=H200)
    observed = Observation(
        now=10, queued_tokens=90_000, prompt_tokens=80_000, output_tokens=10_000, requests=40, ready=1, starting=0
    )
    samples = [sample("e", 0, 0, 0), sample("e", 10, 400_000, 20_000, running=40)]
    state = None
    _, autoscaler, state = scale(
        policy,
        Observation(now=0, queued_tokens=0, prompt_tokens=0, output_tokens=0, requests=0, ready=1, starting=0),
        samples=samples[:1],
        ttft_buckets=None,
        autoscaler=None,
        calibration_state=state,
    )
    step, autoscaler, state = scale(
        policy, observed, samples=samples[1:], ttft_buckets=None, autoscaler=autoscaler, calibration_state=state
    )
    status = step.sizing_status()
    assert status["basis"] == "slo" and status["promptTokensPerSecond"] == 40_000.0
    assert step.decision.desired > 1 and step.slo_problem is None
    assert json.loads(json.dumps(status)) == status and json.loads(json.dumps(state.to_dict())) == state.to_dict()


def test_scale_reports_an_slo_no_engine_meets_and_still_scales():
    from spotrag_operator.autoscale import scale

    policy = ScalingPolicy(
        min_replicas=1, max_replicas=20, on_demand_baseline=1, engine_rates=H200, slo=Slo(ttft_seconds=0.01)
    )
    _, autoscaler, state = scale(
        policy,
        Observation(now=0, queued_tokens=0, prompt_tokens=0, output_tokens=0, requests=0, ready=1, starting=0),
        samples=[sample("e", 0, 0, 0, done=(0, 0))],
        ttft_buckets=None,
        autoscaler=None,
        calibration_state=None,
    )
    step, _, _ = scale(
        policy,
        Observation(
            now=10, queued_tokens=9000, prompt_tokens=8000, output_tokens=1000, requests=8, ready=1, starting=0
        ),
        samples=[sample("e", 10, 8000, 1000, done=(8000, 8))],
        ttft_buckets=None,
        autoscaler=autoscaler,
        calibration_state=state,
    )
    assert step.slo_problem.startswith("the TTFT SLO of 0.01s is below one prefill of the mean prompt: 1000 tokens")
    assert step.decision.desired > 1 and step.sizing_status()["sloProblem"] == step.slo_problem


def test_with_online_calibration_off_the_preset_is_kept():
    from spotrag_operator.autoscale import scale

    policy = ScalingPolicy(
        min_replicas=1, max_replicas=20, on_demand_baseline=1, engine_rates=H200, calibrate_online=False
    )
    truth = EngineRates(prefill_tokens_per_second=10_000, decode_step_seconds=0.02, seconds_per_sequence=0.001)
    state, autoscaler = None, None
    for s in synthetic_engine(truth):
        observed = Observation(
            now=s.time, queued_tokens=0, prompt_tokens=0, output_tokens=0, requests=0, ready=1, starting=0
        )
        step, autoscaler, state = scale(
            policy, observed, samples=[s], ttft_buckets=None, autoscaler=autoscaler, calibration_state=state
        )
    assert step.calibration.rates.prefill_tokens_per_second == 40_000 and step.calibration.intervals == 0


def test_engine_states_for_calibration_and_the_observation_from_readings():
    import datetime

    from spotrag_operator.autoscale import observation_from
    from spotrag_operator.engine_load import calibration_state
    from spotrag_operator.plan import Engine
    from spotrag_operator.queued_tokens import QueuedWork

    def engine(**facts):
        base = {"serving": True, "ready": True, "failed": False, "terminating": False}
        return Engine(
            name="e", capacity="spot", spec_hash="", created=datetime.datetime.now(datetime.UTC), **(base | facts)
        )

    states = [
        calibration_state(engine()),
        calibration_state(engine(ready=False)),
        calibration_state(engine(serving=False)),
        calibration_state(engine(terminating=True)),
        calibration_state(engine(failed=True)),
    ]
    assert states == [
        calibration.SERVING,
        calibration.STARTING,
        calibration.DRAINING,
        calibration.DRAINING,
        calibration.ERRORING,
    ]

    samples = [sample("a", 0, 0, 0, running=5, waiting=2), sample("b", 0, 0, 0, running=3)]
    observed = observation_from(QueuedWork(150, 100, 50, 4), samples, now=1, ready=2, starting=0)
    assert (observed.queued_tokens, observed.prompt_tokens, observed.output_tokens, observed.requests) == (
        150,
        100,
        50,
        14,
    )
    old_gateway = observation_from(QueuedWork(150), samples, now=1, ready=2, starting=0)
    assert (old_gateway.prompt_tokens, old_gateway.requests) == (None, None)
    failed = observation_from(None, samples, now=1, ready=2, starting=0, metric_problem="no gateway")
    assert failed.queued_tokens is None and failed.metric_problem == "no gateway"


# -- an SLO out of reach: prompt lengths, the reach check, engines that do not help ---------------


@pytest.mark.parametrize(
    ("previous", "current", "expected"),
    [
        (None, {"10.0": 1, "+Inf": 2}, None),  # the first reading: nothing to compare with
        ({"10.0": 1, "+Inf": 2}, {"10.0": 4, "+Inf": 7}, {"10.0": 3, "+Inf": 5}),
        ({"10.0": 1, "+Inf": 2}, {"10.0": 1, "+Inf": 2}, {"10.0": 0, "+Inf": 0}),  # nothing finished
        ({"10.0": 5, "+Inf": 9}, {"10.0": 1, "+Inf": 2}, None),  # the engine restarted: not a negative count
        ({"10.0": 5, "+Inf": 9}, {"10.0": 6, "+Inf": 8}, None),  # one bucket fell: a restart too
        ({"10.0": 1, "20.0": 1, "+Inf": 2}, {"10.0": 2, "+Inf": 3}, None),  # buckets changed (new max_model_len)
    ],
)
def test_prompt_histogram_deltas_per_engine(previous, current, expected):
    assert calibration.histogram_delta(previous, current) == expected


@pytest.mark.parametrize(
    ("kept", "delta", "elapsed", "expected"),
    [
        ({}, {"10.0": 3, "+Inf": 5}, 0.0, {"10.0": 3, "+Inf": 5}),
        ({"10.0": 4, "+Inf": 8}, {}, 1800.0, {"10.0": 4 * 0.36787944, "+Inf": 8 * 0.36787944}),  # one time constant
        ({"10.0": 4, "+Inf": 8}, {"10.0": 1, "+Inf": 1}, 0.0, {"10.0": 5, "+Inf": 9}),
    ],
)
def test_prompt_lengths_fade_over_half_an_hour(kept, delta, elapsed, expected):
    faded = calibration.fade_histogram(kept, delta, elapsed=elapsed)
    assert faded.keys() == expected.keys() and all(close(faded[le], expected[le], 1e-6) for le in expected)


# 100 prompts: 50 up to 1000 tokens, 40 in 1000-2000, 10 in 2000-5000 and none longer; or 10 past 5000.
LENGTHS = {"1000.0": 50, "2000.0": 90, "5000.0": 100, "+Inf": 100}
LONG_TAIL = {"1000.0": 50, "2000.0": 80, "5000.0": 90, "+Inf": 100}


@pytest.mark.parametrize(
    ("lengths", "percentile", "max_model_len", "tokens"),
    [
        (LENGTHS, 50, None, 1000.0),
        (LENGTHS, 95, None, 2000 + 3000 * 0.5),  # halfway through the 2000-5000 bucket
        (LONG_TAIL, 95, None, 5000.0),  # in the +Inf bucket: its lower bound, as Prometheus gives it
        (LONG_TAIL, 95, 8192, 5000 + 3192 * 0.5),  # ... interpolated up to the context vLLM refuses past
        ({k: v / 10 for k, v in LENGTHS.items()}, 95, None, None),  # 10 requests say nothing about a p95
    ],
)
def test_prompt_length_at_the_slo_percentile(lengths, percentile, max_model_len, tokens):
    result = calibration.Calibration(
        rates=L4,
        prompt_tokens_per_second=None,
        generation_tokens_per_second=None,
        mean_prompt_tokens=None,
        intervals=0,
        factors=(1, 1, 1),
        feedback=1.0,
        prompt_lengths=lengths,
    )
    value = result.prompt_tokens_at(percentile, max_model_len=max_model_len)
    assert value == tokens if tokens is None else close(value, tokens)


def test_calibration_reads_prompt_lengths_per_engine_and_skips_a_restart():
    def with_lengths(name, time, buckets):
        return EngineSample(
            name=name, time=time, prompt_tokens=0, generation_tokens=0, running=0, waiting=0, prompt_buckets=buckets
        )

    _, state = calibrate(None, L4, [with_lengths("a", 0, {"1000.0": 10, "+Inf": 10})], now=0)
    assert state.prompt_lengths == {}  # a first reading is no delta
    _, state = calibrate(
        state,
        L4,
        [with_lengths("a", 10, {"1000.0": 70, "+Inf": 80}), with_lengths("b", 10, {"1000.0": 5, "+Inf": 5})],
        now=10,
    )
    assert state.prompt_lengths == {"1000.0": 60, "+Inf": 70}  # b's first reading counts from its next
    result, state = calibrate(
        state,
        L4,
        [with_lengths("a", 20, {"1000.0": 1, "+Inf": 1}), with_lengths("b", 20, {"1000.0": 25, "+Inf": 25})],
        now=20,
    )
    fade = 2.718281828 ** (-10 / calibration.PROMPT_LENGTH_MEMORY_SECONDS)
    assert close(state.prompt_lengths["1000.0"], 60 * fade + 20) and close(state.prompt_lengths["+Inf"], 70 * fade + 20)
    assert state.prompt_buckets["a"] == {"1000.0": 1, "+Inf": 1}  # a restarted: its new counts are the next baseline
    assert CalibrationState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    assert result.prompt_tokens_at(95) is not None


@pytest.mark.parametrize(
    ("ttft", "p95_prompt", "mean_prompt", "reachable", "target", "says"),
    [
        (2.0, 4_000, 1_000, True, 2.0, None),  # 1.0 s at 4,000 tok/s
        (2.0, 7_000, 2_000, True, 2.0, None),  # 1.75 s: within it
        (2.0, 10_000, 2_000, False, 2.5 * 1.25, "below one prefill of the p95 prompt: 10000 tokens"),
        (2.0, 8_000, None, False, 2.0 * 1.25, "take 2.0s on any engine"),  # exactly at the SLO: out of reach
        (2.0, None, 2_000, True, 2.0, None),  # before the histogram holds enough: the mean, within it
        (0.2, None, 2_000, False, 0.5 * 1.25, "below one prefill of the mean prompt: 2000 tokens"),
        (2.0, None, None, True, 2.0, None),  # nothing seen yet
    ],
)
def test_an_slo_is_out_of_reach_when_one_prefill_of_the_percentile_prompt_exceeds_it(
    ttft, p95_prompt, mean_prompt, reachable, target, says
):
    rates = EngineRates(prefill_tokens_per_second=4_000, decode_step_seconds=0.06, seconds_per_sequence=0.001)
    reach = autoscale.slo_reach(
        Slo(ttft_seconds=ttft), rates, percentile_prompt_tokens=p95_prompt, mean_prompt_tokens=mean_prompt
    )
    assert reach.reachable == reachable and close(reach.target_seconds, target)
    assert (reach.message is None) == (says is None)
    if says:
        assert says in reach.message and f"SLO of {ttft:g}s" in reach.message and "4000 tok/s" in reach.message


@pytest.mark.parametrize(
    ("stall", "ttft", "engines", "expected"),
    [
        ((None, None, 0, None), 3.0, 10, (3.0, 10, 0, None)),  # a streak over the target begins
        ((3.0, 10, 0, None), 3.0, None, (3.0, None, 0, None)),  # engines still starting: begin again when landed
        ((3.0, 10, 3, None), 2.9, 14, (3.0, 10, 4, None)),  # 40% more engines, but only 4 periods
        ((3.0, 10, 4, None), 2.9, 14, (3.0, 10, 5, 600.0)),  # 5 periods, 40% more, TTFT 3% better: stalled
        ((3.0, 10, 4, None), 2.5, 14, (3.0, 10, 5, None)),  # 17% better: the engines helped
        ((3.0, 10, 4, None), 3.0, 12, (3.0, 10, 5, None)),  # only 20% more engines: not judged yet
        ((3.0, 2, 4, None), 3.0, 2, (3.0, 2, 5, None)),  # no engine added
        ((3.0, 10, 9, 100.0), 3.5, 14, (3.0, 10, 9, 100.0)),  # stalled stays stalled
    ],
)
def test_scale_ups_that_did_not_improve_the_ttft_are_found(stall, ttft, engines, expected):
    assert calibration.over_target(stall, ttft, engines, now=600.0) == expected


def _over(factor=1.0, **state):
    counts = {"2.0": 0, "4.0": 100, "+Inf": 100}  # p95 between 2 and 4 s: over a 2 s target
    return feedback(
        CalibrationState(feedback=factor, **state), counts, slo_seconds=2.0, percentile=95, now=3600.0, engines=20
    )


@pytest.mark.parametrize(
    ("factor", "state", "reachable", "expected"),
    [
        (1.0, {}, True, calibration.FEEDBACK_DOWN),  # reachable, over: more engines
        (1.0, {}, False, 1.0),  # out of reach: no engine added for the SLO
        (0.6, {}, False, 1.0),  # ... and those the feedback added are given back
        (1.3, {}, False, 1.3 * calibration.FEEDBACK_DOWN),  # over the floor target: back towards the model
        (0.7, {"stall_ttft": 3.0, "stall_engines": 10, "stall_periods": 4}, True, 1.0),  # stalled now: back to 1
        (1.0, {"stall_ttft": 3.0, "stall_engines": 10, "stall_periods": 9, "stalled_since": 0.0}, True, 1.0),
    ],
)
def test_feedback_adds_no_engines_that_do_not_help(factor, state, reachable, expected):
    counts = {"2.0": 0, "4.0": 100, "+Inf": 100}
    value, _, after = feedback(
        CalibrationState(feedback=factor, **state),
        counts,
        slo_seconds=2.0,
        percentile=95,
        now=3600.0,
        engines=20,
        reachable=reachable,
    )
    assert close(value, expected) and after.feedback == value


@pytest.mark.parametrize(
    ("since", "now", "stalled_after"),
    [(0.0, 1800.0, True), (0.0, 3600.0, False)],  # a period under the target clears a stall only after an hour
)
def test_a_stall_is_held_an_hour(since, now, stalled_after):
    counts = {"0.5": 100, "2.0": 100, "+Inf": 100}  # well under
    state = CalibrationState(stall_ttft=3.0, stall_engines=10, stall_periods=5, stalled_since=since)
    _, _, after = feedback(state, counts, slo_seconds=2.0, percentile=95, now=now, engines=10)
    assert (after.stalled_since is not None) == stalled_after
