"""The house rules, read from the source (every import statement, at module level or inside a function):

1. trainer_core never imports ComfyUI or the nodes package.
2. trainer_core's wings depend downwards only (docs/architecture.md draws the tree):
       config, util  <-  quant, adapters  <-  hidream  <-  speedups, data  <-  training  <-  plan  <-  bench  <-  cli, demo
   and wings on one level do not import each other.
3. Only the command line imports the benchmark.
4. No import cycle between trainer_core's modules at import time (module-level imports).
5. The nodes use trainer_core through its public faces: `trainer_core` itself or one of its wings, never a module
   inside a wing.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "trainer_core"
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes",
                   "execution", "latent_preview"}
FRONT_DOORS = {"cli", "demo", "__main__", "__init__"}  # top-level modules: they may use each other
LEVELS = [{"config", "util"}, {"quant", "adapters"}, {"hidream"}, {"speedups", "data"}, {"training"}, {"plan"},
          {"bench"}, FRONT_DOORS]
LEVEL_OF = {wing: level for level, wings in enumerate(LEVELS) for wing in wings}
# The one top-level helper every face uses to offer its names lazily: below everything.
LEVEL_OF["_lazy"] = -1


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) of every import in `path`; `from x import y` also yields x.y, which
    is the module when y is a submodule."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, id(node) in top_level))
            found += [(f"{target}.{alias.name}", id(node) in top_level) for alias in node.names]
    return found


def wing_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def known_modules() -> set[str]:
    return {module_name(p) for p in core_files()}


def test_trainer_core_never_imports_comfyui_or_the_nodes():
    offenders = [f"{p.relative_to(REPO)} imports {target}" for p in core_files() for target, _ in imports_of(p)
                 if target.split(".")[0] in COMFYUI_MODULES or target.split(".")[:1] == ["nodes"]]
    assert not offenders, offenders


def test_wings_depend_downwards_only():
    known = known_modules()
    offenders = []
    for path in core_files():
        source = module_name(path)
        for target, _ in imports_of(path):
            if target not in known or not target.startswith("trainer_core"):
                continue
            a, b = wing_of(source), wing_of(target)
            if a == b:
                continue
            if LEVEL_OF[b] > LEVEL_OF[a] or (LEVEL_OF[b] == LEVEL_OF[a] and a not in FRONT_DOORS):
                offenders.append(f"{source} ({a}, level {LEVEL_OF[a]}) imports {target} ({b}, level {LEVEL_OF[b]})")
    assert not offenders, "\n".join(offenders)


def test_speedups_never_import_training():
    offenders = [f"{module_name(p)} imports {t}" for p in (CORE / "speedups").rglob("*.py") for t, _ in imports_of(p)
                 if t.startswith("trainer_core.training")]
    assert not offenders, offenders


def test_only_the_command_line_imports_the_benchmark():
    files = [*core_files(), *(REPO / "nodes").rglob("*.py"), REPO / "__init__.py"]
    offenders = []
    for path in files:
        source = module_name(path)
        if source.startswith("trainer_core.bench") or source == "trainer_core.cli":
            continue
        offenders += [f"{source} imports {t}" for t, _ in imports_of(path)
                      if t.split(".")[:2] == ["trainer_core", "bench"] or
                      (source.startswith("nodes") and ".trainer_core.bench" in f".{t}")]
    assert not offenders, offenders


def test_no_import_cycle_between_modules():
    known = known_modules()
    graph = {module_name(p): {t for t, top in imports_of(p) if top and t in known and t != module_name(p)}
             for p in core_files()}
    # Faces import their modules lazily (trainer_core/_lazy.py), so a face has edges only for what it imports at
    # module level: a module may use its own wing's face without closing a cycle.
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_nodes_use_trainer_core_through_its_faces():
    faces = {"trainer_core"} | {f"trainer_core.{p.name}" for p in CORE.iterdir() if (p / "__init__.py").is_file()}
    offenders = []
    for path in sorted((REPO / "nodes").rglob("*.py")):
        for target, _ in imports_of(path):
            if not target.startswith("trainer_core"):
                continue
            # `from ..trainer_core.hidream import denoise` also yields trainer_core.hidream.denoise: a name, not a
            # module; only real modules inside a wing are internals.
            if target not in faces and target in known_modules():
                offenders.append(f"{path.relative_to(REPO)} imports {target}")
    assert not offenders, offenders


def test_every_face_offers_names_that_exist():
    import importlib

    for face in ["trainer_core"] + [f"trainer_core.{p.name}" for p in sorted(CORE.iterdir())
                                    if (p / "__init__.py").is_file()]:
        module = importlib.import_module(face)
        missing = [name for name in module.__all__ if getattr(module, name, None) is None]
        assert module.__all__ and not missing, (face, missing)
