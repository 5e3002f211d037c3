"""The ``shoal`` command's dispatch: subcommands it does not know itself come from the
``shoal.cli`` entry points (``up`` from shoal-devtools), each a ``main(argv) -> int``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from shoal.common.cli import COMMAND_ENTRY_POINT_GROUP, command_entry_points, main

PLUGIN = '''
"""A stand-in command."""

calls = []


def main(argv: list[str]) -> int:
    """Echo the arguments it was given."""
    calls.append(argv)
    return 7
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, EntryPoint]]:
    (tmp_path / "shoal_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield {"echo": EntryPoint("echo", "shoal_test_plugin:main", COMMAND_ENTRY_POINT_GROUP)}
    sys.modules.pop("shoal_test_plugin", None)


def test_a_discovered_command_gets_the_arguments_after_its_name(
    plugin: dict[str, EntryPoint],
) -> None:
    assert main(["echo", "--flag", "value"], commands=plugin) == 7
    import shoal_test_plugin  # type: ignore[import-not-found]

    assert shoal_test_plugin.calls == [["--flag", "value"]]


def test_a_command_that_cannot_be_loaded_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    broken = {
        "broken": EntryPoint("broken", "shoal_no_such_module:main", COMMAND_ENTRY_POINT_GROUP)
    }
    assert main(["broken"], commands=broken) == 1
    assert "cannot load shoal_no_such_module:main" in capsys.readouterr().err


def test_help_lists_the_discovered_commands(
    plugin: dict[str, EntryPoint], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"], commands=plugin)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out
    assert "admin" in out
    assert "echo" in out
    assert "Echo the arguments it was given" in out


def test_built_in_commands_cannot_be_replaced(plugin: dict[str, EntryPoint]) -> None:
    shadowing = {"run": plugin["echo"]}
    with pytest.raises(SystemExit) as exit_:
        main(["run"], commands=shadowing)  # parsed as the built-in: the service is missing
    assert exit_.value.code == 2


def test_up_without_devtools_says_what_to_install(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--home", "x"], commands={}) == 2
    assert "install shoal-devtools" in capsys.readouterr().err


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["nosuch"], commands={})
    assert exit_.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err


def test_the_workspace_registers_up_from_devtools() -> None:
    entry = command_entry_points()["up"]
    assert entry.value == "shoal.devtools.cli:main"
    script = Path(sys.executable).parent / "shoal"
    result = subprocess.run(
        [str(script), "up", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: shoal up")
