"""Real Flower deployments on 127.0.0.1 running the app for 2 tiny rounds (1-3 min each).

(a) plain HTTP: one SuperLink, two SuperNodes, `flwr run` -- the commands of docs/deployment.md (the first
    part of the SuperLink-restart test).
(b) TLS + SuperNode authentication: the registered nodes train, an unregistered key is refused.
(c) a server without data, node-local files, federated evaluation and a broken node; a node killed
    mid-round; a hung ClientApp (replaced) and its late reply (refused); a SuperLink restarted mid-round.
docker/compose.yml itself runs on a real Docker engine in tests/test_compose.py.

Processes start in their own sessions and are stopped in the fixture teardown: each started process
and every descendant (the SuperLink detaches its SuperExec), never by name. The process helpers
(environment, free ports, run status, stopping) are the ones ``safedlora compare`` uses
(``safedlora_app.tools.simulation``).
SAFEDLORA_DEPLOY_APP_DIR points the tests at another Flower app with the same run-config keys.
"""

import re
import subprocess
import time

import psutil
import pytest
from support.deployment import APP_DIR, MAKE_CERTS, Deployment, app_missing, free_ports, metrics_rows

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.server.round_deadline import MIN_DEADLINE

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(bool(app_missing()), reason=f"app not written yet: {app_missing()}"),
]


@pytest.fixture
def deployment(tmp_path):
    d = Deployment(tmp_path)
    try:
        yield d
    finally:
        d.stop()


def supernode_cmd(link_port, port, partition, *tls):
    return ["flower-supernode", *tls, "--superlink", f"127.0.0.1:{link_port}", "--port", port,
            "--node-config", f"partition-id={partition} num-partitions=2"]


def test_loopback_tls_with_supernode_auth(deployment):
    d = deployment
    certs = d.tmp / "certs"
    subprocess.run(["bash", MAKE_CERTS, certs], check=True, capture_output=True, timeout=120,
                   env={**d.env, "NUM_NODES": "3"})  # node-0/1 get registered, node-2 not
    link, *node_ports = free_ports(4)
    d.start("superlink", [
        "flower-superlink", "--ssl-ca-certfile", certs / "ca.crt", "--ssl-certfile",
        certs / "server.pem", "--ssl-keyfile", certs / "server.key", "--enable-supernode-auth",
        "--port", link, "--database", d.tmp / "state.db",
        "--disable-runtime-dependency-installation"])
    d.connection("tls", f"127.0.0.1:{link}", **{"root-certificates": str(certs / "ca.crt")})
    d.wait_for(lambda: d.online_nodes("tls") is not None, "the TLS SuperLink", alive=["superlink"])

    registered = set()
    for k in (0, 1):
        reply = d.flwr_json("supernode", "register", certs / f"node-{k}.pub", "tls")
        assert reply["success"], reply
        registered.add(str(reply["node-id"]))
    for k, port in enumerate(node_ports):
        tls = ["--root-certificates", certs / "ca.crt",
               "--auth-supernode-private-key", certs / f"node-{k}"]
        d.start(f"supernode-{k}", supernode_cmd(link, port, k % 2, *tls))

    # The unregistered key is refused: the SuperNode logs exit code 305 and the process exits
    # with status 1 (flwr maps every error code to 1), without ever being listed.
    d.wait_for(lambda: d.procs["supernode-2"].poll() is not None, "the unregistered node to exit")
    assert d.procs["supernode-2"].returncode == 1, d.log("supernode-2")
    assert "Exit Code: 305" in d.log("supernode-2")
    alive = ["superlink", "supernode-0", "supernode-1"]
    d.wait_for(lambda: d.online_nodes("tls") == registered, "the 2 registered nodes online",
               alive=alive)

    d.run_app("tls", "tls", alive=alive)
    assert d.online_nodes("tls") == registered


def test_a_server_without_data_node_local_files_federated_evaluation_and_a_broken_node(deployment, tmp_path):
    """The server loads no dataset (central-eval = false, label-names; its dataset-name does not exist). Two
    nodes train and evaluate on their own CSVs (one with a node-local model path); a node whose data-path is
    missing fails with a clear error that the server logs with its node id, and the run goes on."""
    from safedlora_app.core.model import default_model_dir

    d = deployment
    local_csv, other_csv = tmp_path / "local.csv", tmp_path / "other.csv"
    for path, (first, second) in ((local_csv, ("negative", "positive")), (other_csv, ("neutral", "positive"))):
        path.write_text("text,label\n" + "".join(
            f"my sensor tweet {i} is {'fine' if i % 2 else 'broken'},{second if i % 2 else first}\n"
            for i in range(20)))
    link, *node_ports = free_ports(4)
    d.start("superlink", ["flower-superlink", "--insecure", "--port", link, "--database",
                          d.tmp / "state.db", "--disable-runtime-dependency-installation"])
    configs = [f"data-path='{local_csv}' model-path='{default_model_dir()}'",
               f"data-path='{other_csv}'",
               "data-path='/nonexistent/local.csv'"]
    for i, (port, node_config) in enumerate(zip(node_ports, configs)):
        d.start(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                   "--port", port, "--node-config", node_config])
    d.connection("local-data", f"127.0.0.1:{link}", insecure=True)
    names = list(d.procs)
    d.wait_for(lambda: (ids := d.online_nodes("local-data")) and len(ids) == 3 and ids, "3 SuperNodes online",
               alive=names)

    outputs = d.run_app("local-data", "local-data", alive=names,  # asserts 2 valid replies per round
                        settings="central-eval=false label-names='negative,neutral,positive' "
                                 "fraction-evaluate=1.0 dataset-name='/nonexistent/on/the/server.csv'")
    rows = RunFolder(outputs).records()
    assert all(row["nodes"] == 3 and row["dropped"] == 1 for row in rows if row["round"] >= 1), rows
    # Federated evaluation: the two sound nodes score each round's model on their held-out rows.
    assert all(row["eval-nodes"] == 3 and row["eval-replies"] == 2 and row["eval-dropped"] == 1
               and 0 <= row["fed-accuracy"] <= 1 and row["accuracy"] is None for row in rows if row["round"] >= 1)
    failures = [line for line in d.last_run_log.splitlines() if "failed:" in line]
    assert failures and all("data-path = '/nonexistent/local.csv' does not exist on this node" in line
                            for line in failures), d.last_run_log[-4000:]
    assert all(re.search(r"node \d+: failed", line) for line in failures)


def power_loss(pid):
    """SIGKILL a process and all its descendants at once."""
    root = psutil.Process(pid)
    tree = [root, *root.children(recursive=True)]
    for process in tree:
        process.kill()
    psutil.wait_procs(tree, timeout=10)


def test_a_node_killed_mid_round_is_dropped_and_its_restart_gets_the_backbone_again(deployment):
    """Power loss on a SuperNode while it trains: the round ends without it (Flower's heartbeat), the server
    names it, and the run completes. The node comes back as a new SuperNode with an empty disk cache, gets the
    trained backbone it lacks, and trains in the next round."""
    d = deployment
    link, *node_ports = free_ports(5)
    d.start("superlink", ["flower-superlink", "--insecure", "--port", link, "--database",
                          d.tmp / "state.db", "--disable-runtime-dependency-installation"])

    def node(i, port, cache):
        return ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", port,
                "--node-config", f"partition-id={i} num-partitions=3 cache-dir='{cache}'"]

    for i in range(3):
        d.start(f"supernode-{i}", node(i, node_ports[i], d.tmp / f"cache-{i}"))
    d.connection("loopback", f"127.0.0.1:{link}", insecure=True)
    d.wait_for(lambda: (ids := d.online_nodes("loopback")) and len(ids) == 3, "3 SuperNodes online",
               alive=list(d.procs))
    cli, log, outputs = d.launch("loopback", "node-loss", "num-server-rounds=4 init-rounds=1 "
                                 "init-trainable='full' heat-rounds=0 cool-rounds=1")
    # Round 1 (full) is done and round 2 (LoRA + the trained backbone) is under way: kill node 2.
    d.wait_rounds(outputs, 1, cli, log, alive=list(d.procs))
    power_loss(d.procs["supernode-2"].pid)
    killed_at = time.monotonic()
    d.start("supernode-2b", node(2, node_ports[3], d.tmp / "cache-2-wiped"))  # a new node id, an empty cache
    alive = ["superlink", "supernode-0", "supernode-1", "supernode-2b"]
    text = d.complete("loopback", cli, log, alive=alive)
    rows = metrics_rows(outputs)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["replies"] == 3
    assert rows[2]["replies"] == 2 and rows[2]["dropped"] == 1, rows[2]  # the lost node, named in the log
    assert re.search(r"round 2: (dropped the training reply of node \d+|no training reply from node)",
                     text), text[-4000:]
    # The restarted node joins from round 3: it lacks the trained backbone, gets it once, and trains.
    assert rows[3]["replies"] == 3 and rows[3]["backbone-sends"] == 1, rows[3]
    assert rows[4]["replies"] == 3 and rows[4]["backbone-sends"] == 0, rows[4]
    d.round_past_dead_node = rows[2]["round-seconds"]
    print(f"round 2 ended {rows[2]['round-seconds']:.1f} s after it began "
          f"({time.monotonic() - killed_at:.1f} s from the kill to the end of the run)")


def client_apps(supernode_pid):
    """The ClientApp processes (one per message) under a SuperNode, by PID."""
    try:
        tree = psutil.Process(supernode_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    found = {}
    for process in tree:
        try:
            if "flwr-clientapp" in " ".join(process.cmdline()):
                found[process.pid] = process
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.extended  # docs/testing.md: CI's tier leaves it out
def test_a_hung_client_app_is_replaced_and_its_late_reply_is_refused(deployment):
    """A live SuperNode whose ClientApp stops answering (SIGSTOP on the real `flwr-clientapp` process, as soon
    as it starts for round 2's message). The process sends no task heartbeats, so its SuperNode lets its token
    expire, puts the message back, and starts a new ClientApp for it: round 2 completes with every node, without
    waiting for the round's deadline. Resumed (SIGCONT) after its round, the old process's reply is refused
    (its token expired) and counts nowhere: rounds 3 and 4 aggregate one reply per node."""
    d = deployment
    link, *node_ports = free_ports(4)
    d.start("superlink", ["flower-superlink", "--insecure", "--port", link, "--database",
                          d.tmp / "state.db", "--disable-runtime-dependency-installation"])
    for i in range(3):
        d.start(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                   "--port", node_ports[i], "--node-config", f"partition-id={i} num-partitions=3"])
    d.connection("loopback", f"127.0.0.1:{link}", insecure=True)
    names = list(d.procs)
    d.wait_for(lambda: (ids := d.online_nodes("loopback")) and len(ids) == 3, "3 SuperNodes online", alive=names)
    cli, log, outputs = d.launch("loopback", "hang", "num-server-rounds=4")
    d.wait_rounds(outputs, 1, cli, log, alive=names)
    earlier = client_apps(d.procs["supernode-2"].pid)  # round 1's, perhaps still exiting
    hung = d.wait_for(lambda: [p for pid, p in client_apps(d.procs["supernode-2"].pid).items() if pid not in earlier],
                      "node 2's ClientApp of round 2", alive=names)
    for process in hung:
        process.suspend()  # SIGSTOP: the process lives, and answers nothing, heartbeats included
    d.wait_rounds(outputs, 2, cli, log, alive=names)
    for process in hung:
        process.resume()  # SIGCONT: it now tries to pull its message and push a reply, after its round closed
    text = d.complete("loopback", cli, log, alive=names)
    rows = metrics_rows(outputs)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    # Stopped before it took its message (what happens here: it is still importing), the message is handed to a new
    # ClientApp and round 2 has every reply. (Stopped after, the SuperNode would answer with an error reply, which
    # the server drops: one reply fewer, never a wait for the deadline.)
    assert rows[2]["replies"] + rows[2]["dropped"] == 3 and rows[2]["replies"] >= 2, rows[2]
    assert all(r["replies"] == 3 and r["dropped"] == 0 for r in (rows[1], *rows[3:])), rows
    assert "no training reply" not in text, text[-4000:]
    psutil.wait_procs([p for p in hung if p.is_running()], timeout=60)
    node_log = d.log("supernode-2", 100_000)
    assert "round 2: trained" in node_log or rows[2]["dropped"] == 1
    assert "Runtime task-token authentication failed" in node_log, node_log[-4000:]  # the resumed process, refused
    print(f"round 2 took {rows[2]['round-seconds']:.1f} s with the replaced ClientApp "
          f"(round 1: {rows[1]['round-seconds']:.1f} s, round 3: {rows[3]['round-seconds']:.1f} s)")


STUCK_CLIENT = '''"""The app's ClientApp, except that the node whose environment names SAFEDLORA_TEST_RELEASE
hangs in its second training message until that file exists: stuck in its own code, its heartbeats still going."""
import os
import time
from pathlib import Path

from flwr.clientapp import ClientApp

from safedlora_app import client_app

app = ClientApp()
app.evaluate()(client_app.evaluate_handler)
app.query()(client_app.limits_handler)


@app.train()
def train(msg, context):
    release = os.environ.get("SAFEDLORA_TEST_RELEASE")
    if release:
        seen = Path(release + ".seen")
        if seen.exists():
            while not Path(release).exists():
                time.sleep(0.2)
        seen.touch()
    return client_app.train_handler(msg, context)
'''


def stuck_client_app(folder):
    """A Flower app in ``folder``: this app's ServerApp and config, the ClientApp of ``STUCK_CLIENT``."""
    folder.mkdir()
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    assert 'clientapp = "safedlora_app.client_app:app"' in pyproject
    (folder / "pyproject.toml").write_text(pyproject.replace('clientapp = "safedlora_app.client_app:app"',
                                                             'clientapp = "stuck_client:app"'))
    (folder / "stuck_client.py").write_text(STUCK_CLIENT)
    return folder


def test_a_client_app_stuck_with_live_heartbeats_is_cut_off_by_the_deadline_and_its_late_reply_ignored(deployment):
    """A ClientApp stuck in its own code (its heartbeats going, so Flower sees nothing wrong) in round 2 on one of
    3 nodes: the round's deadline (round-deadline-factor = 1: the longest earlier round, at least 60 s) ends the
    wait, not round-timeout (3,600 s); the node is named in the log, and the round aggregates the other two.
    Released after its round closed, the stuck ClientApp trains and sends its reply: the SuperLink takes it, and
    the server never counts it, in round 2 or later."""
    d = deployment
    release = d.tmp / "release"
    link, *node_ports = free_ports(4)
    d.start("superlink", ["flower-superlink", "--insecure", "--port", link, "--database",
                          d.tmp / "state.db", "--disable-runtime-dependency-installation"])
    for i in range(3):
        env = {"SAFEDLORA_TEST_RELEASE": str(release)} if i == 2 else {}
        d.start(f"supernode-{i}", ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                                   "--port", node_ports[i], "--node-config", f"partition-id={i} num-partitions=3"],
                **env)
    d.connection("loopback", f"127.0.0.1:{link}", insecure=True)
    names = list(d.procs)
    d.wait_for(lambda: (ids := d.online_nodes("loopback")) and len(ids) == 3, "3 SuperNodes online", alive=names)
    cli, log, outputs = d.launch("loopback", "stuck", "num-server-rounds=4 round-deadline-factor=1",
                                 app_dir=stuck_client_app(d.tmp / "stuck-app"))
    d.wait_rounds(outputs, 2, cli, log, alive=names)
    release.touch()
    # The late reply is made and sent while round 3 runs (the node logs its round-2 training after the release).
    d.wait_for(lambda: "round 2: trained" in d.log("supernode-2", 100_000), "the stuck node's late reply",
               timeout=120, alive=names)
    assert len(metrics_rows(outputs)) == 3, "round 3 ended before the late reply was sent"
    text = d.complete("loopback", cli, log, alive=names)
    rows = metrics_rows(outputs)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["replies"] == 3 and rows[2]["replies"] == 2, rows[:3]
    assert re.search(r"round 2: no training reply from node\(s\) \[\d+\] before the round timeout", text), \
        text[-4000:]
    # The deadline: round 1's training exchange (shorter than its round) times round-deadline-factor (1), at least
    # MIN_DEADLINE; the round adds its aggregation and evaluation.
    assert MIN_DEADLINE <= rows[2]["round-seconds"] <= max(MIN_DEADLINE, rows[1]["round-seconds"]) + 30, rows[:3]
    # The late reply counts nowhere: rounds 3 and 4 count at most one reply per node. On a busy machine the released
    # node can stay a round behind (its ClientApp for round 3 starts after the late one ends, and each later reply
    # misses its round's deadline too, as CI saw on 7 December): then it is named as missing, never counted.
    for r in rows[3:]:
        assert r["replies"] + r["dropped"] == 3 and r["replies"] >= 2, rows[3:]
        if r["replies"] == 2:
            assert re.search(rf"round {r['round']}: no training reply from node\(s\) \[\d+\]", text), text[-4000:]
    print(f"round 2 ended after {rows[2]['round-seconds']:.1f} s (round 1 {rows[1]['round-seconds']:.1f} s, "
          f"round 3 {rows[3]['round-seconds']:.1f} s)")


def test_a_restarted_superlink_loses_the_run_and_resume_recovers_it(deployment):
    """Plain HTTP on loopback (docs/deployment.md's commands) until round 1 ends; then the SuperLink (and the
    ServerApp it runs) dies; restarted on the same --database, the SuperNodes reconnect, and `resume = true`
    continues the run from the last checkpoint to the end."""
    d = deployment
    link, *node_ports = free_ports(3)
    superlink = ["flower-superlink", "--insecure", "--port", link, "--database", d.tmp / "state.db",
                 "--disable-runtime-dependency-installation"]
    d.start("superlink", superlink)
    for i, port in enumerate(node_ports):
        d.start(f"supernode-{i}", supernode_cmd(link, port, i, "--insecure"))
    d.connection("loopback", f"127.0.0.1:{link}", insecure=True)
    nodes = d.wait_for(lambda: (ids := d.online_nodes("loopback")) and len(ids) == 2 and ids,
                       "2 SuperNodes online", alive=list(d.procs))
    cli, log, outputs = d.launch("loopback", "link-restart", "num-server-rounds=3")
    d.wait_rounds(outputs, 1, cli, log, alive=list(d.procs))
    # Until the restart this is the plain loopback deployment of docs/deployment.md: the same two nodes serve it.
    assert all(r["replies"] == 2 for r in metrics_rows(outputs)[1:]) and d.online_nodes("loopback") == nodes
    power_loss(d.procs["superlink"].pid)  # the server machine: the SuperLink and the ServerApp it runs
    cli.wait(timeout=60)
    d.start("superlink", superlink)  # same port, same database
    d.wait_for(lambda: (ids := d.online_nodes("loopback")) and len(ids) == 2, "the 2 SuperNodes back online",
               alive=list(d.procs))
    assert not RunFolder(outputs).finished
    # What the restarted SuperLink says of the interrupted run (docs/reliability.md).
    before = {r["run-id"]: r["status"] for r in d.flwr_json("ls", "loopback").get("runs", [])}
    print(f"after the SuperLink restart, the interrupted run's status: {before}")
    assert len(before) == 1 and not str(next(iter(before.values()))).startswith("finished:completed")
    cli, log, _ = d.launch("loopback", "link-restart", "num-server-rounds=3 resume=true")
    text = d.complete("loopback", cli, log, alive=list(d.procs))
    assert "resuming run link-restart at round" in text
    rows = metrics_rows(outputs)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["replies"] == 2 for r in rows[1:])
    assert RunFolder(outputs).summary()["rounds"] == 3
