"""Every command shown in README.md and docs/*.md runs here, so no example can rot.

- A `console` block is a session: each `$ ` command (a trailing `\\` continues it) runs in bash
  in a scratch directory that links the repository's envoy/, build/, docs/ and tests/, with the
  `keygate` CLI and `envoy` on PATH. Its output (stdout and stderr) must contain every expected
  line shown under it, where `...` stands for text that varies or was left out; a command shown
  without output must succeed.
- A `sh` block lists commands to copy: `make ...` is run as `make -n ...` (the target exists and
  its recipe expands; `make test` runs the real targets, the long ones have their own), `envoy
  ...` with `--mode validate` added (serving is what the console blocks exercise), anything else
  as it is. Each must succeed.
- `<!-- docs-test: envoy/NAME.yaml -->` just before a block starts that shipped config with its
  upstreams for the block; `localhost:10000` and `localhost:9901` in the commands then reach it.
- `yaml` blocks must parse, and a Docker Compose one must pass `docker-compose config` (`json`
  blocks are fragments of a config, `text` blocks show replies: neither is run).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from keygate_stack import ENVOY_BIN, ROOT, Stack

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")
ANNOTATION = re.compile(r"<!--\s*docs-test:\s*(\S+)\s*-->")
LINKED = ("envoy", "build", "docs", "tests")


class Block:
    def __init__(self, page, line, lang, lines, envoy_config):
        self.page, self.line, self.lang, self.lines, self.envoy_config = page, line, lang, lines, envoy_config

    @property
    def id(self):
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks():
    found = []
    for page in DOCS:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            opening = FENCE.match(lines[i])
            if not opening or not opening.group(1):
                i += 1
                continue
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            i += 1
            before = next((l for l in reversed(lines[:start]) if l.strip()), "")
            annotated = ANNOTATION.search(before)
            found.append(Block(page, start + 1, opening.group(1), body,
                               annotated.group(1) if annotated else None))
    return found


ALL = blocks()
COMMAND_BLOCKS = [b for b in ALL if b.lang in ("console", "sh")]


def session(lines):
    """A console block as [(command, [expected output lines])]."""
    steps = []
    lines = iter(lines)
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + " " + next(lines).strip()
            steps.append((command, []))
        elif steps:
            steps[-1][1].append(line)
        else:
            raise AssertionError(f"console output before any command: {line!r}")
    return steps


def matches(expected, output):
    """Each fragment of `expected` between `...` appears, in order, in one line of `output`."""
    fragments = [f.strip() for f in expected.split("...") if f.strip()]
    if not fragments:
        return True
    for line in output.splitlines():
        at = 0
        for fragment in fragments:
            at = line.find(fragment, at)
            if at < 0:
                break
            at += len(fragment)
        else:
            return True
    return False


def environment(stack):
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(ROOT / "target" / "release"), str(Path(ENVOY_BIN).parent),
                                   env.get("PATH", "")])
    return env


def aimed(command, stack):
    if stack is None:
        return command
    return (command.replace("localhost:10000", f"localhost:{stack.port}")
            .replace("localhost:9901", f"localhost:{stack.ports['admin']}"))


def run(command, cwd, env):
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    return done.returncode, done.stdout


def checked_form(command):
    """How a `sh` block's command runs here: see the module docstring."""
    command = re.sub(r"(^|&&\s*|;\s*)((?:[A-Z_]+=\S+\s+)*)make\b", r"\1\2make -n", command)
    if re.match(r"^envoy\s", command):
        command += " --mode validate"
    return command


def sh_commands(lines):
    commands, pending = [], ""
    for line in lines:
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
            continue
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


@pytest.fixture
def block_stack(request):
    block = request.param
    if block.envoy_config is None:
        yield None
        return
    name = block.envoy_config.removeprefix("envoy/")
    with Stack(name) as stack:
        yield stack


def test_docs_pages_have_commands_to_check():
    pages = {b.page for b in COMMAND_BLOCKS}
    assert ROOT / "README.md" in pages
    assert len(pages) >= 6, sorted(str(p) for p in pages)


@pytest.mark.parametrize("block_stack,block", [(b, b) for b in COMMAND_BLOCKS],
                         ids=[b.id for b in COMMAND_BLOCKS], indirect=["block_stack"])
def test_every_command_in_the_docs_runs_as_shown(block_stack, block, tmp_path):
    if block_stack is None:
        assert not any(port in line for line in block.lines for port in ("localhost:10000", "localhost:9901")), \
            f"{block.id}: a block that talks to Envoy needs <!-- docs-test: envoy/NAME.yaml --> before it"
    env = environment(block_stack)
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name)
    if block.lang == "console":
        steps = session(block.lines)
        assert steps, f"{block.id}: a console block without a command"
        for command, expected in steps:
            status, output = run(aimed(command, block_stack), tmp_path, env)
            shown = [line for line in expected if line.strip()]
            if not shown:
                assert status == 0, f"{block.id}: `{command}` failed ({status}):\n{output}"
            for line in shown:
                assert matches(line, output), (f"{block.id}: `{command}` did not print\n  {line}\n"
                                               f"it printed:\n{output}")
    else:
        commands = sh_commands(block.lines)
        assert commands, f"{block.id}: an sh block without a command"
        for command in commands:
            status, output = run(aimed(checked_form(command), block_stack), ROOT, env)
            assert status == 0, f"{block.id}: `{checked_form(command)}` failed ({status}):\n{output[-3000:]}"


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "yaml"], ids=lambda b: b.id)
def test_every_yaml_example_parses(block, tmp_path):
    text = "\n".join(block.lines)
    parsed = yaml.safe_load(text)
    assert parsed is not None
    if isinstance(parsed, dict) and "services" in parsed:
        # A compose example must be one Docker Compose accepts (make deps installs docker-compose).
        assert shutil.which("docker-compose"), "docker-compose is needed (make compose-tools)"
        (tmp_path / "compose.yaml").write_text(text)
        done = subprocess.run(["docker-compose", "-f", str(tmp_path / "compose.yaml"), "config", "-q"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{block.id}: {done.stderr}"


def test_matching_treats_dots_as_anything_within_one_line():
    output = '{"upstream": "echo", "headers": [["x-keygate-key-id", "cmp_demo"], ["x", "y"]]}'
    assert matches('{... ["x-keygate-key-id", "cmp_demo"] ...}', output)
    assert not matches('{... ["x-keygate-key-id", "other"] ...}', output)
    assert not matches('["x", "y"] ... ["x-keygate-key-id", "cmp_demo"]', output)
    assert checked_form("KEYGATE_CONFIG=abaco.yaml make compose-up") == \
        "KEYGATE_CONFIG=abaco.yaml make -n compose-up"
    assert checked_form("make build && make compose-up") == "make -n build && make -n compose-up"
