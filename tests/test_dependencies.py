"""Dependency floors and ceilings (docs/security/dependencies.md).

The floors in pyproject.toml exclude versions with known vulnerabilities, and
the installed distributions must satisfy every requirement: an environment
that resolved (or was left at) a vulnerable version fails here, not in
production. Upper bounds keep the next major version of what shapes the wire
format out until it has been tried.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECTS = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]


def project_name(project: Path) -> str:
    return "nomoat" if project.parent == ROOT else project.parent.name


# name: (the last vulnerable version, the first fixed one, the advisories).
# The floor in pyproject.toml must exclude the first, and what is installed
# must be at least the second.
FLOORS: dict[str, tuple[str, str, str]] = {
    "jinja2": ("3.1.5", "3.1.6", "CVE-2024-56201, CVE-2024-56326, CVE-2025-27516"),
    "aiohttp": ("3.14.2", "3.14.3", "CVE-2026-69244, CVE-2026-69243, CVE-2026-59881, ..."),
    "uvicorn": ("0.32.0", "0.32.1", "httptools >= 0.6.3 for CVE-2024-27982"),
    "litestar": ("2.19.0", "2.20.0", "CVE-2024-52581, CVE-2025-59152, CVE-2026-25480"),
    "pydantic": ("2.3.0", "2.4.0", "CVE-2024-3772"),
    "numpy": ("1.22.1", "1.22.2", "CVE-2021-41495, CVE-2021-41496, CVE-2021-33430"),
    "llama-cpp-python": ("0.2.71", "0.2.72", "CVE-2024-34359"),
}
# Installed through another requirement (uvicorn[standard]); nomoat's server
# parses every request with it (gateway/cli.py: http="httptools").
TRANSITIVE_FLOORS: dict[str, tuple[str, str]] = {
    "httptools": ("0.6.3", "CVE-2024-27982"),
}
# The next major version, which may change what reaches clients or upstreams.
CEILINGS = {
    "msgspec": "1.0",
    "pydantic": "3.0",
    "litestar": "3.0",
    "aiohttp": "4.0",
    "jinja2": "4.0",
    "openai": "4.0",
}


def requirements(project: Path, *extras: str) -> list[Requirement]:
    data = tomllib.loads(project.read_text())["project"]
    lines = list(data.get("dependencies", []))
    for extra in extras:
        lines += data.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(line) for line in lines]


def by_name(project: Path, *extras: str) -> dict[str, Requirement]:
    return {canonicalize_name(req.name): req for req in requirements(project, *extras)}


def installed(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


@pytest.mark.parametrize("project", PROJECTS, ids=project_name)
def test_installed_distributions_satisfy_every_requirement(project: Path) -> None:
    for requirement in requirements(project, "test"):
        name = canonicalize_name(requirement.name)
        if name.startswith("nomoat"):
            continue  # the projects themselves, installed editable
        version = installed(name)
        assert version is not None, f"{requirement} is not installed"
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name} {version} is installed; {project_name(project)} requires {requirement}"
        )


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_floors_exclude_known_vulnerable_versions(name: str) -> None:
    vulnerable, fixed, advisories = FLOORS[name]
    requirement = by_name(ROOT / "pyproject.toml")[name]
    assert not requirement.specifier.contains(vulnerable, prereleases=True), (
        f"{requirement} admits {name} {vulnerable} ({advisories})"
    )
    version = installed(name)
    assert version is not None and version >= Version(fixed), (
        f"{name} {version} is installed: {fixed} fixes {advisories}"
    )


@pytest.mark.parametrize("name", sorted(TRANSITIVE_FLOORS))
def test_transitive_parsers_are_past_their_advisories(name: str) -> None:
    fixed, advisories = TRANSITIVE_FLOORS[name]
    version = installed(name)
    assert version is not None and version >= Version(fixed), (
        f"{name} {version} is installed: {fixed} fixes {advisories}"
    )


@pytest.mark.parametrize("name", sorted(CEILINGS))
def test_the_next_major_version_is_excluded(name: str) -> None:
    for project in PROJECTS:
        requirement = by_name(project, "test", "bench").get(name)
        if requirement is not None:
            assert not requirement.specifier.contains(CEILINGS[name], prereleases=True), (
                f"{project_name(project)}: {requirement} admits {name} {CEILINGS[name]}"
            )
