"""engine/ is layered: a module imports only from its own tier or from tiers below it, so the
arrows of the architecture point one way (the front down to the kernels), and no two modules
import each other. Read from the source (ast), imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = REPO_ROOT / "engine"

# Top first. An entry names a module, or a package and everything in it; the package
# `engine` itself (engine/__init__.py) stands only for itself.
TIERS: list[tuple[str, list[str]]] = [
    # The front (tokenising, futures) and its link to the core, in a thread or rank processes.
    ("front", ["engine", "engine.engine", "engine.tokenization", "engine.core_link",
               "engine.core_process"]),
    # The generation backends: native (scheduler + model runner), transformers, echo.
    ("backends", ["engine.backends"]),
    # The core loop and the contract it drives a backend through; scheduling and the KV
    # cache's bookkeeping.
    ("core", ["engine.core"]),
    # One rank's model execution: runner, CUDA graphs, loader, sampler.
    ("executor", ["engine.executor"]),
    ("models", ["engine.models"]),
    ("layers", ["engine.layers"]),
    ("kernels", ["engine.kernels"]),
    # What every tier may use: settings, request types, checkpoint and device helpers, the
    # process-group wrapper.
    (
        "base",
        [
            "engine.config",
            "engine.request",
            "engine.checkpoint",
            "engine.devices",
            "engine.distributed",
            "engine.random_checkpoint",
        ],
    ),
]
RANK = {name: rank for rank, (name, _) in enumerate(TIERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ENGINE.rglob("*.py"))}


def tier_of(module: str) -> str | None:
    best: tuple[int, str] | None = None
    for name, entries in TIERS:
        for entry in entries:
            exact = module == entry
            inside = entry != "engine" and module.startswith(entry + ".")
            if (exact or inside) and (best is None or len(entry) > best[0]):
                best = (len(entry), name)
    return None if best is None else best[1]


def imported_modules(module: str) -> set[str]:
    """The engine modules `module` imports (a `from package import name` counts as the
    submodule where `name` is one, else as the package)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importer's package upwards
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in MODULES else source)
    return {m for m in found if m == "engine" or m.startswith("engine.")}


def test_every_module_has_a_tier() -> None:
    assert "engine.core.scheduler" in MODULES and "engine.kernels.attention" in MODULES
    unplaced = sorted(m for m in MODULES if tier_of(m) is None)
    assert not unplaced, f"give these modules a tier in TIERS: {unplaced}"


def upward(module: str, imports: set[str]) -> list[str]:
    """The imports of `module` that reach a tier above its own."""
    tier = tier_of(module)
    assert tier is not None, f"{module} has no tier"
    found = []
    for target in sorted(imports):
        target_tier = tier_of(target)
        assert target_tier is not None, f"{module} imports {target}, which has no tier"
        if RANK[target_tier] < RANK[tier]:
            found.append(f"{module} ({tier}) imports {target} ({target_tier})")
    return found


def test_imports_point_down() -> None:
    found = [line for m in MODULES for line in upward(m, imported_modules(m))]
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_no_import_cycles() -> None:
    graph = {m: imported_modules(m) - {m} for m in MODULES}
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph.get(module, ())):
            # A package's __init__ importing its own submodules is not a cycle by itself.
            visit(target)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_the_check_sees_what_it_must() -> None:
    # Imports inside functions count (the layers import their kernels on first use).
    assert "engine.kernels.gemv" in imported_modules("engine.layers.linear")
    assert not upward("engine.layers.linear", {"engine.kernels.gemv", "engine.distributed"})
    # A kernel reaching for a layer's types, or the runner for the scheduler's, is refused.
    assert upward("engine.kernels.attention", {"engine.layers.attention"})
    assert upward("engine.executor.runner", {"engine.core.scheduler"})
    assert upward("engine.core.engine_core", {"engine.backends.native"})


def test_scheduler_imports_no_torch() -> None:
    """The scheduler and everything it imports (its packages' __init__ included) stay pure
    Python; tests/engine/test_scheduler.py checks the same at run time."""
    seen: set[str] = set()
    todo = ["engine.core.scheduler"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imported_modules(module))
    heavy = []
    for module in sorted(seen):
        tree = ast.parse(MODULES[module].read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            heavy += [f"{module}: {n}" for n in names if n.split(".")[0] in ("torch", "triton")]
    assert "engine.core.kv_cache" in seen and "engine.core.backend" in seen
    assert not heavy, f"the scheduler reaches torch: {heavy}"
