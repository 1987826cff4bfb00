"""Dependencies point one way: no module imports a layer above its own (docs/architecture.md,
"Layers"), and no two modules import each other, directly or around a circle. Imports
inside functions count; those under ``if TYPE_CHECKING:`` (annotations only) do not."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {
    "fedbat": "fedbat",
    "compressors": "fedbat.compressors",
    "datamodules": "fedbat.datamodules",
}

# the layers of docs/architecture.md, lowest first: a module's layer is that of its longest
# listed prefix
LAYERS = [
    (
        "core",
        [
            "fedbat.errors",
            "fedbat.registry",
            "fedbat.seeding",
            "fedbat.hooks",
            "fedbat.clientstate",
        ],
    ),
    (
        "parts",
        [
            "fedbat.compressors",
            "fedbat.datamodules",
            "fedbat.models",
            "fedbat.strategies",
            "fedbat.contract",
            "fedbat.optimization",
            "fedbat.task",
            "fedbat.network",
            "fedbat.traces",
            "fedbat.devices",
            "fedbat.batchnorm",
        ],
    ),
    ("settings", ["fedbat.config", "fedbat.results"]),
    (
        "engine",
        [
            "fedbat.client",
            "fedbat.server",
            "fedbat.intake",
            "fedbat.downlink",
            "fedbat.clientstore",
            "fedbat.exchange",
            "fedbat.accounting",
            "fedbat.checkpoint",
            "fedbat.rundir",
            "fedbat.slurm",
            "fedbat.assembly",
            "fedbat.buffered",
            "fedbat.federation",
            "fedbat.transport",
        ],
    ),
    ("run", ["fedbat.lifecycle", "fedbat.loggers", "fedbat.progress"]),
    (
        "app",
        ["fedbat", "fedbat.compose", "fedbat.train", "fedbat.api", "fedbat.plot"],
    ),
    ("integrations", ["fedbat.integrations"]),
    ("entry", ["fedbat.cli"]),  # the command line dispatches to all of them
]


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts]
            parts = [p for p in parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS and the docs"
    return rank


def imports(path: Path, known: set[str]) -> set[str]:
    """The fedbat modules ``path`` imports (``from pkg import sub`` names the submodule)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
            if len(subs) < len(node.names):
                out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a package's ``__init__`` importing its own
    submodules (a registry discovering them, a re-export) is left out: the submodules
    importing the package's registry is the one direction that counts."""
    out = {}
    for m, path in modules().items():
        deps = imports(path, set(modules())) - {m}
        if path.name == "__init__.py":
            deps = {d for d in deps if not d.startswith(m + ".")}
        out[m] = deps
    return out


GRAPH = graph()


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{m} ({LAYERS[layer(m)][0]}) imports {d} ({LAYERS[layer(d)][0]})"
        for m, deps in GRAPH.items()
        for d in deps
        if layer(d) > layer(m)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle():
    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in GRAPH[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    circles = sorted(m for m in GRAPH if m in reach(m))
    assert not circles, circles


def test_engine_modules_are_short_and_their_functions_narrow():
    """No module of ``fedbat/`` over 300 lines, no function of the engine with more than 6
    parameters (``self`` aside): a longer list is a settings object waiting to be named."""
    sizes = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    long = [f"{m}: {n} lines" for m, n in sizes.items() if n > 300]
    assert not long, long
    engine = [m for m in modules() if LAYERS[layer(m)][0] == "engine"]
    assert "fedbat.federation" in engine and "fedbat.client" in engine
    wide = []
    for m in engine:
        for node in ast.walk(ast.parse(modules()[m].read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                if len([x for x in names if x not in ("self", "cls")]) > 6:
                    wide.append(f"{m}.{node.name}")
    assert not wide, wide
