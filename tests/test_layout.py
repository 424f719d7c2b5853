"""The architecture as the imports show it: arrows point one way, from the experiments down to
the math core, and no library module grows past about 500 lines."""

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "jaxdiff_info"

CORE = {"schedule", "mixture", "decisions", "curves", "static"}
# what each room may import from the library (besides its own package's modules)
ALLOWED = {
    # the math core, bottom first
    "static": set(),  # values as static arguments of compiled functions, compared by value
    "schedule": set(),
    "decisions": set(),
    "mixture": {"schedule", "static"},
    "curves": {"decisions"},
    # the tracker and the estimators on it
    "tracking": {"schedule", "static"},
    "distributed": set(),  # several processes: start, gather to the host, who writes
    "stderr_filter": set(),  # run by distributed as a script of its own: imports nothing of the library
    "estimators": CORE | {"tracking", "distributed"},
    "immse": CORE | {"tracking", "estimators", "distributed"},
    # the research API on those, the image analysis on the API
    "api": CORE | {"tracking", "estimators", "immse"},
    "analysis": CORE | {"tracking", "api", "results", "distributed"},
    # exact reference models of a dataset: mixtures
    "references": {"mixture"},
    # guidance driven by the tracked posterior (DNG), and its metrics against a mixture's exact target
    "guidance": {"schedule", "tracking"},
    "removal": {"mixture"},
    "guidance_plots": {"mixture", "removal", "curves", "plots"},
    # models, data and training: rooms of their own beside the analysis
    "layers": set(),  # flax layers with a faster backward pass on XLA:CPU
    "unet": {"schedule", "layers"},
    "data": set(),
    "training": {"schedule", "tracking", "unet", "data", "plots", "results", "distributed"},
    # the output edge
    "plots": {"curves", "decisions"},
    "results": {"curves", "decisions"},
}


def room(path: Path) -> str:
    parts = path.relative_to(LIB).with_suffix("").parts
    return parts[0]


def library_imports(path: Path) -> set[str]:
    """The rooms of jaxdiff_info that a module imports (at any depth: lazy imports count)."""
    found = set()
    package = ["jaxdiff_info", *path.relative_to(LIB).parent.parts]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: from the module's own package
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("experiments"):
                found.add("experiments")
            parts = name.split(".")
            if parts[0] == "jaxdiff_info" and len(parts) > 1:
                found.add(parts[1])
    return found


MODULES = sorted(p for p in LIB.rglob("*.py") if p != LIB / "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(LIB)))
def test_imports_point_down(path):
    own = room(path)
    assert own in ALLOWED, f"{own}: a new room; add it to the layout (README and this test)"
    imported = library_imports(path) - {own}
    assert "experiments" not in imported, f"{path.name} imports experiments/"
    assert imported <= ALLOWED[own], f"{path.relative_to(LIB)} imports {sorted(imported - ALLOWED[own])}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(LIB)))
def test_no_module_is_much_over_500_lines(path):
    assert len(path.read_text().splitlines()) <= 550, f"{path.relative_to(LIB)}: split it into rooms"
