"""The import structure: no import circle between the project's modules (lazy imports inside functions
count too), no `_private` name taken from another module, and the library never imports tune/ or pipelines/.
Read from the source with `ast`, so nothing is executed."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("retain_asd", "tune", "pipelines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, name: str, modules: dict[str, Path]):
    """(imported project module, private names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    aliases: dict[str, str] = {}  # local name -> project module, for `alias._private` attribute uses
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    out.append((a.name, [], node.lineno))
                    aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            private = []
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:  # `from package import module`
                    out.append((sub, [], node.lineno))
                    aliases[a.asname or a.name] = sub
                else:
                    out.append((base, [], node.lineno))
                    if a.name.startswith("_"):
                        private.append(a.name)
            if private:
                out.append((base, private, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            out.append((aliases[node.value.id], [node.attr], node.lineno))
    return out


@functools.cache
def _graph():
    modules = _modules()
    graph, private = {}, []
    for name, path in modules.items():
        edges = set()
        for target, names, line in _imports(path, name, modules):
            if target != name:
                edges.add(target)
                private += [f"{path.relative_to(ROOT)}:{line} uses {target}.{n}" for n in names]
        graph[name] = edges
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph, _ = _graph()
    assert _cycles(graph) == []


def test_no_private_name_from_another_module():
    _, private = _graph()
    assert private == []


def test_library_never_imports_tune_or_pipelines():
    graph, _ = _graph()
    upward = [(m, t) for m, targets in graph.items() if m.startswith("retain_asd")
              for t in targets if t.split(".")[0] in ("tune", "pipelines")]
    assert upward == []


def _arrows(graph, source: str, target: str) -> list[tuple[str, str]]:
    """The imports from modules under `source` to modules under `target` (dotted prefixes)."""
    def under(m, prefix):
        return m == prefix or m.startswith(prefix + ".")

    return sorted((m, t) for m, targets in graph.items() if under(m, source) for t in targets if under(t, target))


def test_evaluation_never_imports_training():
    """Scoring a checkpoint never trains one: "frozen" and the foundation encoder are resolved above both layers
    (retain_asd.experiments), and the run pointer reader is tracking's."""
    graph, _ = _graph()
    assert _arrows(graph, "retain_asd.eval", "retain_asd.train") == []


def test_the_maths_reads_choice_lists_not_the_config_schema():
    """mixing, the objectives and the eval sets take names from retain_asd.choices (the ground floor)."""
    graph, _ = _graph()
    maths = ("retain_asd.mixing", "retain_asd.train.objectives", "retain_asd.eval.evalsets")
    assert [m for m in maths if "retain_asd.config" in graph[m]] == []
    assert all("retain_asd.choices" in graph[m] for m in maths)
    assert graph["retain_asd.choices"] <= {"retain_asd.models.registry"}  # the family names: the registry's
    assert graph["retain_asd.models.registry"] == set()


def test_an_encoder_family_is_one_model_file_and_one_registry_line():
    """Every family's module detects and loads its checkpoints behind the Encoder protocol; the loader and the
    config know families only through the registry."""
    import torch

    from retain_asd.choices import ENCODER_FAMILIES
    from retain_asd.models import registry
    from retain_asd.models.beats import BEATs, beats_tiny

    assert ENCODER_FAMILIES == tuple(registry.FAMILIES) == ("beats", "eat")
    for family in registry.FAMILIES:
        module = registry.family_module(family)
        assert callable(module.is_checkpoint) and callable(module.from_checkpoint)
    model = BEATs(beats_tiny())
    assert isinstance(model, registry.Encoder) and (model.num_layers, model.embed_dim) == (3, 64)
    hidden, grid = model.extract_layers(torch.zeros(1, 16000), layers=2)
    assert len(hidden) == 2 and hidden[-1].shape == (1, grid[0] * grid[1], model.embed_dim)
    graph, _ = _graph()
    loaders = ("retain_asd.models.encoders", "retain_asd.models.ckpt_io", "retain_asd.models.registry")
    assert [m for m in loaders if graph[m] & {"retain_asd.models.beats", "retain_asd.models.eat"}] == []


def test_experiments_sit_above_training_and_evaluation():
    graph, _ = _graph()
    below = [m for m in graph if m.startswith("retain_asd") and not m.startswith("retain_asd.experiments")]
    assert [a for m in below for a in _arrows(graph, m, "retain_asd.experiments") if a[0] == m] == []
    assert _arrows(graph, "retain_asd.experiments", "retain_asd.train") != []  # the walker sees the package


def test_the_stream_plan_sits_under_its_tasks_and_consumer():
    """retain_asd.stream sits where stream.py sat: above mixing, storage and the corpus, below training. Inside,
    the Ray Data tasks and the training worker's consumer import the epoch plan (and the buffer pool), never the
    reverse and not each other; the package's __init__ only re-exports them."""
    graph, _ = _graph()
    package = {m for m in graph if m == "retain_asd.stream" or m.startswith("retain_asd.stream.")}
    assert package == {f"retain_asd.stream{m}" for m in ("", ".plan", ".tasks", ".consumer", ".buffers")}
    inside = {m: graph[m] & package for m in package}
    assert inside["retain_asd.stream.plan"] == inside["retain_asd.stream.buffers"] == set()
    assert inside["retain_asd.stream.tasks"] == {"retain_asd.stream.plan", "retain_asd.stream.buffers"}
    assert inside["retain_asd.stream.consumer"] == {"retain_asd.stream.plan", "retain_asd.stream.buffers"}
    assert inside["retain_asd.stream"] == package - {"retain_asd.stream"}
    above = ("retain_asd.train", "retain_asd.eval", "retain_asd.experiments", "retain_asd.models",
             "retain_asd.tracking")
    assert [a for floor in above for a in _arrows(graph, "retain_asd.stream", floor)] == []
    below = ("retain_asd.mixing", "retain_asd.storage", "retain_asd.corpus", "retain_asd.choices")
    assert [a for floor in below for a in _arrows(graph, floor, "retain_asd.stream")] == []
    assert "retain_asd.stream" in graph["retain_asd.train.loop"]  # the walker sees the package's users


def test_the_walker_sees_cycles_and_private_imports(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "m.py"
    source.write_text("from retain_asd.mixing import _scale\nfrom retain_asd.stream import tasks\n"
                      "def f():\n    return tasks._cached_plan\n")
    found = _imports(source, "retain_asd.m", _modules())
    assert ("retain_asd.mixing", ["_scale"], 1) in found and ("retain_asd.stream.tasks", ["_cached_plan"], 4) in found


def test_mlflow_is_imported_by_tracking_only():
    users = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "retain_asd").rglob("*.py")
                   if any(isinstance(n, (ast.Import, ast.ImportFrom)) and
                          any((getattr(n, "module", None) or a.name).split(".")[0] == "mlflow" for a in n.names)
                          for n in ast.walk(ast.parse(p.read_text()))))
    assert users == ["retain_asd/tracking.py"]


def test_training_loop_reads_as_the_algorithm():
    assert len((ROOT / "retain_asd" / "train" / "loop.py").read_text().splitlines()) <= 150
