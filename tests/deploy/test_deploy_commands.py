"""Offline checks of deploy/, the commands side: the image's command, every RayJob's entrypoint and
every `schedtune` command in deploy/README.md must be commands the `schedtune` CLI has, with the
flags they pass; the image is the pinned Ray image on the Python the project declares, not root.
What renders and validates is tests/deploy/test_deploy.py."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from tests.deploy.test_deploy import (DEPLOY, IMAGE_HOME, OVERLAYS, REPO, one, pinned_ray_version, rayjob_search_space, render,
                               tomllib)


# --- commands ------------------------------------------------------------------------------------

def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def cli_parser():
    from tuning.cli import build_parser   # written alongside; its contract is build_parser()

    return build_parser()


def subcommands(parser) -> set[str]:
    import argparse

    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert actions, "the schedtune parser has no subcommands"
    return set(actions[0].choices)


def parse_entrypoint(entrypoint: str):
    """(argv, argparse.Namespace) of a `schedtune ...` command line; fails on an unknown flag."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "schedtune" and argv[0] in console_scripts(), argv
    parser = cli_parser()
    assert argv[1] in subcommands(parser), f"{argv[1]!r} is not a schedtune subcommand"
    try:
        return argv, parser.parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"schedtune rejects the command line {entrypoint!r} (exit {e.code})")


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_rayjob_entrypoint_is_a_schedtune_command(overlay):
    """Every rendered RayJob runs `schedtune tune ... --address auto`: without --address, tune
    starts a private local Ray inside the head pod and the RayJob's cluster idles. (The jobs that
    `schedtune submit` sends pass it too.)"""
    from tuning.driver.submit import entrypoint

    assert cli_parser().parse_args(shlex.split(entrypoint("x.yaml", {}, None, None))[3:]).address == "auto"
    job = one(render(overlay), "RayJob")
    argv, args = parse_entrypoint(job["spec"]["entrypoint"])
    assert argv[1] == "tune"
    assert args.address == "auto", f"{overlay}: the RayJob runs `schedtune tune` without --address auto"
    assert args.tracking_uri == "http://mlflow:5000"
    assert args.storage == "/mnt/results"
    # KubeRay resubmits an HTTPMode RayJob to a head that lost its record (kuberay#4824), and the
    # RayJob's backoffLimit retries on a new cluster: both must continue the experiment's run on
    # the results volume, not start it again from trial 0.
    assert "--resume-if-present" in argv and args.resume_if_present is True, \
        f"{overlay}: the RayJob's entrypoint does not continue an interrupted run"
    assert ("--smoke" in argv) == (overlay == "cpu")
    in_repo = rayjob_search_space(job)
    assert in_repo.is_file(), f"the RayJob runs {argv[2]}, but {in_repo} does not exist"


def readme_schedtune_commands() -> list[str]:
    """`schedtune ...` command lines in deploy/README.md: in shell blocks and in inline code."""
    readme = (DEPLOY / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("schedtune "):
                commands.append(line.strip())
    commands += re.findall(r"`(schedtune [^`]+)`", readme)
    return commands


def test_readme_schedtune_commands_parse():
    commands = readme_schedtune_commands()
    assert any(" submit " in f" {c} " for c in commands), "deploy/README.md shows no submit"
    for command in commands:
        parse_entrypoint(command)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_image_command_is_a_schedtune_command():
    instructions = dockerfile_instructions()
    commands = [json.loads(arg) for op, arg in instructions if op in ("CMD", "ENTRYPOINT")]
    assert commands, "deploy/Dockerfile sets no CMD"
    argv = commands[-1]
    assert argv[0] in console_scripts(), f"{argv[0]!r} is not a console script of the package"
    if len(argv) > 1 and not argv[1].startswith("-"):
        assert argv[1] in subcommands(cli_parser())


def check_python_tag(tag: str) -> None:
    """The image's Python (rayproject/ray's `pyXY` tag part) is one the project declares
    (requires-python) and one the pinned Ray release supports (its wheel's classifiers)."""
    from importlib.metadata import metadata, version

    from packaging.specifiers import SpecifierSet

    m = re.fullmatch(r"py3(\d+)", tag)
    assert m, f"deploy/Dockerfile: PYTHON_TAG={tag!r}, expected py3XY"
    python = f"3.{m.group(1)}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python in SpecifierSet(requires), \
        f"deploy/Dockerfile builds on Python {python}, but pyproject.toml requires-python is {requires!r}"
    assert version("ray") == pinned_ray_version(), "the installed ray is not the pinned one"
    supported = {c.rsplit(" :: ", 1)[1] for c in metadata("ray").get_all("Classifier")
                 if c.startswith("Programming Language :: Python :: 3.")}
    assert python in supported, f"ray {version('ray')} supports Python {sorted(supported)}, not {python}"


def test_python_tag_check_fails_on_a_python_the_project_does_not_declare():
    check_python_tag("py311")
    for tag in ("py39", "py27", "3.11"):
        with pytest.raises(AssertionError):
            check_python_tag(tag)


def test_image_is_the_pinned_ray_image_and_not_root():
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for op, arg in instructions if op == "ARG" and "=" in arg)
    assert args["RAY_VERSION"] == pinned_ray_version()
    check_python_tag(args["PYTHON_TAG"])
    readme = (DEPLOY / "README.md").read_text()
    assert f"rayproject/ray:{args['RAY_VERSION']}-{args['PYTHON_TAG']}-<variant>" in readme
    (base,) = [arg for op, arg in instructions if op == "FROM"]
    assert base.startswith("rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${RAY_VARIANT}")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] in ("1000", "ray")
    workdirs = [arg for op, arg in instructions if op == "WORKDIR"]
    assert workdirs[-1] == IMAGE_HOME


# --- the image's Python packages -----------------------------------------------------------------

def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([a-z0-9][a-z0-9-]*)==([0-9][\w.]*)", line)
            assert m, f"deploy/constraints.txt: {line!r} is not a canonical name==version pin"
            assert m.group(1) not in pins, f"deploy/constraints.txt pins {m.group(1)} twice"
            pins[m.group(1)] = m.group(2)
    return pins


def test_image_build_installs_pinned_versions():
    """The Dockerfile installs with deploy/constraints.txt, which the build context includes, and
    pins every direct dependency at a version pyproject.toml allows: two builds of one commit get
    the same packages."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = constraint_pins()
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"deploy/constraints.txt does not pin {name}"
        assert dep.specifier.contains(pins[name], prereleases=True), \
            f"deploy/constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {dep}"
    runs = [arg for op, arg in dockerfile_instructions() if op == "RUN" and "pip install" in arg]
    installs = [part for arg in runs for part in arg.split("pip install")[1:]]
    assert installs and all("deploy/constraints.txt" in part for part in installs), \
        "a pip install in deploy/Dockerfile ignores deploy/constraints.txt"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "deploy" in ignore and ignore.index("!deploy/constraints.txt") > ignore.index("deploy"), \
        "deploy/constraints.txt must be in the build context (Dockerfile.dockerignore)"
