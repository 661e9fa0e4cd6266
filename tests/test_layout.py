"""The package's layout keeps its promises: no import cycles, each layer imports only the layers below it, and
the code that takes a Restorer never asks which kind it holds."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "seedvr"

# What each part may import at run time (besides itself, the standard library and third-party packages).
# serving knows requests and RunPod; io knows bytes and media; engine knows frames and models; none of them
# reaches up. tools are entry points: nothing imports them, except serving's use of the weights download.
ALLOWED = {
    "errors": set(),
    "settings": set(),
    "models": {"errors"},
    "distributed": {"models", "errors"},
    "engine": {"models", "distributed", "errors", "settings"},
    "spgroup": {"engine", "models", "distributed", "errors", "settings"},
    "io": {"errors", "settings"},
    "serving": {"engine", "io", "models", "spgroup", "errors", "settings", "tools.weights"},
    "tools": {"engine", "io", "models", "serving", "spgroup", "distributed", "errors", "settings", "tools"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """seedvr modules imported when `path` runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and isinstance(branch.test, ast.Name) and branch.test.id == "TYPE_CHECKING"
               for node in ast.walk(branch)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("seedvr")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seedvr"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                submodule = PACKAGE.parent / Path(*candidate.split("."))
                found.add(candidate if submodule.with_suffix(".py").is_file() or submodule.is_dir() else node.module)
    return found


GRAPH = {module_name(path): runtime_imports(path) for path in PACKAGE.rglob("*.py")}


def part(module: str) -> str:
    """seedvr.engine.loader -> engine; seedvr.tools.weights -> tools.weights when asked for exactly."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        if state.get(module) == "open":
            cycle = trail[trail.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        state[module] = "open"
        for imported in GRAPH.get(module, ()):
            visit(imported, trail + [module])
        state[module] = "done"

    assert len(GRAPH) > 50  # the scan found the package
    for module in GRAPH:
        visit(module, [])


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_is_below_it(layer):
    wrong = []
    for module, imports in GRAPH.items():
        if part(module) != layer:
            continue
        for imported in imports:
            target = part(imported)
            shim = imported.count(".") == 1 and target in ("tiny", "weights", "parity")  # the python -m shims
            if target == layer or shim or target in ALLOWED[layer] or \
                    any(imported.startswith(f"seedvr.{allowed}") for allowed in ALLOWED[layer]):
                continue
            wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


@pytest.mark.parametrize("path", ["engine/chunking.py", "engine/memory_plan.py", "serving/model_holder.py",
                                  "serving/jobs.py"])
def test_restorer_users_never_probe_its_kind(path):
    source = (PACKAGE / path).read_text()
    for probe in ("getattr(", "hasattr(", "isinstance(", "SequenceParallelGroup)", "SeedVR2)"):
        assert probe not in source, f"{path} uses {probe}: type against seedvr.engine.restorer.Restorer instead"


def test_every_module_stays_readable():
    long = {module_name(path): lines for path in PACKAGE.rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > 600}
    assert not long, long
