"""docker/*.Dockerfile install what the Makefile installs (same torch pin, the package, the generated gRPC code),
copy every package root setup.py maps, and run as the uid the chart expects. No Docker engine runs here, so
the images are parsed, not built (docs/operations.md)."""
from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"cpu": REPO / "docker" / "cpu.Dockerfile", "worker": REPO / "docker" / "worker.Dockerfile"}
MAKEFILE = (REPO / "Makefile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return out


def run_commands(path: Path) -> list[str]:
    """The shell commands of every RUN, split on &&, in order."""
    return [cmd.strip() for kw, rest in instructions(path) if kw == "RUN" for cmd in rest.split("&&")]


def arg_default(path: Path, name: str) -> str:
    for kw, rest in instructions(path):
        if kw == "ARG" and rest.partition("=")[0] == name:
            return rest.partition("=")[2]
    raise AssertionError(f"{path.name}: no ARG {name}")


def makefile_torch() -> str:
    return re.search(r"pip install -q torch==([0-9][\w.]*)", MAKEFILE).group(1)


@pytest.mark.parametrize("image", DOCKERFILES)
def test_torch_is_the_pin_of_the_makefile_and_pyproject(image):
    path = DOCKERFILES[image]
    assert arg_default(path, "TORCH_VERSION") == makefile_torch()
    assert f"torch=={makefile_torch()}" in PYPROJECT["project"]["dependencies"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_install_steps_follow_the_makefile(image):
    """torch first (by exact version), the package, then the generated code: `make install`'s order."""
    commands = run_commands(DOCKERFILES[image])
    proto_recipe = re.search(r"^\$\(PROTO_STAMP\):.*\n\t\$\(BIN\)/(python -m [\w.]+)", MAKEFILE, re.M).group(1)
    steps = [
        next(i for i, c in enumerate(commands) if re.search(r"pip install .*\"torch==\$\{TORCH_VERSION\}\"", c)),
        commands.index("pip install -e ."),
        commands.index(proto_recipe),
    ]
    assert steps == sorted(steps), commands
    assert "pip install -q -e '.[test]'" in MAKEFILE, "the Makefile's install changed: follow it here"


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_package_root_and_the_build_inputs_are_copied(image):
    copied = set()
    for kw, rest in instructions(DOCKERFILES[image]):
        if kw == "COPY":
            *sources, dest = rest.split()
            # Into the build's source tree as they are in the repository: protogen writes beside them.
            copied |= {src for src in sources if dest in (src, "./")}
    tree = ast.parse((REPO / "setup.py").read_text())
    roots = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", "") == "ROOTS")
    needed = set(roots.values()) | {"protos", "pyproject.toml", "setup.py", PYPROJECT["project"]["readme"]}
    assert needed <= copied, needed - copied


@pytest.mark.parametrize("image", DOCKERFILES)
def test_python_and_the_offline_switches_match_the_project(image):
    path = DOCKERFILES[image]
    text = path.read_text()
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert ("python:3.11" in arg_default(path, "PYTHON_IMAGE")) if image == "cpu" else ("python3.11 " in text)
    env = " ".join(rest for kw, rest in instructions(path) if kw == "ENV")
    for name, value in re.findall(r"^export (HF_\w+|TRANSFORMERS_\w+) := (\S+)", MAKEFILE, re.M):
        assert f"{name}={value}" in env


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_runs_as_the_chart_uid_and_its_default_command_exists(image):
    path = DOCKERFILES[image]
    values = yaml.safe_load((REPO / "charts" / "instgenie" / "values.yaml").read_text())
    users = [rest for kw, rest in instructions(path) if kw == "USER"]
    assert users == [str(values["podSecurityContext"]["runAsUser"])]
    assert f"--uid {users[0]}" in path.read_text()
    cmd = next(rest for kw, rest in instructions(path) if kw == "CMD")
    module = re.fullmatch(r'\["python", "-m", "([\w.]+)"\]', cmd).group(1)
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_build_context_leaves_local_state_out(image):
    ignore = (DOCKERFILES[image].parent / f"{DOCKERFILES[image].name}.dockerignore").read_text().split()
    assert {".venv", ".tools", "var", "**/__pycache__", "instgenie/gateway"} <= set(ignore)


def test_the_parser_reads_continued_lines():
    commands = run_commands(DOCKERFILES["cpu"])
    assert commands[0] == "python -m venv /opt/venv" and "useradd" in commands[-1]
