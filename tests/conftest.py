"""Shared test setup: offline Hugging Face, a temporary Flower home, no telemetry."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the cores: one torch thread per process (inherited by the Flower processes a test starts).
    # Two threads per process on busy cores wait for each other at every operation, about tenfold slower
    # (docs/testing.md#times-of-the-tiers). Set before any test module imports torch.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import tempfile

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
from support.runs import CHAT, captured_output, run_server, tiny_run_config  # noqa: E402


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


@pytest.fixture
def task_identity():
    """What Flower sets in a ServerApp process (run, task and node ids), for server code run outside Flower:
    ``pytestmark = pytest.mark.usefixtures("task_identity")`` in the modules that need it."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
