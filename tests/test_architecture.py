"""The import graph: one way down, no cycle, private kernels reached only through `ops`.

main / report / export -> trainers -> {specs, workdir, training, evaluation} -> core (threat,
data, models, attacks, poisons, objectives, train_state, ops, sharding, distributed). Every
import counts, a lazy one inside a function too: a cycle hidden in a function is still a cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxpoison"
TOP = ("jaxpoison.main", "jaxpoison.report", "jaxpoison.export", "jaxpoison.trainers")
CORE = (
    "jaxpoison.threat",
    "jaxpoison.data",
    "jaxpoison.models",
    "jaxpoison.attacks",
    "jaxpoison.poisons",
    "jaxpoison.objectives",
    "jaxpoison.losses",
    "jaxpoison.ops",
    "jaxpoison.train_state",
    "jaxpoison.workdir",
    "jaxpoison.sharding",
    "jaxpoison.distributed",
    "jaxpoison.transforms",
    "jaxpoison.privacy",
)
ABOVE_CORE = ("jaxpoison.specs", "jaxpoison.training", "jaxpoison.evaluation", *TOP)


def _modules():
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph():
    modules = _modules()

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("jaxpoison")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                if base.startswith("jaxpoison"):
                    deps |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[name] = deps - {name, "jaxpoison"}
    return graph


def _within(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_no_import_cycle():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            # A package's __init__ importing its own submodules is how packages are built.
            if dep.startswith(node + "."):
                continue
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_imports_run_one_way():
    graph = _graph()
    assert graph["jaxpoison.trainers"] or graph["jaxpoison.trainers.grid"]
    for name, deps in graph.items():
        if _within(name, CORE):
            upward = sorted(d for d in deps if _within(d, ABOVE_CORE))
            assert not upward, f"{name} (core) imports {upward}"
        if not _within(name, TOP):
            trainers = sorted(d for d in deps if _within(d, ("jaxpoison.trainers",)))
            assert not trainers, f"{name} (below the trainers) imports {trainers}"


def test_cpu_kernels_are_reached_only_through_ops():
    graph = _graph()
    for name, deps in graph.items():
        if _within(name, ("jaxpoison._cpu_kernels",)) or name == "jaxpoison.ops":
            continue
        inside = sorted(d for d in deps if _within(d, ("jaxpoison._cpu_kernels",)))
        assert not inside, f"{name} reaches into {inside}"
