#!/usr/bin/env python3
"""Fails, naming the file, when git tracks something the build makes.

A tracked build output or stamp lands in every fresh clone, so make sees it as up to date and
skips the recipe that would have made it (a committed `.wasm-target` stamp once hid the missing
`rustup target add` from CI). Checked: every file the Makefile names as a rule target (read from
make's own database, so variables are expanded), and anything under build/, target/ or .venv/.
"""
import re
import subprocess
import sys

OUTPUT_DIRS = ("build/", "target/", ".venv/", ".tmp/")
SPECIAL_TARGET = re.compile(r"^\.[A-Z_]+$")  # .PHONY, .DEFAULT, ...


def makefile_targets():
    db = subprocess.run(["make", "-pRrq", "-f", "Makefile", ":"], capture_output=True, text=True).stdout
    targets, not_a_target, in_files = set(), False, False
    for line in db.splitlines():
        if line.startswith("# Files"):
            in_files = True
        elif line.startswith("# Finished Make data base"):
            in_files = False
        if not in_files:
            continue
        if line.startswith("# Not a target"):
            not_a_target = True
            continue
        if line and not line[0] in "#\t " and ":" in line and ":=" not in line:
            name = line.split(":", 1)[0]
            if not not_a_target and not SPECIAL_TARGET.match(name):
                targets.add(name)
            not_a_target = False
        elif not line:
            not_a_target = False
    return targets


def main():
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, text=True,
                             check=True).stdout.split("\0")
    tracked = {f for f in tracked if f}
    problems = []
    for target in sorted(makefile_targets() & tracked):
        problems.append(f"{target}: a Makefile target tracked by git (a fresh clone would skip "
                        f"its recipe); run `git rm --cached {target}` and ignore it")
    for f in sorted(tracked - makefile_targets()):
        if f.startswith(OUTPUT_DIRS):
            problems.append(f"{f}: build output tracked by git; run `git rm --cached {f}`")
    for p in problems:
        print(f"tracked-outputs: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"tracked-outputs: no tracked build output or Makefile target ({len(tracked)} files checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
