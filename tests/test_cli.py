"""The CLI layer: every subcommand documents itself, and bad input is one line, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from captioner import __version__
from captioner.cli import main

COMMANDS = sorted(main.commands)


def test_every_stage_has_a_command():
    expected = {"download", "clean", "features", "tokenizer", "train", "evaluate", "caption"}
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_of_every_subcommand_has_an_example(name: str):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output
    assert f"captioner {name}" in result.output


def test_version_is_the_packages_own():
    """--version prints the version pyproject.toml declares (not a fallback such as 0.0.0)."""
    import tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"captioner, version {declared}\n"
    assert __version__ == declared


def test_help_does_not_import_tensorflow():
    """`captioner --help` must be instant: TensorFlow is imported inside the commands only."""
    code = (
        "import sys; from captioner.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported by --help'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_unknown_config_key_is_one_line_error(tmp_path):
    result = CliRunner().invoke(
        main,
        ["tokenizer", "--dataset", "demo", "--data-dir", str(tmp_path), "--set", "train.epoch=3"],
    )
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown config key 'train.epoch'"
    assert "Traceback" not in result.output


def test_tensorflow_starts_quietly_unless_verbose():
    """TensorFlow's native start-up lines (CUDA probing, oneDNN notes) never reach stderr from
    start_tensorflow, while Python's own stderr works again right after it."""
    code = (
        "import sys; from captioner.cli_options import start_tensorflow; start_tensorflow(); "
        "print('ours', file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k != "CAPTIONER_VERBOSE"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0 and done.stderr == "ours\n"
    assert "--verbose" in CliRunner().invoke(main, ["--help"]).output
