"""`spotrag front-door`: its flags and config file, and bad input turned into a
message and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spotrag_runtime.frontdoor.cli import build_parser, cli, config_from_args
from spotrag_runtime.frontdoor.config import ConfigError, FrontDoorConfig, StaticBackend, load_config


def test_backends_on_the_command_line_make_a_split() -> None:
    args = build_parser().parse_args(["--backend", "chat=http://a:8080@90", "--backend", "chat=http://b:8080@10"])
    assert config_from_args(args).static == (
        StaticBackend("chat", "chat-0", "http://a:8080", 90),
        StaticBackend("chat", "chat-1", "http://b:8080", 10),
    )


def test_a_yaml_config_file(tmp_path) -> None:
    path = tmp_path / "frontdoor.yaml"
    path.write_text(
        "namespaces: [team-a]\naddress: endpointslices\nstickyHeader: X-User\n"
        "apiKeys: {directory: /keys, models: {ci: [chat]}}\n"
    )
    assert load_config(path) == FrontDoorConfig(
        namespaces=("team-a",),
        address="endpointslices",
        sticky_header="X-User",
        api_keys_dir="/keys",
        models_by_key={"ci": ("chat",)},
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--backend", "chat"], "expected MODEL=URL[@WEIGHT]"),
        (["--backend", "chat=http://a@lots"], "the weight must be an integer"),
    ],
)
def test_bad_backends_exit_2_with_a_message(argv, message, capsys) -> None:
    assert cli(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_config_values_are_named(tmp_path) -> None:
    path = tmp_path / "frontdoor.json"
    path.write_text('{"address": "dns"}')
    with pytest.raises(ConfigError, match="address must be one of service, endpointslices"):
        load_config(path)


def test_spotrag_lists_the_subcommand() -> None:
    done = subprocess.run([sys.executable, "-m", "spotrag_runtime.cli", "--help"], capture_output=True, text=True)
    assert "front-door" in done.stdout
