"""The `spotrag` command: every subcommand resolves and explains itself."""

import importlib
import subprocess
import sys

import pytest

from spotrag_runtime.cli import SUBCOMMANDS, main


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_points_at_a_cli_function(name):
    module_name, _, function = SUBCOMMANDS[name][0].partition(":")
    assert callable(getattr(importlib.import_module(module_name), function))


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name):
    result = subprocess.run(
        [sys.executable, "-m", "spotrag_runtime.cli", name, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_unknown_command_lists_the_commands(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err and "operator" in err and "gateway" in err
