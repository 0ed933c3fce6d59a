"""The command line's front matter: ``--version`` and one working example per subcommand."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from outer_train import cli

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_prints_the_pyproject_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"learned-opt {PYPROJECT_VERSION}"
    assert cli.FALLBACK_VERSION == PYPROJECT_VERSION  # the uninstalled fallback cannot drift
    with pytest.raises(SystemExit) as e:  # also through the parser (and listed in its help)
        cli.build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"learned-opt {PYPROJECT_VERSION}"


def test_version_imports_neither_jax_nor_the_subcommands():
    code = ("import sys; from outer_train.cli import main; main(['--version']); "
            "print(sorted(m for m in ('jax', 'outer_train.cli.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, timeout=120).stdout
    assert out.splitlines() == [f"learned-opt {PYPROJECT_VERSION}", "[]"]


def test_every_subcommand_lists_the_diagnostics_and_compare():
    assert set(_subcommands()) == {"train", "meta-train", "compare", "eval", "surface",
                                   "dynamics", "variance"}


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_help_shows_an_example_that_parses(name, capsys):
    sub = _subcommands()[name]
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "example:" in help_text
    words = shlex.split(help_text.split("example:", 1)[1].strip().splitlines()[0])
    assert words[:2] == ["learned-opt", name]
    args = cli.build_parser().parse_args(words[1:])  # the example is a valid command line
    for word in words:
        if word.endswith(".toml"):
            assert (ROOT / word).is_file(), word
    # ... whose config validates as the subcommand would load it (no compute)
    if name == "meta-train":
        from outer_train.config import load_config

        load_config(ROOT / args.config, args.overrides)
    elif name == "compare":
        from outer_train.config.compare import load_compare_config

        load_compare_config(ROOT / args.config, args.overrides)
    elif name in ("surface", "dynamics", "variance"):
        from outer_train.config.diagnostics import load_diagnostic_config

        load_diagnostic_config(ROOT / args.config, args.overrides, name)
    assert sub.prog.endswith(name)
