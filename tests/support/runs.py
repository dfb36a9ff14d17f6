"""In-process Flower: the real ServerApp and the ClientApp's handlers in one process, no transport
(test_in_process.py, test_resume.py, ...), with the tiny settings that make a run take seconds. Flower's modules load
on first use, so that tests without them start fast."""

import contextlib
import io
import logging
import tomllib
import warnings
from pathlib import Path

# --- In-process Flower: the real ServerApp and the ClientApp's handlers in one process, no transport ---------------
# (test_in_process.py, test_resume.py). Flower's modules load on first use, so that tests without them start fast.
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
LABELS = ["negative", "neutral", "positive"]  # the embedded tweets' classes
TINY = {"local-samples": 16, "test-size": 40, "val-size": 40, "batch-size": 8, "eval-batch-size": 40, "min-nodes": 2,
        "precision": "fp32"}


def tiny_run_config(out_dir, cache_dir, **overrides) -> dict:
    """The app's run-config defaults (pyproject.toml), shrunk to seconds, with ``overrides`` (snake_case keys)."""
    defaults = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **TINY, "out-dir": str(out_dir), "cache-dir": str(cache_dir),
            **{k.replace("_", "-"): v for k, v in overrides.items()}}


#: The metrics that measure time or memory: they differ between two runs that compute the same thing.
WALL_CLOCK = ("round-seconds", "eval-seconds", "train-seconds", "train-seconds-max", "train-seconds-total",
              "client-seconds", "client-seconds-total", "exchange-seconds", "aggregate-seconds", "peak-memory-mb",
              "in-turn")


class InProcessGrid:
    """Nodes that are ClientApp handler calls in this process; a handler's exception becomes an error reply."""

    def __init__(self, config: dict, num_nodes: int = 2, node_configs: list[dict] | None = None):
        from flwr.app import Context, RecordDict

        node_configs = node_configs or [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config=config,
                                          node_config=node_config) for i, node_config in enumerate(node_configs)}
        self._replies = {}  # message id -> its reply, until pulled

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Runs each message's handler at once; its reply waits for :meth:`pull_messages`."""
        from flwr.app import Error, Message, MessageType

        from safedlora_app import client_app

        handlers = {MessageType.TRAIN: client_app.train_handler, MessageType.QUERY: client_app.limits_handler,
                    MessageType.EVALUATE: client_app.evaluate_handler}
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # what the Grid does when it pushes
            try:
                handler = handlers[message.metadata.message_type]
                reply = handler(message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:  # noqa: BLE001 - Flower turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=repr(error)), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_server(config: dict, node_configs: list[dict] | None = None, grid=None) -> tuple[Path, list[dict], dict]:
    """``server_app.main`` on ``grid`` (default: an InProcessGrid); the run's directory, metrics rows and summary."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from safedlora_app import server_app

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # what Flower sets in a ServerApp
    server_app.main(grid or InProcessGrid(config, node_configs=node_configs),
                    Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    from safedlora_app.core.run_folder import RunFolder

    run = RunFolder(Path(config["out-dir"]) / config["run-name"])
    return run.path, run.records(), run.summary()


class _Output:
    def __init__(self):
        self.lines, self.stderr, self.warnings = [], io.StringIO(), []

    def text(self) -> str:
        return "\n".join([*self.lines, self.stderr.getvalue(), *self.warnings])


@contextlib.contextmanager

def captured_output():
    """Flower's log records (as formatted messages), stderr and every warning raised inside the block."""
    output, flower = _Output(), logging.getLogger("flwr")

    class Collect(logging.Handler):
        def emit(self, record):
            output.lines.append(record.getMessage())

    handler = Collect()
    flower.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(output.stderr):
            warnings.simplefilter("always")
            yield output
        output.warnings = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    finally:
        flower.removeHandler(handler)


# A few lines of chat for the causal-LM tests: (topic, prompt, response), 2 conversations per topic.
CHAT = [(topic, f"do you like {thing} {k}", f"yes i like {thing} a lot {k}")
        for topic, things in (("food", ("pizza", "soup")), ("sport", ("tennis", "golf")))
        for thing in things for k in range(12)]
