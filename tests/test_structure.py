"""The package's shape (docs/design.md, "Package layout"): imports point one way (no cycle between `ctal_hf`
modules, counting imports inside functions; only `if TYPE_CHECKING:` imports are exempt), names are compared only
inside the registry modules, the registry's names half agrees with the model's classes half, and no file is over
600 lines. Static checks on the source (AST): nothing is imported or run."""

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "ctal_hf"
PACKAGE = "ctal_hf"
MAX_LINES = 600

# The modules that may compare a name with a task, decoder or backbone name: the registries themselves.
REGISTRY_MODULES = {"ctal_hf.registry", "ctal_hf.tasks"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every `import` / `from ... import` of a module, at any depth (functions, classes, try blocks), except those
    under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The `ctal_hf` modules `name` imports explicitly (a parent package that Python runs on the way is not counted:
    every module would import `ctal_hf/__init__.py` so)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        found.update(target for target in targets if target in modules and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _package_modules()
    return {name: _imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports_and_skips_type_checking():
    graph = import_graph()
    # `ctal_hf.cli` imports the figure functions inside `main` only; `ctal_hf.decoders` imports the config only
    # under TYPE_CHECKING.
    assert any(target.startswith("ctal_hf.visualization") for target in graph["ctal_hf.cli"])
    assert "ctal_hf.configuration_ctal" not in graph["ctal_hf.decoders"]


def test_no_import_cycle_between_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_file_over_the_size_limit():
    too_long = {
        str(path.relative_to(PACKAGE_ROOT.parent)): count
        for path in PACKAGE_ROOT.rglob("*.py")
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"files over {MAX_LINES} lines (split them by concept): {too_long}"


def test_the_registry_halves_agree():
    # The names half (`ctal_hf.registry`, torch-free) and the model's classes half name the same things, with the
    # same metadata.
    import dataclasses

    from ctal_hf import registry
    from ctal_hf.backbones import BACKBONE_BUILDERS, BACKBONES
    from ctal_hf.decoders import DECODER_CLASSES, DECODERS
    from ctal_hf.heads import HEAD_BUILDERS, HEAD_FAMILIES
    from ctal_hf.training.loss_weighting import LOSS_WEIGHTINGS

    def info_fields(entry, info_class):
        return {item.name: getattr(entry, item.name) for item in dataclasses.fields(info_class)}

    assert list(DECODERS) == list(DECODER_CLASSES) == list(registry.DECODER_INFO)
    for name, spec in DECODERS.items():
        assert info_fields(spec, registry.CTALDecoderInfo) == dataclasses.asdict(registry.DECODER_INFO[name])
        assert spec.decoder_class is DECODER_CLASSES[name]
    assert list(BACKBONES) == list(registry.BACKBONE_INFO)
    assert set(BACKBONE_BUILDERS) == set(registry.BACKBONE_LIBRARIES)
    for name, spec in BACKBONES.items():
        info = registry.BACKBONE_INFO[name]
        assert info_fields(spec, registry.CTALBackboneInfo) == info_fields(info, registry.CTALBackboneInfo)
        assert (spec.builder.library, spec.builder.name) == (info.library, info.model_name)
        assert spec.builder.description == info.description
        assert info.head_family in registry.HEAD_FAMILY_INFO and info.normals_loss in registry.NORMALS_LOSSES
    assert list(HEAD_FAMILIES) == list(HEAD_BUILDERS) == list(registry.HEAD_FAMILY_INFO)
    for name, family in HEAD_FAMILIES.items():
        assert family.projection_norm == registry.HEAD_FAMILY_INFO[name].projection_norm
    assert tuple(LOSS_WEIGHTINGS) == registry.LOSS_WEIGHTINGS
    assert registry.GRADIENT_AGGREGATORS == ("none", *registry.GRADIENT_AGGREGATOR_SPECS)


def test_the_configuration_imports_no_model_module():
    # A config is data: building one (and checking it against the registry) loads no `nn.Module` of the package.
    import subprocess
    import sys

    script = (
        "import sys; from ctal_hf import CTALConfig; CTALConfig.from_preset('pascal_context', decoder='ctal_ms', "
        "backbone='hrnet_w18_small_v2'); print(sorted(m for m in sys.modules if m.startswith('ctal_hf')))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))
    model_modules = {
        "ctal_hf.backbones",
        "ctal_hf.blocks",
        "ctal_hf.heads",
        "ctal_hf.decoders",
        "ctal_hf.baselines",
        "ctal_hf.ctal_module",
        "ctal_hf.ctal_attention",
        "ctal_hf.losses",
        "ctal_hf.modeling_ctal",
    }
    assert "ctal_hf.registry" in loaded and not loaded & model_modules, sorted(loaded)


def _known_names() -> set[str]:
    from ctal_hf.registry import BACKBONE_INFO, DECODER_INFO
    from ctal_hf.tasks import BUILTIN_TASK_NAMES

    return set(BUILTIN_TASK_NAMES) | set(DECODER_INFO) | set(BACKBONE_INFO)


def name_comparisons(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """`(line, name)` of every comparison (`==`, `!=`, `in`, `not in`, ...) of which one side is a known name, a
    literal collection holding one, or a module-level constant bound to such a collection."""

    def literal_names(node: ast.expr) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value} & names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literal_names(element) for element in node.elts)) if node.elts else set()
        if isinstance(node, ast.Dict):
            return set().union(*(literal_names(key) for key in node.keys if key is not None)) if node.keys else set()
        return set()

    constants: dict[str, set[str]] = {}
    for node in getattr(tree, "body", []):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        if value is not None and not isinstance(value, ast.Constant):
            for target in targets:
                if isinstance(target, ast.Name) and literal_names(value):
                    constants[target.id] = literal_names(value)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                hits = literal_names(side) or (constants.get(side.id, set()) if isinstance(side, ast.Name) else set())
                found += [(node.lineno, name) for name in sorted(hits)]
    return found


def test_name_comparison_finder_finds_comparisons():
    source = 'X = ("ctal_ms", "mtinet")\nif a == "semseg" or b in X or "depth" in c or d in ("x", "y"): pass\n'
    assert name_comparisons(ast.parse(source), {"ctal_ms", "mtinet", "semseg", "depth"}) == [
        (2, "semseg"),
        (2, "ctal_ms"),
        (2, "mtinet"),
        (2, "depth"),
    ]


def test_no_module_outside_the_registries_compares_names():
    # Behaviour that depends on a task, decoder or backbone is a flag or method of its registry entry (or task
    # object), never a comparison with its name: a custom task or a new registry entry then works everywhere.
    names = _known_names()
    offenders = {
        name: hits
        for name, path in _package_modules().items()
        if name not in REGISTRY_MODULES and (hits := name_comparisons(ast.parse(path.read_text()), names))
    }
    assert not offenders, f"name comparisons outside the registry modules (read a flag instead): {offenders}"


def test_tables_keyed_by_names_live_in_the_registries():
    # A module-level dict keyed by task, decoder or backbone names is a registry: only the registry modules and the
    # classes half of the decoder registry (`decoders.DECODER_CLASSES`) hold one; elsewhere the task objects and
    # registry entries are asked (a custom task or a new entry then gets the same behaviour).
    names = _known_names()
    allowed = REGISTRY_MODULES | {"ctal_hf.decoders"}
    tables = {}
    for module, path in _package_modules().items():
        for node in ast.parse(path.read_text()).body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.Dict):
                keys = {key.value for key in value.keys if isinstance(key, ast.Constant)} & names
                if keys and module not in allowed:
                    tables[f"{module}:{node.lineno}"] = sorted(keys)
    assert not tables, f"tables keyed by names outside the registries: {tables}"


def test_a_custom_task_is_asked_like_a_built_in_one():
    # Per-task behaviour comes from the task object: a task defined by a spec gets its evaluate module, figure
    # title and column, and card line the way a built-in task does.
    from ctal_hf.evaluate_metrics import evaluate_module_path
    from ctal_hf.tasks import resolve_tasks

    specs = {
        "albedo": {"kind": "regression", "num_channels": 1, "positive": True, "title": "Albedo"},
        "mask": {"kind": "binary", "short_title": "mask", "in_figures": False},
    }
    tasks = resolve_tasks(["mask", "albedo", "semseg", "parts"], specs)
    assert evaluate_module_path("albedo", task_specs=specs).endswith("ctal_depth")
    assert evaluate_module_path(tasks["mask"]).endswith("ctal_saliency")
    assert evaluate_module_path("parts").endswith("ctal_semseg")
    assert [tasks[name].short_title for name in tasks] == ["mask", "Albedo", "semantic seg.", "human parts"]
    shown = sorted((name for name in tasks if tasks[name].in_figures), key=lambda name: tasks[name].figure_order)
    assert shown == ["semseg", "albedo"]
    assert "Albedo" in tasks["albedo"].card_line() and "`albedo`" in tasks["albedo"].card_line()
