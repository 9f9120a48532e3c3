"""The package's layers (docs/architecture.md): every import runs down, never up, and no files
import each other in a circle. Imports are read from the source (all of them: module level,
inside functions, under TYPE_CHECKING), so a new circle or upward import fails here."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import turbollm

SRC = Path(turbollm.__file__).parent

# Lowest first. A module may import anything on its own layer or a lower one; within a layer
# the packages and modules must not import each other in a circle.
LAYERS = [
    # base: plain values, sizing, configuration, and the native-build helper
    {"model_arch", "sizing", "config", "sampling_params", "platform_info", "native_build",
     "chat", "corpus", "model_presets", "cli_args", "cli_errors", "structured_spec"},
    {"core"},         # requests, scheduler, KV block accounting, the worker hand-off: no torch
    {"spec_decode"},  # the speculation controller and n-gram proposals: no torch
    {"distributed"},  # ranks, groups, collectives (torch.distributed, shared memory)
    {"attention"},
    {"layers"},
    {"quantization"},  # linear methods and their kernels
    {"models"},
    {"loader"},        # checkpoint formats
    {"worker"},        # owns every tensor
    {"executor"},
    {"structured_output"},  # grammar compiling and token bitmasks (xgrammar / llguidance)
    {"engine"},
    {"llm", "__init__"},
    {"compress", "eval", "plan", "bench", "server", "cli", "serve"},  # tools
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The layer unit of a module: its top-level package or module under turbollm."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    """module -> the turbollm modules it imports."""
    paths = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(n for n in names if n in paths and n != mod)
        graph[mod] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    assert not {unit(m) for m in import_graph()} - set(RANK)


def test_no_import_runs_up():
    upward = sorted(f"{a} -> {b}" for a, deps in import_graph().items() for b in deps
                    if RANK[unit(b)] > RANK[unit(a)])
    assert not upward


def test_no_circles_between_files():
    assert not circles(import_graph())


def test_no_circles_between_packages():
    """Packages of one layer (the tools, the base modules) must not import each other in a
    circle either, even where no two files do."""
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    for a, deps in graph.items():
        packages.setdefault(unit(a), set()).update(unit(b) for b in deps if unit(b) != unit(a))
    assert not circles(packages)


def test_the_checks_catch_a_circle_and_an_upward_import():
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert RANK["engine"] > RANK["worker"] > RANK["loader"] > RANK["core"]


def test_core_and_speculation_control_import_no_torch():
    code = ("import sys; import turbollm.core.scheduler, turbollm.core.batch, "
            "turbollm.core.kv_cache_manager, turbollm.spec_decode.proposer, "
            "turbollm.spec_decode.controller, turbollm.spec_decode.step_cost; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
