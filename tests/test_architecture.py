"""The package's layering (docs/architecture.md): every import goes down a layer, the middle-layer packages
do not import each other, no trainer imports another trainer, and the module graph has no cycle."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "align"
# Lower layers first. A module may import its own package and anything in a lower layer.
LAYERS = [
    {"align.errors", "align.cache", "align.hf_utils"},
    {"align.objectives", "align.config", "align.checkpoints"},
    {"align.data", "align.models", "align.decoding", "align.rewards", "align.sampling"},
    {"align.eval", "align.demo"},
    {"align.tasks"},
    {"align.trainers"},
    {"align.api"},
    {"align.strength"},
    {"align.cli"},
]
SHARED_TRAINER_MODULES = {"base", "config", "metrics", "reference", "rollout"}


def unit(module: str) -> str:
    """The layered unit a module belongs to: its top-level package under align, or the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def modules() -> dict[str, set[str]]:
    """{module: the align modules it imports (anywhere in the file, function bodies included)}."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("align"):
                imports.add(node.module)
                imports |= {f"{node.module}.{a.name}" for a in node.names if (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
            elif isinstance(node, ast.Import):
                imports |= {a.name for a in node.names if a.name.startswith("align")}
        graph[name] = {m for m in imports if m != "align"}
    return graph


GRAPH = modules()


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_only_go_down(module):
    for imported in GRAPH[module]:
        same_unit = unit(imported) == unit(module)
        assert same_unit or layer(imported) < layer(module), f"{module} imports {imported} (layer {layer(imported)} >= {layer(module)})"


def test_objectives_depend_on_torch_alone():
    for module in (m for m in GRAPH if m.startswith("align.objectives")):
        assert all(i.startswith("align.objectives") for i in GRAPH[module]), module
        source = (ROOT.parent / module.replace(".", "/")).with_suffix(".py")
        source = source if source.exists() else source.with_suffix("") / "__init__.py"
        third_party = {n.names[0].name.split(".")[0] for n in ast.walk(ast.parse(source.read_text()))
                       if isinstance(n, ast.Import)} | {n.module.split(".")[0] for n in ast.walk(ast.parse(source.read_text()))
                                                          if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert third_party <= {"torch", "align", "__future__", "math", "typing", "dataclasses"}, (module, third_party)


def test_no_trainer_imports_another_trainer():
    from align.trainers import TRAINERS

    trainer_modules = {cls.__module__ for cls in TRAINERS.values()}
    for module in trainer_modules:
        for imported in GRAPH[module]:
            if imported.startswith("align.trainers."):
                assert imported.split(".")[2] in SHARED_TRAINER_MODULES, f"{module} imports {imported}"


def test_module_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for imported in GRAPH.get(module, ()):
            target = imported if imported in GRAPH else None
            if target is None:
                continue
            assert state.get(target) != 1, "import cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
