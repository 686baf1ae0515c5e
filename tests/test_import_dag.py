"""The import graph: identity <- store <- embedding <- estimators <- model <- cli, no cycles,
no private names across modules, and ``featurepipe fit`` on a store without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from featurepipe.embed import embed
from tests.helpers import TINY, write_good_images

PACKAGE = Path(__file__).resolve().parent.parent / "featurepipe"
#: Modules another round owns (the CLI front ends); they are checked for cycles, not __all__.
ALL_EXEMPT = {"featurepipe.cli", "featurepipe.cli_compare", "featurepipe.demo"}


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _top_level_imports(name: str, tree: ast.Module) -> set[str]:
    """featurepipe modules ``name`` imports when it is imported (not inside functions)."""
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "featurepipe"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("featurepipe")}
    return out - {name}


MODULES = _modules()


def test_no_import_cycles():
    graph = {name: _top_level_imports(name, tree) & set(MODULES)
             for name, tree in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize(("lower", "higher"), [
    ("featurepipe.identity", ("featurepipe.store", "featurepipe.embedding", "featurepipe.embed",
                              "featurepipe.estimators", "featurepipe.model", "featurepipe.cli")),
    ("featurepipe.atomic", ("featurepipe.store", "featurepipe.embedding", "featurepipe.model")),
    ("featurepipe.store", ("featurepipe.embedding", "featurepipe.embed", "featurepipe.estimators",
                           "featurepipe.model", "featurepipe.cli")),
    ("featurepipe.embedding", ("featurepipe.estimators", "featurepipe.model", "featurepipe.cli",
                               "featurepipe.engines")),
    ("featurepipe.estimators", ("featurepipe.model", "featurepipe.cli")),
    ("featurepipe.model", ("featurepipe.cli", "featurepipe.cli_heads")),
    ("featurepipe.finetuned", ("featurepipe.model", "featurepipe.cli")),
])
def test_lower_layers_never_import_higher_ones(lower, higher):
    for name, tree in MODULES.items():
        if name != lower and not name.startswith(lower + "."):
            continue
        for node in ast.walk(tree):  # function-level imports count too
            target = node.module if isinstance(node, ast.ImportFrom) else None
            if target and any(target == h or target.startswith(h + ".") for h in higher):
                pytest.fail(f"{name} imports {target}, a higher layer")


def test_store_does_not_import_the_package_root():
    tree = MODULES["featurepipe.store"]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name != "featurepipe" for a in node.names)
        if isinstance(node, ast.ImportFrom):
            assert node.module != "featurepipe"


def test_no_module_imports_another_modules_private_names():
    bad = []
    for name, tree in MODULES.items():
        if name.startswith("featurepipe.compare."):
            continue  # compare/ is one package split in files; issue 20 reshapes it
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featurepipe"):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad


def test_public_modules_state_all():
    missing = [name for name, tree in MODULES.items()
               if not name.rsplit(".", 1)[-1].startswith("_") and name not in ALL_EXEMPT
               and not any(isinstance(n, ast.Assign)
                           and any(getattr(t, "id", "") == "__all__" for t in n.targets)
                           for n in tree.body)]
    assert not missing


@pytest.mark.parametrize("module", ["featurepipe.identity", "featurepipe.store",
                                    "featurepipe.heads", "featurepipe.model",
                                    "featurepipe.atomic", "featurepipe.embedding.plan",
                                    "featurepipe.embedding.options"])
def test_light_modules_import_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, module


def test_fit_on_a_store_imports_no_torch(tmp_path):
    root = tmp_path / "photos"
    for seed, label in enumerate(("ant", "bee")):
        write_good_images(root / label, 5, seed=seed)
    embed(root, tmp_path / "s.h5", **TINY, precision="fp32", workers=0, progress=False)
    code = (
        "import sys\n"
        "from featurepipe.cli import main\n"
        f"rc = main(['fit', {str(tmp_path / 's.h5')!r}, '--head', 'knn', '--cv', '2',"
        f" '--out', {str(tmp_path / 'm.joblib')!r}])\n"
        "torch = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH', torch[:3])\n"
        "sys.exit(rc or bool(torch))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "m.joblib").is_file()
