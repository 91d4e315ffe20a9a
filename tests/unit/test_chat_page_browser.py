"""The chat page in a real browser: headless Chromium (Debian's ``chromium``
and ``chromium-driver``, which ./scripts/setup installs where it can) driven
by Selenium against a real gateway with API keys, the shipped embedding
model, the corpus index and an engine emulator process.

Every wait is on the page's own state (``data-state`` of an answer, what is
shown), never on time. With ``SPOTRAG_UI_SCREENSHOTS=DIR`` the test also
saves the desktop and phone screenshots kept in docs/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .gateway_fixtures import RunningGateway, gateway_config, running_engines, sample_questions, scratch_dir

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

API_KEY = "sk-page-test"
MAX_BODY_BYTES = 16 * 1024
DEFAULT_MAX_TOKENS = 64
WAIT_S = 30  # an upper bound for a wait that succeeds in well under a second
PHONE = {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}


def browser_binaries() -> tuple[str, str]:
    chromium = os.environ.get("SPOTRAG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("SPOTRAG_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        missing = " and ".join(name for name, found in (("chromium", chromium), ("chromedriver", driver)) if not found)
        pytest.skip(
            f"{missing} not found: the browser test needs Debian's chromium and chromium-driver "
            "(./scripts/setup installs them when run as root with apt-get)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    keys = scratch_dir("spotrag-page-keys-")
    (keys / "key").write_text(API_KEY)
    # Answers of 40-60 words at 15 ms a word: long enough to see them arrive.
    with running_engines(1, itl_ms=15, answer_words_min=40, answer_words_max=60) as engines:
        config = gateway_config(
            [engine.url for engine in engines],
            auth={"apiKeysDir": str(keys)},
            admission={"maxTokensLimit": 512, "defaultMaxTokens": DEFAULT_MAX_TOKENS, "maxBodyBytes": MAX_BODY_BYTES},
        )
        with RunningGateway(config) as running:
            yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, driver_path = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, checked for errors
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    try:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    except WebDriverException as error:
        pytest.skip(f"chromium did not start: {error.msg}")
    try:
        yield driver
    finally:
        driver.quit()


def wait(browser, condition, what: str):
    return WebDriverWait(browser, WAIT_S, poll_frequency=0.02).until(lambda _: condition(), message=what)


def answer_state(browser, turn: int) -> dict:
    """An answer's state and text, read in one go."""
    return browser.execute_script(
        "const t = document.getElementById(arguments[0]);"
        "return t && {state: t.dataset.state, text: t.querySelector('.answer').textContent,"
        " status: t.querySelector('.status').textContent, chunks: Number(t.dataset.chunks || 0)};",
        f"turn-{turn}",
    )


def ask(browser, question: str) -> None:
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question, Keys.ENTER)


def console_errors(browser) -> list[str]:
    """Errors in the page's console (a script error, a blocked resource), less
    the failed requests the test causes on purpose (401, 503, a gone gateway)."""
    return [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
    ]


def screenshot(browser, name: str) -> None:
    folder = os.environ.get("SPOTRAG_UI_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / name))


def test_a_streamed_cited_conversation_behind_an_api_key(gateway: RunningGateway, browser) -> None:
    sample = next(s for s in sample_questions() if s.source == "handbook/pets-onboard.md")
    browser.get(gateway.url)
    wait(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page to start")
    key_form = browser.find_element(By.ID, "key-form")
    assert key_form.is_displayed()  # auth is on: the page asks for a key at once

    # Without a key: the question waits, saying why.
    ask(browser, sample.question)
    wait(browser, lambda: answer_state(browser, 1)["state"] == "needs-key", "the answer to wait for a key")
    assert "needs an API key" in answer_state(browser, 1)["status"]

    # A wrong key: the gateway's 401, said as a person would.
    browser.find_element(By.ID, "api-key").send_keys("sk-wrong", Keys.ENTER)
    wait(browser, lambda: "did not accept" in browser.find_element(By.ID, "key-message").text, "the 401")
    assert key_form.is_displayed() and answer_state(browser, 1)["state"] == "needs-key"

    # The right key: the answer streams in, word by word, before it is complete.
    browser.find_element(By.ID, "api-key").send_keys(API_KEY, Keys.ENTER)
    partial = wait(
        browser,
        lambda: (s := answer_state(browser, 1))["state"] == "streaming" and s["text"] and s,
        "tokens to arrive while the answer is still streaming",
    )
    final = wait(browser, lambda: (s := answer_state(browser, 1))["state"] == "done" and s, "the answer to complete")
    assert final["text"].startswith(partial["text"]) and len(final["text"]) > len(partial["text"])
    assert final["chunks"] > 1
    assert final["text"].startswith("Emulated answer, quoting the references:") and sample.answer in final["text"]
    assert not key_form.is_displayed()

    # Sources under the answer, the best one first; [n] markers link to them.
    sources = browser.find_elements(By.CSS_SELECTOR, "#turn-1 .sources li")
    assert len(sources) == 4 and sample.source in sources[0].text and "score" in sources[0].text
    passage = sources[0].find_element(By.CSS_SELECTOR, ".passage")
    assert not passage.is_displayed()
    sources[0].find_element(By.CSS_SELECTOR, ".source-head").click()
    assert passage.is_displayed() and sample.answer in passage.text
    sources[0].find_element(By.CSS_SELECTOR, ".source-head").click()
    assert not passage.is_displayed()
    cite = browser.find_element(By.CSS_SELECTOR, "#turn-1 a.cite")
    assert cite.text == "[1]"
    cite.click()
    assert passage.is_displayed() and "flash" in sources[0].get_attribute("class")

    # A follow-up carries the conversation: the same answer as the API gives for it.
    follow_up = "And what does a pet ticket cost?"
    ask(browser, follow_up)
    second = wait(browser, lambda: (s := answer_state(browser, 2))["state"] == "done" and s, "the follow-up's answer")
    expected = httpx.post(
        f"{gateway.url}/v1/rag/query",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={
            "question": follow_up,
            "messages": [
                {"role": "user", "content": sample.question},
                {"role": "assistant", "content": final["text"]},
            ],
            "max_tokens": DEFAULT_MAX_TOKENS,
            "top_k": 4,
        },
        timeout=30,
    ).json()
    assert second["text"] == expected["answer"]
    assert "£6" in second["text"]
    screenshot(browser, "chat-page-desktop.png")

    # A phone-sized screen: nothing wider than the screen.
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", PHONE)
    try:
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth;")
        assert overflow <= 0
        screenshot(browser, "chat-page-phone.png")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    # Bad input never leaves the page: an empty question, one over the body limit.
    ask(browser, "   ")
    notice = browser.find_element(By.ID, "notice")
    wait(browser, lambda: notice.is_displayed(), "the empty question's notice")
    assert notice.text == "Type a question first."
    browser.execute_script("document.getElementById('question').value = 'why '.repeat(arguments[0]);", MAX_BODY_BYTES)
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda: "too long" in notice.text, "the long question's notice")
    assert "accepts at most 16 KiB" in notice.text and answer_state(browser, 3) is None
    assert console_errors(browser) == []


def test_errors_are_said_plainly_and_can_be_retried(browser) -> None:
    """No engine serves (503), then the gateway itself is gone (a restart):
    each is said in words, with a Retry button."""
    config = gateway_config([], retrieval={"enabled": False})
    running = RunningGateway(config).start()
    try:
        browser.get(running.url)
        wait(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
        assert not browser.find_element(By.ID, "key-form").is_displayed()
        ask(browser, "Is anyone there?")
        wait(browser, lambda: answer_state(browser, 1)["state"] == "error", "the 503")
        assert "No engine is serving right now" in answer_state(browser, 1)["status"]
    finally:
        running.stop()
    browser.find_element(By.CSS_SELECTOR, "#turn-1 .retry").click()
    wait(browser, lambda: "Could not reach the gateway" in answer_state(browser, 1)["status"], "the dropped gateway")
    assert browser.find_element(By.CSS_SELECTOR, "#turn-1 .retry").is_displayed()


def test_an_answer_resumed_on_another_engine_shows_as_one(browser) -> None:
    """The engine writing the answer dies mid-answer: the gateway resumes it
    on the other, and the page shows one answer, the one engine's text."""
    question = "At what wind speed are sailings cancelled?"
    with running_engines(2, itl_ms=20, answer_words_min=150, answer_words_max=150) as engines:
        config = gateway_config([engine.url for engine in engines], admission={"defaultMaxTokens": 200})
        with RunningGateway(config) as running:
            browser.get(running.url)
            wait(browser, lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "the page")
            ask(browser, question)
            wait(browser, lambda: (s := answer_state(browser, 1))["state"] == "streaming" and s["text"], "tokens")
            serving = wait(
                browser,
                lambda: next(
                    (e for e in engines if running.metric("spotrag_engine_inflight_tokens", engine=e.url) > 0), None
                ),
                "the engine that writes the answer",
            )
            serving.kill()
            shown = wait(
                browser, lambda: (s := answer_state(browser, 1))["state"] in ("done", "cut", "error") and s, ""
            )
            assert shown["state"] == "done" and shown["status"] == "", shown
            assert running.metric("spotrag_resumed_streams_total") == 1
            expected = httpx.post(
                f"{running.url}/v1/rag/query", json={"question": question, "max_tokens": 200, "top_k": 4}, timeout=30
            ).json()
            assert shown["text"] == expected["answer"]
