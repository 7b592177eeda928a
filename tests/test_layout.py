"""The package's shape: three layers with one import direction and no import cycles."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flexunet"

# A module's layer is its folder: flexunet/kernels, flexunet/nn, flexunet/io; everything else is on top.
# A module may import from its own layer and the layers below it only.
FOLDER_LAYERS = {"kernels": 0, "nn": 1, "io": 2}
LAYER_NAMES = ["kernel", "model", "file", "top"]
TOP = 3


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return FOLDER_LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def flexunet_imports(path: Path) -> dict[str, int]:
    """Every flexunet module `path` imports, top-level or inside functions, with the line."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b`: the submodule a.b where there is one, else the module a.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == "flexunet" or name.startswith("flexunet."):
                target = name
                while target not in MODULES and "." in target:  # `from flexunet.kernels import ops`
                    target = target.rpartition(".")[0]
                if target in MODULES and target != here:
                    found.setdefault(target, node.lineno)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p): p for p in FILES}


def test_layer_folders_exist_and_hold_modules():
    for folder in FOLDER_LAYERS:
        assert any(m.startswith(f"flexunet.{folder}.") for m in MODULES), f"flexunet/{folder} holds no module"


@pytest.mark.parametrize("module, layer", [
    ("flexunet.kernels.ops", 0), ("flexunet.kernels", 0), ("flexunet.nn.unet", 1), ("flexunet.io.keras", 2),
    ("flexunet.sleap", 3), ("flexunet.predict.paf", 3), ("flexunet", 3),
])
def test_a_modules_layer_is_its_folder(module, layer):
    assert layer_of(module) == layer


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in MODULES.items():
        for target, line in flexunet_imports(path).items():
            if target.startswith(module + ".") or module == "flexunet":
                continue
            if layer_of(target) > layer_of(module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: the {LAYER_NAMES[layer_of(module)]} "
                             f"layer imports {target} from the {LAYER_NAMES[layer_of(target)]} layer")
    assert not wrong, "\n".join(wrong)


def find_cycles(graph: dict[str, set]) -> list[str]:
    """Every cycle a depth-first walk of `graph` closes, as "a -> b -> a"."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, ["a -> b -> a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["a -> b -> c -> a"]),
])
def test_the_cycle_finder(graph, expected):
    assert find_cycles(graph) == expected


def test_there_are_no_import_cycles():
    graph = {m: set(flexunet_imports(p)) for m, p in MODULES.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("source,expected", [
    ("import flexunet.io.keras\n", {"flexunet.io.keras"}),
    ("def f():\n    from flexunet.sleap import load_model\n", {"flexunet.sleap"}),
    ("from flexunet.kernels import ops, native\n", {"flexunet.kernels.ops", "flexunet.kernels.native"}),
    ("from flexunet.kernels import conv3x3\n", {"flexunet.kernels"}),
])
def test_the_import_walk_sees_top_level_and_function_imports(tmp_path, source, expected):
    path = PACKAGE / "_probe_for_test.py"
    try:
        path.write_text(source)
        MODULES["flexunet._probe_for_test"] = path
        assert set(flexunet_imports(path)) == expected
    finally:
        path.unlink()
        MODULES.pop("flexunet._probe_for_test", None)
