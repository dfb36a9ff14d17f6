"""Layering: core imports neither the tasks nor a side, the tasks import core only, the device side loads nothing of
the server's and the server nothing of the device's; checked by package prefix, so a new module is covered where it
is put. And no import circle among the app's modules, counting imports inside functions."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import safedlora_app

APP = Path(safedlora_app.__path__[0])
PACKAGES = {"core", "tasks", "server", "client", "tools"}


def loaded_app_modules(entry: str) -> set[str]:
    """Dotted names (below ``safedlora_app.``) of the app's modules that importing ``entry`` loads."""
    code = f"import sys, {entry}; print(' '.join(m for m in sys.modules if m.startswith('safedlora_app.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.removeprefix("safedlora_app.") for name in result.stdout.split()}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_every_module_lives_in_a_package_but_the_two_entry_points():
    top = {p.name for p in APP.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    assert top == PACKAGES | {"client_app.py", "server_app.py"}


def test_the_client_app_loads_core_and_client_only():
    client = loaded_app_modules("safedlora_app.client_app, safedlora_app.client.rounds")
    assert {"core.round_plan", "core.payload", "client.node_resources"} <= client  # the check sees real loads
    assert packages(client) <= {"core", "tasks", "client", "client_app"}, client
    # Flower 1.42's own `import flwr` loads flwr.serverapp in every process; none of our client modules asks for it.
    for name in client:
        path = APP.joinpath(*name.split(".")).with_suffix(".py")
        if path.exists():
            assert not any(i.startswith("flwr.serverapp") for i in imported_modules(path)), name


def test_the_server_app_loads_core_and_server_only():
    server = loaded_app_modules("safedlora_app.server_app")
    assert {"server.strategy", "core.round_plan"} <= server
    assert packages(server) <= {"core", "tasks", "server", "server_app"}, server


@pytest.mark.parametrize("module", sorted(p.stem for p in (APP / "core").glob("*.py") if p.stem != "__init__"))
def test_core_imports_neither_the_tasks_nor_a_side(module):
    assert packages(loaded_app_modules(f"safedlora_app.core.{module}")) <= {"core"}


def test_the_tasks_import_core_only():
    assert packages(loaded_app_modules("safedlora_app.tasks")) <= {"core", "tasks"}


def app_imports(path: Path) -> set[str]:
    """The app modules ``path`` imports anywhere in it (module level or inside a function), as dotted names below
    ``safedlora_app.``; ``from package import module`` counts the module."""
    package = ".".join(path.relative_to(APP).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = ".".join(path.relative_to(APP).parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*parent, *([base] if base else [])])
                base = f"safedlora_app.{base}" if base else "safedlora_app"
            found = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        names.update(n.removeprefix("safedlora_app.") for n in found if n.startswith("safedlora_app."))
    return names


def test_no_import_circle_even_through_imports_inside_functions():
    modules = {".".join(p.relative_to(APP).with_suffix("").parts).removesuffix(".__init__"): p
               for p in APP.rglob("*.py")}
    graph = {name: {m for m in app_imports(path) if m in modules and m != name} for name, path in modules.items()}

    def circle_from(start: str, node: str, seen: list[str]) -> list[str] | None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*seen, start]
            if nxt not in seen and (found := circle_from(start, nxt, [*seen, nxt])):
                return found
        return None

    circles = [c for name in sorted(graph) if (c := circle_from(name, name, [name]))]
    assert not circles, f"import circle: {' -> '.join(circles[0])}"


def test_the_circle_check_sees_a_circle_hidden_in_a_function(tmp_path, monkeypatch):
    fake = tmp_path / "safedlora_app"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "a.py").write_text("from .b import x\n")
    (fake / "core" / "b.py").write_text("def f():\n    from safedlora_app.core import a\n")
    monkeypatch.setattr(__import__(__name__), "APP", fake)
    with pytest.raises(AssertionError, match="import circle: core.a -> core.b -> core.a"):
        test_no_import_circle_even_through_imports_inside_functions()


def test_the_client_app_answers_the_limits_query_without_torch():
    """Every connected node answers the limits query, many at once on a machine hosting many SuperNodes
    (docs/scale.md): importing the ClientApp must not load the training stack."""
    code = """
import sys
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safedlora_app import client_app
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 100  # what a ClientApp process has
query = Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=100)
query.metadata.__dict__["_message_id"] = query.object_id
context = Context(run_id=1, node_id=100, node_config={"max-rank": 3}, state=RecordDict(), run_config={})
print(client_app.limits_handler(query, context).content["limits"]["max-rank"])
heavy = ("torch", "transformers", "peft", "datasets", "safedlora_app.client.rounds")
print(" ".join(m for m in heavy if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    answer, *loaded = result.stdout.splitlines()
    assert answer == "3"  # the query was answered, from the node's config
    assert " ".join(loaded).split() == []


def test_the_app_never_imports_the_lab_or_what_only_the_lab_needs():
    """The lab (lab/safedlora_lab, the `lab` extra) sits beside the app: node images install the app's dependencies
    only, so no module of the app may import the lab or the lab's own dependencies."""
    lab_only = ("safedlora_lab", "pandas", "scipy", "tqdm")
    for path in APP.rglob("*.py"):
        found = {name for name in imported_modules(path) if name.split(".")[0] in lab_only}
        assert not found, f"{path.relative_to(APP)} imports {sorted(found)}"
