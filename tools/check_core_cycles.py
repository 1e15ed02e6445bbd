#!/usr/bin/env python3
"""Fails, naming the modules and the imports that tie them, when src/core has an import cycle.

The core is meant to read bottom-up: every module uses only modules below it (issue 19). This
reads the module references of each file under the root (`use super::…`, `use crate::core::…`,
`use self::…`, grouped `use super::{a, b::c}`, and `super::x::` / `crate::core::x::` paths in
code), builds the graph of files, and reports every strongly connected component, i.e. every
set of modules that reach each other. Test code (`#[cfg(test)]` items) may use anything and is
not read.

Usage: check_core_cycles.py [ROOT]   (ROOT defaults to src/core)
"""
import re
import sys
from pathlib import Path

DEFAULT_ROOT = "src/core"
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# A path in code that names a core module: `super::x::`, `crate::core::x::`, `self::x::`.
INLINE_PATH = re.compile(rf"(?<![\w:])((?:crate::core|super|self)(?:::{IDENT})+)")
USE_STMT = re.compile(r"(?<![\w:])use\s+([^;]*);", re.S)


def strip_comments_and_literals(text):
    """The code with comments removed and string/char literals emptied, lines kept in place."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif (m := re.match(r'b?r(#*)"', text[i:])) and (i == 0 or not text[i - 1].isalnum()):
            end = text.find('"' + m.group(1), i + m.end())
            end = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and (m := re.match(r"'(\\.[^']*|[^\\'])'", text[i:])):
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def without_test_items(code):
    """`code` without the items marked `#[cfg(test)]` (a `mod tests { … }`, a test-only `use`)."""
    out, pos = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < pos:
            continue
        out.append(code[pos : m.start()])
        j = m.end()
        # The item ends at its first `;` or at the `}` closing its first `{`.
        while j < len(code) and code[j] not in "{;":
            j += 1
        if j < len(code) and code[j] == "{":
            depth = 0
            while j < len(code):
                depth += {"{": 1, "}": -1}.get(code[j], 0)
                j += 1
                if depth == 0:
                    break
        else:
            j += 1
        out.append("\n" * code.count("\n", m.start(), j))
        pos = j
    out.append(code[pos:])
    return "".join(out)


def expand_use_tree(tree):
    """`a::{b, c::{d, e}}` → [['a','b'], ['a','c','d'], ['a','c','e']] (`self` in a group is its
    prefix; a glob or a rename keeps the path before it)."""
    tree = re.sub(rf"\s+as\s+{IDENT}", "", tree)  # `x as y` names x
    tree = re.sub(r"\s+", "", tree)

    def split_top(text):
        parts, depth, start = [], 0, 0
        for k, ch in enumerate(text):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                parts.append(text[start:k])
                start = k + 1
        parts.append(text[start:])
        return [p for p in parts if p]

    def expand(text, prefix):
        brace = text.find("{")
        if brace < 0:
            segments = [s for s in text.split("::") if s]
            segments = [s for s in segments if s != "*"]
            if segments and segments[-1] == "self":
                segments = segments[:-1]
            return [prefix + segments]
        head = [s for s in text[:brace].split("::") if s]
        inner = text[brace + 1 : text.rfind("}")]
        paths = []
        for part in split_top(inner):
            paths.extend(expand(part, prefix + head))
        return paths

    return expand(tree, [])


def module_of(path, root):
    """src/core/a.rs → ('a',); src/core/a/mod.rs → ('a',); src/core/a/b.rs → ('a', 'b')."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "mod":
        parts.pop()
    return tuple(parts)


def resolve(segments, here, modules):
    """The module (file) a path names, seen from module `here`; None when it is outside the tree."""
    if segments[:2] == ["crate", "core"]:
        absolute = segments[2:]
    elif segments and segments[0] in ("super", "self"):
        base, rest = list(here), list(segments)
        if rest[0] == "self":
            rest = rest[1:]
        while rest and rest[0] == "super":
            if not base:
                return None  # above the root: not a module of this tree
            base, rest = base[:-1], rest[1:]
        absolute = base + rest
    else:
        return None
    # The longest prefix that is a file of the tree (`super::x::Item` names x, `super::f` the
    # parent module itself).
    for k in range(len(absolute), -1, -1):
        if tuple(absolute[:k]) in modules:
            return tuple(absolute[:k])
    return None


def read_edges(root):
    files = sorted(p for p in Path(root).rglob("*.rs"))
    modules = {module_of(p, root): p for p in files}
    edges = {}  # (from, to) -> [(line, path text)]
    for path in files:
        here = module_of(path, root)
        code = without_test_items(strip_comments_and_literals(path.read_text()))
        references = []
        for m in USE_STMT.finditer(code):
            line = code.count("\n", 0, m.start()) + 1
            references.extend((line, seg) for seg in expand_use_tree(m.group(1)))
        code_outside_uses = USE_STMT.sub(lambda m: "\n" * m.group(0).count("\n"), code)
        for m in INLINE_PATH.finditer(code_outside_uses):
            line = code_outside_uses.count("\n", 0, m.start()) + 1
            references.append((line, m.group(1).split("::")))
        for line, segments in references:
            target = resolve(segments, here, modules)
            if target is None or target == here:
                continue
            edges.setdefault((here, target), []).append((line, "::".join(segments)))
    return modules, edges


def strongly_connected(nodes, edges):
    """Tarjan's algorithm: the sets of nodes that reach each other, of more than one node."""
    succ = {n: sorted({b for (a, b) in edges if a == n}) for n in nodes}
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return found


def one_cycle(component, edges):
    """A shortest walk from the component's first module back to itself, inside the component."""
    members = set(component)
    start = component[0]
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for (a, b) in sorted(edges):
                if a != v or b not in members:
                    continue
                if b == start:
                    return paths[v] + [start]
                if b not in paths:
                    paths[b] = paths[v] + [b]
                    nxt.append(b)
        frontier = nxt
    return component + [start]


def main(argv):
    args = list(argv)
    root = Path(args[0] if args else DEFAULT_ROOT)
    if not root.is_dir():
        print(f"check_core_cycles: {root} is not a directory", file=sys.stderr)
        return 2
    modules, edges = read_edges(root)
    name = lambda m: "::".join(m) or "mod"
    failed = 0
    components = strongly_connected(modules, edges)
    for component in components:
        failed += 1
        out = sys.stderr
        walk = " -> ".join(name(m) for m in one_cycle(component, edges))
        print(f"import cycle in {root}: {walk}", file=out)
        print(f"  modules: {', '.join(name(m) for m in component)}", file=out)
        for (a, b), refs in sorted(edges.items()):
            if a in component and b in component:
                by_line = {}
                for line, text in refs:
                    by_line.setdefault(line, []).append(text.rsplit("::", 1)[-1])
                where = "; ".join(f"{modules[a]}:{line} {', '.join(names)}" for line, names in sorted(by_line.items()))
                print(f"  {name(a)} -> {name(b)}: {where}", file=out)
    if failed:
        print(f"{failed} import cycle(s) in {root}: move what both sides need into a module "
              "below them (see issue 19)", file=sys.stderr)
        return 1
    print(f"no import cycle in {root} ({len(modules)} modules, {len(edges)} imports between them)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
