"""The package structure of docs/architecture.md, held against the code's imports.

Every import of every project module is read with `ast`, wherever it stands (in a
function, under TYPE_CHECKING): a loop hidden by a lazy import is still a loop.
Then: no module imports itself through others, no package imports one above it,
and the modules that must stay light do not import torch.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Which packages each package may import (besides itself): the map's layers.
_SERVICE_DEPS = {"rpc", "protos", "model", "kvstore", "telemetry"}
ALLOWED: dict[str, set[str]] = {
    "protos": set(),
    "model": set(),
    "kvstore": set(),
    "telemetry": set(),
    "rpc": {"protos", "model", "kvstore", "telemetry"},
    "router": _SERVICE_DEPS,
    "prefill_worker": _SERVICE_DEPS,
    "decode_worker": _SERVICE_DEPS,
    "benchmarks": {"router", "prefill_worker", "decode_worker", *_SERVICE_DEPS},
    "deploy": {"benchmarks", "router", "prefill_worker", "decode_worker", *_SERVICE_DEPS},
}

# Modules the router (which must start fast and never import torch) is built from,
# and what else must stay torch-free.
TORCH_FREE = (
    "model.sampling_params",
    "model.prompt_limits",
    "model.tokenizer",
    "model.chat_template",
    "model.gguf",
    "model.gguf_tokenizer",
    "model.gguf_layout",
    "model.sources",
    "model.weight_files",
    "model.runtime",
    "kvstore.hashing",
    "kvstore.kv_format",
    "kvstore.tail_lease",
    "deploy.worker_flags",
    "router.service",
    "router.chat_prompt",
    "router.http_api",
    "router.openai_models",
    "router.openai_responses",
)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


MODULES = project_modules()


def imports_of(name: str) -> Iterator[tuple[str, int, bool]]:
    """(imported project module, line, whether at module level) for each import."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    # Imports inside a function run when it is called; every other one (under an
    # `if TYPE_CHECKING:` too) counts as the module's own.
    in_functions = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None:
                yield resolved, node.lineno, id(node) not in in_functions


def _resolve(target: str) -> str | None:
    """The project module `target` names (a module, or the package a name is in)."""
    while target:
        if target in MODULES:
            return target
        target = target.rpartition(".")[0]
    return None


GRAPH = {name: sorted({t for t, _, _ in imports_of(name) if t != name}) for name in MODULES}


def test_the_project_has_the_modules_the_map_names() -> None:
    # A guard against a check that reads nothing and so cannot fail.
    assert len(MODULES) > 100
    assert "router.relay" in GRAPH and "decode_worker.kernels.contracts" in GRAPH
    assert "router.worker_calls" in GRAPH["router.relay"]


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in graph.get(node, []):
            # A package's __init__ is imported by its submodules' imports: skip that
            # edge kind (importing `a.b` runs `a/__init__`, which is not a loop).
            if node.startswith(child + "."):
                continue
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_loops() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_the_loop_finder_finds_a_loop() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_package_imports_one_above_it(module: str) -> None:
    package = module.split(".")[0]
    for target, line, _ in imports_of(module):
        other = target.split(".")[0]
        assert other == package or other in ALLOWED[package], (
            f"{module}:{line} imports {target}: {package} may import only "
            f"{sorted(ALLOWED[package]) or 'nothing of the project'}"
        )


def test_deploy_loads_benchmarks_only_when_a_command_runs() -> None:
    for module in (m for m in MODULES if m.startswith("deploy")):
        for target, line, is_top in imports_of(module):
            assert not (is_top and target.startswith("benchmarks")), (
                f"{module}:{line} imports {target} at module level; import it in the "
                "function that runs the benchmark"
            )


@pytest.mark.parametrize("module", TORCH_FREE)
def test_light_modules_do_not_import_torch(module: str) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_every_test_module_has_a_basename_of_its_own() -> None:
    # pytest imports test modules by basename (no packages under tests/): a second
    # test_x.py anywhere stops the whole run at collection.
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
