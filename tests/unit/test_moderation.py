"""Moderation rules, PII redaction and the external checker (OpenAI's
moderation API over real HTTP), including one that never answers."""

from __future__ import annotations

import httpx
import pytest

from spotrag_runtime.moderation import (
    CheckerConfig,
    ConfigError,
    ContentBlocked,
    ModerationConfig,
    ModerationUnavailable,
    Moderator,
    redact,
)

from .frontdoor_fixtures import moderation_checker


@pytest.fixture
async def http():
    async with httpx.AsyncClient() as client:
        yield client


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("how do I build a Bomb at home", "blocked_term"),
        ("tell me about the free lunch policy", "blocked_term"),  # a phrase
        ("what about bombastic prose", None),  # whole words only
        ("my card is 4111-1111-1111-1111", "blocked_pattern"),
        ("nothing to see", None),
    ],
)
def test_rules_block_whole_terms_in_any_case_and_patterns(http, text, reason) -> None:
    config = ModerationConfig(block_list=("bomb", "free lunch"), patterns=(r"\b(?:\d{4}-){3}\d{4}\b",))
    verdict = Moderator(config, http).check_rules(text)
    assert verdict.reason == reason
    assert verdict.blocked is (reason is not None)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("mail me at jane.doe+x@example.co.uk please", "mail me at [email] please"),
        ("call +44 20 7946 0958 or 555-123-4567", "call [phone] or [phone]"),
        ("the ferry leaves at 10:30 from pier 4", "the ferry leaves at 10:30 from pier 4"),
        ("order 2026 costs 35 pounds", "order 2026 costs 35 pounds"),
    ],
)
def test_pii_redaction_replaces_emails_and_phone_like_numbers_only(text, redacted) -> None:
    assert redact(text) == redacted


async def test_input_is_redacted_before_the_checker_sees_it(http) -> None:
    async with moderation_checker(("attack",)) as checker:
        moderator = Moderator(ModerationConfig(redact_pii=True, checker=CheckerConfig(url=checker["url"])), http)
        verdict = await moderator.check_input("write to bob@example.com about the timetable")
        assert not verdict.blocked
        assert verdict.text == "write to [email] about the timetable"
        assert checker["inputs"] == ["write to [email] about the timetable"]

        flagged = await moderator.check_input("plan an attack")
        assert (flagged.blocked, flagged.reason, flagged.detail) == (True, "flagged", "violence")
        error = flagged.error("input")
        assert isinstance(error, ContentBlocked) and error.status == 400
        assert error.body()["error"] == {
            "message": "The question was blocked by moderation (flagged: violence).",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_filter",
            "reason": "flagged",
        }


async def test_only_the_chosen_categories_block(http) -> None:
    async with moderation_checker(("attack",)) as checker:
        config = ModerationConfig(checker=CheckerConfig(url=checker["url"], categories=("hate",)))
        assert not (await Moderator(config, http).check_input("plan an attack")).blocked


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_hanging_checker_times_out_and_the_policy_decides(http, fail_open) -> None:
    async with moderation_checker(hang=True) as checker:
        config = ModerationConfig(checker=CheckerConfig(url=checker["url"], timeout_seconds=0.2, fail_open=fail_open))
        verdict = await Moderator(config, http).check_input("hello")
        assert checker["inputs"] == ["hello"]  # it was asked, and never answered
    if fail_open:
        assert (verdict.blocked, verdict.checker_failed) == (False, True)
    else:
        assert (verdict.blocked, verdict.reason) == (True, "checker_unavailable")
        error = verdict.error("input")
        assert isinstance(error, ModerationUnavailable)
        assert (error.status, error.body()["error"]["code"]) == (503, "moderation_unavailable")


async def test_a_checker_that_is_not_there_follows_the_policy_too(http) -> None:
    async with moderation_checker() as checker:
        url = checker["url"]
    config = ModerationConfig(checker=CheckerConfig(url=url, fail_open=False))
    assert (await Moderator(config, http).check_input("hello")).reason == "checker_unavailable"


async def test_output_rules_see_a_term_split_across_windows(http) -> None:
    moderator = Moderator(ModerationConfig(block_list=("secret plan",)), http)
    assert not (await moderator.check_output("the secret", "the secret")).blocked
    assert (await moderator.check_output("the secret plan", " plan")).reason == "blocked_term"


def test_config_from_the_crd_section() -> None:
    assert ModerationConfig.from_mapping(None) is None
    assert ModerationConfig.from_mapping({"enabled": False, "blockList": ["x"]}) is None
    assert ModerationConfig.from_mapping({"blockList": []}) is None  # nothing to check
    config = ModerationConfig.from_mapping(
        {
            "blockList": ["bomb"],
            "windowChars": 50,
            "checker": {"url": "http://mod:8080/", "timeoutSeconds": 1, "onError": "block"},
        }
    )
    assert config is not None and config.window_chars == 50
    assert config.checker == CheckerConfig(url="http://mod:8080/", timeout_seconds=1.0, fail_open=False)
    assert config.checker.endpoint == "http://mod:8080/v1/moderations"
    with pytest.raises(ConfigError, match="not a regular expression"):
        ModerationConfig.from_mapping({"patterns": ["(unclosed"]})
