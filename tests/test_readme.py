"""The README is run by tests: its first screen has the two commands, .ci/run runs the second
verbatim, and every `schedtune ...` command it shows parses with the real CLI."""
import re
import shlex

from tests.conftest import ROOT
from tuning.cli import build_parser

README = (ROOT / "README.md").read_text()
QUICKSTART = "pip install -e . && schedtune tune search_spaces/quickstart.yaml"
TESTS = 'pip install -e ".[test]" && pytest'
PLACEHOLDERS = {"FILE": str(ROOT / "search_spaces/quickstart.yaml"), "NAME": "x", "RUN_ID": "0123abcd",
                "DIR": "/tmp/x", "HEAD": "127.0.0.1", "ID": "schedtune-x-1"}


def _code_lines(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines, pending = [], ""
    for block in blocks:
        for raw in block.splitlines():
            line = pending + raw.split("  #")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            if line:
                lines.append(line)
    return lines


def test_first_screen_has_exactly_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:30])
    assert _code_lines(first_screen) == [QUICKSTART, TESTS]


def test_ci_runs_the_test_command_verbatim():
    assert TESTS in (ROOT / ".ci/run").read_text().splitlines()


def test_every_schedtune_command_in_the_readme_parses():
    commands = [c.split("&& ", 1)[-1] for c in _code_lines(README) if "schedtune " in c]
    commands = [c for c in commands if c.startswith("schedtune ")]
    assert len(commands) >= 15
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [PLACEHOLDERS.get(a, a) for a in argv]
        args = parser.parse_args(argv)
        assert args.command, command


def test_the_layout_doc_lists_every_module_and_nothing_else():
    layout = (ROOT / "docs/layout.md").read_text()
    listed = set(re.findall(r"^\| `((?:training|tuning)/[\w/]+\.py)` \|", layout, re.M))
    modules = {str(p.relative_to(ROOT)) for pkg in ("training", "tuning") for p in (ROOT / pkg).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    assert listed == modules, (sorted(modules - listed), sorted(listed - modules))
    assert "docs/layout.md" in README
