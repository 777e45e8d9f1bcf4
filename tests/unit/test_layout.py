"""The package's structure is its architecture: each part imports only parts below it, and
nothing imports in a circle. The layers, bottom up, are the README's Layout section."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "extproc"

# Bottom up; a module may import its own part and any part of a lower layer.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"api", "config", "variants", "lifecycle", "ids"}),  # the shared vocabulary
    frozenset({"accounting", "limiter"}),       # pure domain logic (+ the limiter's stores)
    frozenset({"proxy"}),                       # the ext_proc edge and per-request sessions
    frozenset({"telemetry"}),                   # metrics, the usage record, logs, admin HTTP
    frozenset({"routing"}),                     # Envoy configuration and weights
    frozenset({"canary"}),                      # canary analysis and the rollout that moves weights
    frozenset({"server"}),                      # wires one ext_proc process together
    frozenset({"dashboard"}),                   # history, JSON API, live updates, usage report
    frozenset({"local"}),                       # the local stack of processes
    frozenset({"cli", "__main__"}),             # the command line
)
# The emulator stands in for Z.AI: it shares nothing with the gateway.
ISOLATED = frozenset({"emulator"})


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """Modules of the package imported anywhere in the file (function bodies included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "extproc"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "extproc":
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    known = modules()
    return {m for m in found if m in known and m != name}


def layer(part: str) -> int:
    for index, parts in enumerate(LAYERS):
        if part in parts:
            return index
    raise AssertionError(f"extproc/{part} belongs to no layer: add it to LAYERS and the README")


def test_every_part_has_a_layer_and_imports_only_downwards() -> None:
    wrong = []
    for name, path in modules().items():
        part = part_of(name)
        if part == "__init__":
            continue
        for target in imports_of(name, path):
            other = part_of(target)
            if other == "__init__" or other == part:
                continue
            if part in ISOLATED or other in ISOLATED:
                # The command line and the local stack may start the emulator; it uses nothing.
                if part in ISOLATED or part not in ("cli", "local"):
                    wrong.append(f"{name} -> {target}")
                continue
            if layer(other) > layer(part):
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    graph = {name: imports_of(name, path) for name, path in modules().items()}
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        if node in visiting:
            cycle = visiting[visiting.index(node):] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        visiting.append(node)
        for target in sorted(graph.get(node, ())):
            # A package's __init__ re-exporting its own modules is not a cycle through them.
            if not target.startswith(node + "."):
                visit(target)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_readme_layout_names_every_part() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout"):]
    section = section[:section.find("\n## ", 4)] if "\n## " in section[4:] else section
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    missing = sorted(p for p in parts if f"extproc/{p}" not in section)
    assert not missing, f"README's Layout section does not mention: {missing}"
