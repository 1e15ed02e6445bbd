"""`make lint` refuses a tracked build stamp or build output, naming the file (issue 12)."""
import subprocess
from pathlib import Path

CHECK = Path(__file__).resolve().parents[2] / "tools" / "check_tracked_outputs.py"

MAKEFILE = """\
.PHONY: build
.stamp:
\ttouch $@
build: .stamp
\tmkdir -p build && touch build/out.bin
"""


def repo_with(tmp_path, tracked):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "Makefile").write_text(MAKEFILE)
    for name in tracked:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    subprocess.run(["git", "add", "-f", "Makefile", *tracked], cwd=tmp_path, check=True)
    return subprocess.run(["python3", str(CHECK)], cwd=tmp_path, capture_output=True, text=True)


def test_tracked_makefile_stamp_fails_and_names_it(tmp_path):
    result = repo_with(tmp_path, [".stamp"])
    assert result.returncode == 1
    assert ".stamp: a Makefile target tracked by git" in result.stderr


def test_tracked_build_output_fails_and_names_it(tmp_path):
    result = repo_with(tmp_path, ["build/out.bin", "target/x/y.rlib"])
    assert result.returncode == 1
    assert "build/out.bin" in result.stderr and "target/x/y.rlib" in result.stderr


def test_clean_repo_passes(tmp_path):
    result = repo_with(tmp_path, [])
    assert result.returncode == 0, result.stderr
    assert "no tracked build output" in result.stdout


def test_this_repository_tracks_no_build_output():
    root = CHECK.parents[1]
    result = subprocess.run(["python3", str(CHECK)], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
