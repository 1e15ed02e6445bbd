"""`make lint` fails on an import cycle in src/core, naming its modules and imports (issue 19)."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "tools" / "check_core_cycles.py"


def check(tree, *args, cwd=None):
    return subprocess.run(
        ["python3", str(CHECK), str(tree), *args], cwd=cwd or tree, capture_output=True, text=True
    )


def core_with(tmp_path, files):
    core = tmp_path / "core"
    for name, text in files.items():
        (core / name).parent.mkdir(parents=True, exist_ok=True)
        (core / name).write_text(text)
    return core


def test_a_cycle_through_plain_grouped_and_inline_paths_fails_naming_it(tmp_path):
    core = core_with(tmp_path, {
        "mod.rs": "pub mod a;\npub mod b;\npub mod c;\npub mod leaf;\n",
        "a.rs": "use super::b::Thing;\nuse super::leaf::Leaf;\n",
        "b.rs": "use crate::core::{leaf, c::{Other, More}};\n",
        "c.rs": "fn f() -> u32 {\n    super::a::value()\n}\n",
        "leaf.rs": "pub struct Leaf;\n",
    })
    result = check(core)
    assert result.returncode == 1, result.stdout
    assert "import cycle in" in result.stderr
    assert "modules: a, b, c" in result.stderr
    assert "a -> b -> c -> a" in result.stderr
    assert "c -> a: " in result.stderr and "c.rs:2 value" in result.stderr
    assert "b -> c: " in result.stderr and "b.rs:1 Other, More" in result.stderr
    assert "leaf" not in result.stderr.split("modules:")[1].splitlines()[0]


def test_a_one_way_tree_passes(tmp_path):
    core = core_with(tmp_path, {
        "mod.rs": "pub mod a;\npub mod b;\n",
        "a.rs": "use super::b::{self, Thing as Other};\n",
        "b.rs": "pub struct Thing;\n",
    })
    result = check(core)
    assert result.returncode == 0, result.stderr
    assert "no import cycle in" in result.stdout and "(3 modules, 1 imports" in result.stdout


def test_test_code_comments_and_strings_do_not_count(tmp_path):
    core = core_with(tmp_path, {
        "a.rs": "use super::b::Thing;\n",
        "b.rs": (
            "// super::a::f is documented here\n"
            "/* use super::a::X; */\n"
            "const S: &str = \"super::a::g\";\n"
            "const R: &str = r#\"use crate::core::a;\"#;\n"
            "const C: char = '{';\n"
            "#[cfg(test)]\nmod tests {\n    use super::super::a::f;\n    fn t() { crate::core::a::g(); }\n}\n"
            "#[cfg(test)]\nuse crate::core::a::Y;\n"
        ),
    })
    result = check(core)
    assert result.returncode == 0, result.stderr


def test_every_circle_is_reported_and_fails(tmp_path):
    core = core_with(tmp_path, {
        "a.rs": "use super::b::X;\n",
        "b.rs": "use super::a::Y;\n",
        "c.rs": "use super::d::X;\n",
        "d.rs": "use super::c::Y;\n",
    })
    result = check(core)
    assert result.returncode == 1
    assert "modules: a, b" in result.stderr and "modules: c, d" in result.stderr
    assert "2 import cycle(s)" in result.stderr


def test_submodules_resolve_super_to_their_parent_directory(tmp_path):
    core = core_with(tmp_path, {
        "keys/mod.rs": "mod store;\nuse self::store::Store;\n",
        "keys/store.rs": "use super::Parent;\n",
        "other.rs": "use super::keys::store::Store;\n",
    })
    result = check(core)
    assert result.returncode == 1
    assert "modules: keys, keys::store" in result.stderr
    assert "other" not in result.stderr


def test_this_repositorys_core_has_no_import_cycle():
    result = subprocess.run(
        ["python3", str(CHECK), "src/core"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "no import cycle in src/core" in result.stdout
