"""Layering of the whole tree: what each layer may import.

    core     slimsd/*.py, slimsd/data   imports nothing of compress/export/serve/loadtest
    export   export/                    does not import serve or compress
    serve    serve/                     does not import compress (the training stack)

``slimsd/cli.py`` is the command-line front over every layer and builds each command's
imports only when that command runs, so it is no layer's member: a layer that imported it
would reach everything, and the walk below would say so.

Static, over every ``import`` (module level and inside functions) of each layer's modules and
of the slimsd modules they reach, transitively: cheaper than a subprocess, and it also covers
code paths a run would not take (tensorrt, triton).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import slimsd

ROOT = Path(slimsd.__file__).parent.parent
DIRS = {"slimsd.serve": ROOT / "serve", "slimsd.export": ROOT / "export", "slimsd.compress": ROOT / "compress",
        "slimsd.loadtest": ROOT / "loadtest", "slimsd": ROOT / "slimsd"}
UPPER = ("slimsd.compress", "slimsd.export", "slimsd.serve", "slimsd.loadtest")


def _path_of(module: str) -> Path | None:
    for prefix in sorted(DIRS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix):].lstrip(".").replace(".", "/")
            base = DIRS[prefix] / rest if rest else DIRS[prefix]
            for p in (base.with_suffix(".py"), base / "__init__.py"):
                if p.is_file():
                    return p
    return None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "slimsd" or m.startswith("slimsd.")}


def _modules(package: str, folder: Path) -> list[str]:
    out = []
    for p in sorted(folder.rglob("*.py")):
        rel = p.relative_to(folder).with_suffix("")
        parts = [x for x in rel.parts if x != "__init__"]
        out.append(".".join([package, *parts]))
    return out


def _violations(start: list[str], forbidden: tuple[str, ...]) -> list[str]:
    """Import chains from ``start`` that reach a module under a ``forbidden`` prefix."""
    seen, todo, chain, bad = set(), list(start), {m: [m] for m in start}, []
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        if any(module == f or module.startswith(f + ".") for f in forbidden):
            bad.append(" -> ".join(chain[module]))
            continue
        path = _path_of(module)
        if path is None:
            continue  # a name imported from a module, not a module
        for m in _imports(module, path):
            if m not in seen:
                chain.setdefault(m, chain[module] + [m])
                todo.append(m)
    return bad


def _core_modules() -> list[str]:
    mods = [m for m in _modules("slimsd", DIRS["slimsd"]) if m != "slimsd.cli"]
    assert "slimsd.denoise" in mods and "slimsd.data.scenes" in mods
    return mods


LAYERS = {
    "core": (_core_modules, UPPER),
    "export": (lambda: _modules("slimsd.export", DIRS["slimsd.export"]), ("slimsd.serve", "slimsd.compress")),
    "serve": (lambda: _modules("slimsd.serve", DIRS["slimsd.serve"]), ("slimsd.compress",)),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layer_imports_nothing_above_it(layer):
    start, forbidden = LAYERS[layer]
    assert _violations(start(), forbidden) == []


def test_the_walk_finds_a_violation(tmp_path, monkeypatch):
    """A core module that imported slimsd.compress would be reported with its chain."""
    fake = tmp_path / "slimsd"
    fake.mkdir()
    (fake / "a.py").write_text("def f():\n    from slimsd.b import g\n")
    (fake / "b.py").write_text("import slimsd.compress.train\n")
    monkeypatch.setitem(DIRS, "slimsd", fake)
    assert _violations(["slimsd.a"], UPPER) == ["slimsd.a -> slimsd.b -> slimsd.compress.train"]


def test_cli_commands_are_not_a_backdoor():
    """serve reaching slimsd.cli would reach compress through it: the walk follows it."""
    assert _violations(["slimsd.cli"], ("slimsd.compress",)) != []
