"""The import structure: importing the library loads no optional trainer, no matplotlib and
nothing of the application; the import graph of dsd_kernels/ has no cycle and every import
points down the layers (docs/design.md)."""
import ast
import pathlib
import subprocess
import sys

import dsd_kernels

PACKAGE = pathlib.Path(dsd_kernels.__file__).parent

# lowest first; a module may import its own layer or any lower one (docs/design.md, "Layers")
LAYERS = [
    ("dsd_kernels._floatbits", "dsd_kernels._files", "dsd_kernels._dtensor", "dsd_kernels.masks",
     "dsd_kernels.reference"),
    ("dsd_kernels.backends", "dsd_kernels._C"),  # _C: the compiled extension (csrc/)
    ("dsd_kernels._backend",),
    ("dsd_kernels.ops", "dsd_kernels.distributed"),
    ("dsd_kernels.optim", "dsd_kernels.nn", "dsd_kernels.scope"),
    ("dsd_kernels.dsd",),
    ("dsd_kernels.integrations",),
    ("dsd_kernels",),  # the package's __init__: the top-level names
    ("dsd_kernels.app",),
]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _known(modules: dict) -> set[str]:
    return set(modules) | {"dsd_kernels._C"}


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _layer(name: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{name} is in no layer of LAYERS"
    return best[0]


def test_imports_point_down_the_layers_and_have_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, _known(modules)) for name, path in modules.items()}
    graph["dsd_kernels._C"] = set()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, f"imports pointing up the layers: {upward}"
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"


def test_the_library_never_imports_the_application():
    modules = _modules()
    offenders = [name for name, path in modules.items() if not name.startswith("dsd_kernels.app")
                 and any(t.startswith("dsd_kernels.app") for t in _imports(name, path, _known(modules)))]
    assert not offenders


def test_the_layer_check_sees_an_upward_import(tmp_path):
    # the check itself must be able to fail: an ops module importing optim is upward
    fake = tmp_path / "x.py"
    fake.write_text("from ..optim import MaskedSGD\n")
    modules = {**_modules(), "dsd_kernels.ops.x": fake}
    found = _imports("dsd_kernels.ops.x", fake, _known(modules))
    assert found == {"dsd_kernels.optim"} and _layer("dsd_kernels.optim") > _layer("dsd_kernels.ops.x")


def test_importing_the_library_loads_no_trainer_no_matplotlib_and_no_application():
    code = ("import sys, dsd_kernels as dk; dk.optim, dk.nn, dk.dsd, dk.integrations; "
            "import dsd_kernels.optim, dsd_kernels.nn, dsd_kernels.dsd, dsd_kernels.integrations._dsd_run; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
            "'transformers', 'accelerate', 'matplotlib') or m.startswith('dsd_kernels.app')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_op_is_at_the_top_level():
    for op in ("magnitude_masks", "magnitude_thresholds", "masked_sgd_", "masked_adamw_", "apply_masks_",
               "masked_linear"):
        assert op in dsd_kernels.__all__ and getattr(dsd_kernels, op) is getattr(dsd_kernels.ops, op)
    for sub in dsd_kernels._LAZY_SUBMODULES:
        assert sub in dsd_kernels.__all__ and sub in dir(dsd_kernels)
