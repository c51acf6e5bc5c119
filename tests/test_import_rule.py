"""The core never imports plugins/: ruff's banned-api rule (TID251, configured
in pyproject.toml for gateway/ only) is what `make lint` checks it with. These
tests run ruff, with the project's own configuration, on a copy holding files
that break the rule, and check the list of plugin packages is complete. Fast."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = [
    "import nomoat_cache",
    "import nomoat_classifier.rules as rules",
    "from nomoat_redact import manifest",
    "from nomoat_template.sub import thing",
    "import plugins",
    "from plugins import anything",
]


def banned() -> set[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        ruff = tomllib.load(file)["tool"]["ruff"]["lint"]
    return set(ruff["flake8-tidy-imports"]["banned-api"])


def plugin_packages() -> set[str]:
    """The import packages of every plugin in plugins/, as their builds declare them."""
    packages: set[str] = set()
    for project in ROOT.glob("plugins/*/pyproject.toml"):
        with project.open("rb") as file:
            packages.update(tomllib.load(file)["tool"]["setuptools"]["packages"])
        packages.update(p.parent.name for p in project.parent.glob("nomoat_*/__init__.py"))
    return packages


def ruff_findings(tree: Path) -> list[tuple[str, str]]:
    """(file relative to ``tree``, rule code) for everything ruff reports there."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "json", "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return [
        (Path(item["filename"]).relative_to(tree).as_posix(), item["code"])
        for item in json.loads(done.stdout)
    ]


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A project with nomoat's ruff configuration and nothing else."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "gateway").mkdir()
    (tmp_path / "tests").mkdir()
    return tmp_path


def test_every_plugin_package_is_banned() -> None:
    packages = plugin_packages()
    assert {"nomoat_cache", "nomoat_classifier", "nomoat_redact", "nomoat_template"} <= packages
    assert packages | {"plugins"} <= banned()


@pytest.mark.parametrize("statement", FORBIDDEN)
def test_the_core_importing_a_plugin_fails_lint(copy: Path, statement: str) -> None:
    (copy / "gateway" / "core.py").write_text(f"{statement}\n\n__all__ = ['x']\n")
    assert ("gateway/core.py", "TID251") in ruff_findings(copy)


def test_tests_and_plugins_may_import_plugins(copy: Path) -> None:
    body = "\n".join(FORBIDDEN) + "\n"
    (copy / "tests" / "test_x.py").write_text(body)
    (copy / "plugins" / "nomoat-x" / "nomoat_x").mkdir(parents=True)
    (copy / "plugins" / "nomoat-x" / "nomoat_x" / "__init__.py").write_text(body)
    (copy / "gateway" / "core.py").write_text("import json\n\n__all__ = ['json']\n")
    findings = ruff_findings(copy)
    assert [code for _, code in findings if code == "TID251"] == []


def test_the_real_core_imports_no_plugin() -> None:
    findings = ruff_findings(ROOT)
    assert [f for f in findings if f[1] == "TID251"] == []
