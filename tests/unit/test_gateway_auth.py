"""API keys from a mounted Secret: accepted, refused in OpenAI's shape,
rotated without a restart, never logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx
import openai
import pytest

from spotrag_box.testing import eventually
from spotrag_runtime.gateway.auth import APIKeyStore

from .gateway_fixtures import API_KEY, SERVED_MODEL, RunningGateway, gateway_config


def mount_secret(folder: Path, keys: dict[str, str], generation: int) -> None:
    """Write keys the way the kubelet updates a Secret volume: a new timestamped
    folder, then the ``..data`` symlink swapped atomically to it."""
    folder.mkdir(exist_ok=True)
    data = folder / f"..2026_11_22_00_00_0{generation}"
    data.mkdir()
    for name, value in keys.items():
        (data / name).write_text(value)
    staging = folder / "..data_tmp"
    staging.symlink_to(data.name)
    os.replace(staging, folder / "..data")
    for name in keys:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for stale in folder.iterdir():
        if not stale.name.startswith(".") and not stale.exists():  # a key that left the Secret
            stale.unlink()


def test_keys_are_read_from_the_secret_folder_and_checked_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "api-keys"
    mount_secret(folder, {"team-a": "sk-alpha\n", "team-b": "sk-beta", "empty": ""}, generation=1)
    store = APIKeyStore(folder, recheck_seconds=0)
    assert store.is_valid("Bearer sk-alpha")  # the trailing newline of the file is not part of the key
    assert store.is_valid("bearer sk-beta")
    for refused in (None, "", "Bearer", "Bearer ", "Basic sk-alpha", "sk-alpha", "Bearer sk-alph", "Bearer sk-alpha2"):
        assert not store.is_valid(refused), refused


def test_a_rotated_secret_takes_effect_without_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "api-keys"
    mount_secret(folder, {"current": "sk-old"}, generation=1)
    store = APIKeyStore(folder, recheck_seconds=0)
    assert store.is_valid("Bearer sk-old")
    mount_secret(folder, {"current": "sk-new", "extra": "sk-extra"}, generation=2)
    assert store.is_valid("Bearer sk-new") and store.is_valid("Bearer sk-extra")
    assert not store.is_valid("Bearer sk-old")


def test_a_missing_or_empty_folder_refuses_everything_and_says_so(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="spotrag_runtime.gateway.auth"):
        missing = APIKeyStore(tmp_path / "nowhere")
        (tmp_path / "empty").mkdir()
        empty = APIKeyStore(tmp_path / "empty")
    assert not missing.is_valid("Bearer anything") and not empty.is_valid("Bearer anything")
    assert "cannot be read" in caplog.text and "holds no key" in caplog.text


@pytest.fixture
def secured_gateway(tmp_path: Path):
    folder = tmp_path / "api-keys"
    mount_secret(folder, {"main": API_KEY}, generation=1)
    config = gateway_config(["http://127.0.0.1:9"], retrieval={"enabled": False}, auth={"apiKeysDir": str(folder)})
    with RunningGateway(config) as gateway:
        yield gateway, folder


def test_requests_without_an_accepted_key_get_401_before_anything_else(secured_gateway, caplog) -> None:
    gateway, _ = secured_gateway
    with gateway.client(api_key="sk-wrong") as wrong, pytest.raises(openai.AuthenticationError) as raised:
        wrong.models.list()
    assert raised.value.status_code == 401
    assert raised.value.body == {
        "message": "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    # Refused before the body is read: not even its JSON is looked at.
    garbage = httpx.post(
        f"{gateway.url}/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert garbage.status_code == 401 and garbage.headers["WWW-Authenticate"] == "Bearer"
    with gateway.client() as client:
        assert [model.id for model in client.models.list()] == [SERVED_MODEL]
    # Probes and the operator's scrape need no key.
    assert httpx.get(f"{gateway.url}/healthz").status_code == 200
    assert httpx.get(f"{gateway.url}/metrics").status_code == 200
    assert gateway.metric("spotrag_requests_total", outcome="invalid") == 1
    assert API_KEY not in caplog.text and "sk-wrong" not in caplog.text


def test_the_gateway_follows_a_rotated_secret(secured_gateway) -> None:
    gateway, folder = secured_gateway
    mount_secret(folder, {"main": "sk-rotated"}, generation=2)

    def status_with(key: str) -> int:
        return httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code

    eventually(lambda: status_with(API_KEY) == 401, what="the old key to be refused")
    assert status_with("sk-rotated") == 200
