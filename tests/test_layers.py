"""Layering: the ClientApp loads no server-side module of the app."""

import ast
import subprocess
import sys
from pathlib import Path

import safedlora_app

APP = Path(safedlora_app.__path__[0])
SERVER_SIDE = {"strategy", "server_app", "aggregation", "global_model", "outputs", "plots", "compare", "simulation"}


def loaded_app_modules(entry: str) -> set[str]:
    code = f"import sys, {entry}; print(' '.join(m for m in sys.modules if m.startswith('safedlora_app.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[1] for name in result.stdout.split()}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_client_app_loads_no_server_module():
    client = loaded_app_modules("safedlora_app.client_app")
    assert "round_plan" in client and "payload" in client  # the check sees what the client really loads
    assert not client & SERVER_SIDE, client & SERVER_SIDE
    # Flower 1.42's own `import flwr` loads flwr.serverapp in every process; none of our client modules asks for it.
    for name in client:
        imports = imported_modules(APP / f"{name}.py")
        assert not any(i.startswith("flwr.serverapp") for i in imports), (name, imports)


def test_the_server_app_imports_nothing_from_the_client_app():
    assert "client_app" not in loaded_app_modules("safedlora_app.server_app")
