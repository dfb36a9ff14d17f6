"""Shared test setup: offline Hugging Face, a temporary Flower home, no telemetry."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one torch thread per process (inherited by the Flower processes a test starts).
    # Two threads per process on busy cores wait for each other at every operation, about tenfold slower
    # (docs/testing.md#times-of-the-tiers). Set before any test module imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import contextlib
import io
import json
import logging
import tempfile
import tomllib
import warnings
from pathlib import Path

import pytest

_scratch = tempfile.mkdtemp(prefix="safedlora-tests-")
for name, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": os.path.join(_scratch, "hf"),
    "FLWR_HOME": os.path.join(_scratch, "flwr"),
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(name, value)


# The slow tiers: they start real processes and wait on them. `pytest` alone runs the fast tier (unit, in-process and
# lint tests, a few minutes); `pytest --all -n 4` runs these too, on parallel workers; `-m TIER` runs one of them.
SLOW_TIERS = {
    "e2e": "runs real Flower simulations through `flwr run` (slow, minutes)",
    "deployment": "starts real SuperLink/SuperNode processes on loopback",
    "compose": "runs docker/compose.yml on a real Docker engine",
    "arm64": "an emulated arm64 SuperNode (opt-in, SAFEDLORA_ARM64_ROOTFS)",
    "extended": "long tests beyond CI's tier, whose core CI covers elsewhere (opt-in: `pytest -m extended -n 4`)",
}


DESELECTED = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", dest="all_tiers",
                     help=f"also run the slow tiers ({', '.join(SLOW_TIERS)}); best with -n 4")


def pytest_configure(config):
    for name, text in SLOW_TIERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    """Deselect the slow tiers unless --all or a marker expression (-m) asks for them."""
    if config.getoption("all_tiers") or config.getoption("markexpr"):
        return
    slow = [item for item in items if any(item.get_closest_marker(tier) for tier in SLOW_TIERS)]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in set(slow)]
        config.stash[DESELECTED] = len(slow)


def pytest_terminal_summary(terminalreporter, config):
    if slow := config.stash.get(DESELECTED, 0):
        terminalreporter.write_line(f"fast tier: {slow} slow-tier tests deselected ({', '.join(SLOW_TIERS)}); "
                                    "`pytest --all -n 4` runs every tier")


import numpy as np  # noqa: E402


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """An imagefolder of real handwritten digits (scikit-learn's 8x8 scans, upscaled to 32x32)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for digit, name in ((0, "zero"), (1, "one"), (7, "seven")):
        (root / name).mkdir()
        for k, index in enumerate(np.flatnonzero(digits.target == digit)[:40]):
            pixels = (digits.images[index] * 15).astype(np.uint8).repeat(4, 0).repeat(4, 1)
            Image.fromarray(pixels).convert("RGB").save(root / name / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A small random ViT saved like a hub checkpoint (the hub's ViTs load through the same code)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


# --- In-process Flower: the real ServerApp and the ClientApp's handlers in one process, no transport ---------------
# (test_in_process.py, test_resume.py). Flower's modules load on first use, so that tests without them start fast.
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
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
              "client-seconds", "client-seconds-total", "exchange-seconds", "aggregate-seconds", "peak-memory-mb")


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
    run_dir = Path(config["out-dir"]) / config["run-name"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One node cache for the session: the tokenized partitions are made once."""
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture
def run_config(tmp_path, cache_dir):
    """``run_config(**overrides)``: a tiny run's config writing into this test's tmp_path."""
    return lambda **overrides: tiny_run_config(tmp_path, cache_dir, **overrides)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, cache_dir):
    """``finished_run(**overrides)``: the tiny in-process run with these overrides, run once per session and
    shared by every test that asks for the same one (treat its files as read-only). Returns (config, run_dir,
    metrics rows, summary); ``finished_run.output[run_dir]`` is what the run printed: Flower's log lines, then
    stderr (progress bars), then the warnings it raised, one per line."""
    runs = {}

    def run(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in runs:
            config = tiny_run_config(tmp_path_factory.mktemp("run"), cache_dir, run_name="run", **overrides)
            with captured_output() as output:
                runs[key] = (config, *run_server(config))
            run.output[runs[key][1]] = output.text()
        return runs[key]
    run.output = {}
    return run


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


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory):
    """A JSONL file of prompt/response rows with a topic and a conversation id (every 6 rows one conversation)."""
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r, "topic": t, "conversation": f"c{i // 6}"}) + "\n"
                            for i, (t, p, r) in enumerate(CHAT)))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A small random LLaMA with a word-level tokenizer and a chat template, saved like a hub checkpoint (hub
    LLaMA-, Qwen- and SmolLM-style models load through the same code). Its embeddings are tied, as SmolLM2's."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for _, p, r in CHAT for w in f"{p} {r} user assistant system".split()})
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                        bos_token="<|im_start|>", additional_special_tokens=specials[1:])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
