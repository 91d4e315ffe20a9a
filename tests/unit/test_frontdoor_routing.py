"""The route table as a pure function of RAGDeployments and ModelRoutes, and
how a variant is picked: tables of input → expected routes and status."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from spotrag_runtime.frontdoor.routing import Backend, Route, Variant, build_table


def ragd(
    name: str, served: str | None = None, *, namespace: str = "team", created: str = "2026-01-01T00:00:00Z", **spec
):
    model = {"name": "Qwen/Qwen2.5-7B-Instruct"}
    if served:
        model["servedModelName"] = served
    return {
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
        "spec": {"model": model, **spec},
    }


def modelroute(
    name: str,
    backends: list[tuple[str, int]],
    *,
    model: str | None = None,
    namespace: str = "team",
    created: str = "2026-01-02T00:00:00Z",
    generation: int = 1,
):
    spec: dict = {"backends": [{"ragDeployment": b, "weight": w} for b, w in backends]}
    if model:
        spec["model"] = model
    return {
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created, "generation": generation},
        "spec": spec,
    }


def test_every_ragdeployment_is_served_under_its_served_name_or_its_name() -> None:
    table = build_table([ragd("handbook", "qwen"), ragd("faq")])
    assert table.models == ["faq", "qwen"]
    assert table.routes["qwen"].variants == (Variant(Backend("team", "handbook", "qwen"), 1),)
    assert table.problems == []


def test_a_modelroute_splits_its_model_by_relative_weights_and_reports_shares() -> None:
    table = build_table([ragd("chat-v1"), ragd("chat-v2")], [modelroute("chat", [("chat-v1", 90), ("chat-v2", 10)])])
    route = table.routes["chat"]
    assert route.shares() == {"team/chat-v1": 0.9, "team/chat-v2": 0.1}
    # The variants stay reachable under their own names too.
    assert set(table.models) == {"chat", "chat-v1", "chat-v2"}
    status = table.route_status[("team", "chat")]
    assert status["backends"] == "chat-v1=90%, chat-v2=10%"
    assert [c["status"] for c in status["conditions"]] == ["True", "True"]
    assert status["conditions"][0]["message"] == "serving 'chat'"


def test_weights_that_do_not_add_up_to_100_are_shares_of_their_sum_and_said_so() -> None:
    table = build_table([ragd("a"), ragd("b")], [modelroute("chat", [("a", 3), ("b", 1)])])
    assert table.routes["chat"].shares() == {"team/a": 0.75, "team/b": 0.25}
    accepted = table.route_status[("team", "chat")]["conditions"][0]
    assert (accepted["status"], accepted["message"]) == (
        "True",
        "serving 'chat' (weights sum to 4; shares are weight / 4)",
    )


def test_a_missing_backend_is_reported_and_its_share_goes_to_the_others() -> None:
    table = build_table([ragd("a")], [modelroute("chat", [("a", 50), ("gone", 50)])])
    assert table.routes["chat"].shares() == {"team/a": 1.0}
    status = table.route_status[("team", "chat")]
    resolved = status["conditions"][1]
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    assert "no RAGDeployment gone in team" in resolved["message"]
    assert status["variants"][1] == {
        "ragDeployment": "gone",
        "weight": 50,
        "found": False,
        "share": "0%",
        "ready": False,
    }
    assert table.problems == ["ModelRoute team/chat: no RAGDeployment gone in team (or its spec is invalid)"]


def test_all_weights_zero_keeps_the_model_known_but_takes_no_traffic() -> None:
    table = build_table([ragd("a")], [modelroute("chat", [("a", 0)])])
    route = table.routes["chat"]
    assert route.pick() is None
    accepted = table.route_status[("team", "chat")]["conditions"][0]
    assert (accepted["status"], accepted["reason"]) == ("False", "NoWeight")


def test_a_backend_in_another_namespace_is_not_reachable_from_a_route() -> None:
    table = build_table([ragd("a", namespace="other")], [modelroute("chat", [("a", 1)])])
    assert table.routes["chat"].pick() is None
    assert table.route_status[("team", "chat")]["conditions"][1]["status"] == "False"


def test_conflicts_go_to_the_oldest_and_are_reported() -> None:
    table = build_table(
        [ragd("old", "qwen", created="2026-01-01T00:00:00Z"), ragd("new", "qwen", created="2026-02-01T00:00:00Z")],
        [
            modelroute("r1", [("old", 1)], model="chat", created="2026-01-05T00:00:00Z"),
            modelroute("r2", [("new", 1)], model="chat", created="2026-01-06T00:00:00Z"),
        ],
    )
    assert table.routes["qwen"].source == "RAGDeployment team/old"
    assert table.routes["chat"].source == "ModelRoute team/r1"
    loser = table.route_status[("team", "r2")]["conditions"][0]
    assert (loser["status"], loser["reason"]) == ("False", "Conflict")
    assert "RAGDeployment team/new: model 'qwen' is already served by RAGDeployment team/old" in table.problems


def test_a_route_name_wins_over_a_served_name_without_a_complaint() -> None:
    table = build_table([ragd("v1", "chat"), ragd("v2")], [modelroute("chat", [("v1", 1), ("v2", 1)])])
    assert table.routes["chat"].source == "ModelRoute team/chat"
    assert table.problems == []


def test_an_invalid_moderation_section_keeps_the_deployment_out_rather_than_unmoderated() -> None:
    table = build_table([ragd("a", moderation={"patterns": ["(oops"]})], [modelroute("chat", [("a", 1)])])
    assert "a" not in table.routes
    assert table.routes["chat"].pick() is None
    assert any("spec.moderation" in p for p in table.problems)


def test_garbage_never_raises() -> None:
    table = build_table(
        [{"metadata": {}}, {"spec": None, "metadata": {"name": "x"}}],
        [{"metadata": {"name": "r"}, "spec": {"backends": [{"weight": "lots"}, {}]}}, {"metadata": {"name": "e"}}],
    )
    assert "x" in table.routes
    assert table.route_status[("default", "e")]["conditions"][0]["reason"] == "NoBackends"


def _route(*weights: int) -> Route:
    return Route("m", tuple(Variant(Backend("ns", f"v{i}", "m"), w) for i, w in enumerate(weights)), "test")


def test_random_picks_follow_the_weights() -> None:
    rng = random.Random(1)
    counts = Counter(_route(90, 10).pick(rng=rng).backend.name for _ in range(10_000))
    assert 8_800 < counts["v0"] < 9_200


def test_sticky_picks_are_stable_and_spread_by_weight() -> None:
    route = _route(50, 50)
    users = [f"user-{i}" for i in range(2_000)]
    first = {u: route.pick(u).backend.name for u in users}
    assert first == {u: route.pick(u).backend.name for u in users}
    assert 900 < Counter(first.values())["v0"] < 1_100
    # Another route (another model) hashes the same users independently.
    other = Route("n", route.variants, "test")
    assert sum(other.pick(u).backend.name != first[u] for u in users) > 500


def test_a_variant_with_nowhere_to_send_is_skipped() -> None:
    route = _route(99, 1)
    picks = {route.pick(rng=random.Random(i), usable=lambda b: b.name == "v1").backend.name for i in range(20)}
    assert picks == {"v1"}
    assert route.pick(usable=lambda b: False) is None


@pytest.mark.parametrize("weights", [(0, 5), (5, 0)])
def test_zero_weight_variants_get_nothing(weights) -> None:
    route = _route(*weights)
    expected = "v1" if weights[0] == 0 else "v0"
    assert {route.pick(rng=random.Random(i)).backend.name for i in range(50)} == {expected}
