"""Training and central evaluation on a tiny random BERT: eval-every, length-sorted and merged
evaluation against plain references, and bf16 autocast."""

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from safedlora_app.core import adapter_math as am
from safedlora_app.core import payload as pl
from safedlora_app.core.config import RunConfig
from safedlora_app.core.model import adapted_modules, build_lora_model, full_state, head_parameters, module_shapes
from safedlora_app.core.training import Encoded, compute_dtype, evaluate, macro_f1, native_bf16, train
from safedlora_app.server.global_model import GlobalModel

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(45)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=3)
    return BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def data(tokenizer):
    """70 rows of 1 to 30 words, in no length order, labels tied to the first word."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 31, (70,), generator=g).tolist()
    tokens = [[2] + torch.randint(5, 50, (n,), generator=g).tolist() + [3] for n in lengths]
    labels = torch.tensor([t[1] % 3 for t in tokens])
    return Encoded(labels, tokenizer, tokens=tokens)


def reference_metrics(model, data, num_classes):
    """One unpadded row at a time, in data order: no batching, no sorting, no autocast."""
    predicted, loss = [], 0.0
    with torch.no_grad():
        for i in range(len(data)):
            logits = model(input_ids=torch.tensor([data.tokens[i]])).logits
            loss += float(torch.nn.functional.cross_entropy(logits, data.labels[i:i + 1]))
            predicted.append(int(logits.argmax()))
    predicted = torch.tensor(predicted)
    return {"accuracy": float((predicted == data.labels).float().mean()),
            "macro-f1": macro_f1(predicted, data.labels, num_classes), "loss": loss / len(data)}


def test_eval_every_keeps_round_zero_every_kth_and_the_last_three():
    config = RunConfig(num_server_rounds=12, eval_every=4)
    assert [r for r in range(13) if config.evaluates(r)] == [0, 4, 8, 10, 11, 12]
    assert [r for r in range(13) if RunConfig(num_server_rounds=12, eval_every=1).evaluates(r)] == list(range(13))
    assert [r for r in range(3) if RunConfig(num_server_rounds=2, eval_every=5).evaluates(r)] == [0, 1, 2]


def test_length_sorted_batches_give_the_reference_metrics(tiny_bert, data):
    assert data.by_length() != list(range(len(data)))  # the data is not already in length order
    got = evaluate(tiny_bert, data, batch_size=16, num_classes=3, device=torch.device("cpu"))
    want = reference_metrics(tiny_bert, data, 3)
    assert got["accuracy"] == want["accuracy"] and got["macro-f1"] == want["macro-f1"]
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_batches_are_padded_to_a_multiple_of_eight(data):
    assert data.batch([0, 1, 2])["input_ids"].shape[1] % 8 == 0


def test_merged_global_model_gives_the_adapter_logits(tiny_bert, data):
    modules = adapted_modules(tiny_bert, ["query", "value"], ["classifier"])
    heads = head_parameters(tiny_bert, ["classifier"])
    state = full_state(tiny_bert, heads)
    config = RunConfig(num_server_rounds=3, init_rounds=1, heat_rounds=1, cool_rounds=0, rank_max=4, rank_min=2)
    g = torch.Generator().manual_seed(5)
    tensors = {pl.key(pl.HEAD, n): state[pl.key(pl.HEAD, n)] + 0.1 for n in heads}
    for m in modules:
        b, a = am.refactor(torch.randn(16, 4, generator=g), torch.randn(4, 16, generator=g), 4)
        tensors[pl.key(pl.LORA_B, m)], tensors[pl.key(pl.LORA_A, m)] = b, a
    global_model = GlobalModel(tiny_bert, config.effective, module_shapes(tiny_bert, modules), ["classifier"])
    adapter, ranks = global_model.build(2, pl.pack(tensors))
    merged, merged_ranks = global_model.build(2, pl.pack(tensors), merged=True)
    assert ranks == merged_ranks and not hasattr(merged, "peft_config")
    batch = data.batch(range(20))
    with torch.no_grad():
        want = adapter(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        plain = tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter and head really change the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_bf16_autocast_trains_and_evaluates(tiny_bert, data):
    """bf16 smoke: float32 weights and optimizer, a falling loss, metrics close to float32's."""
    import copy

    cpu = torch.device("cpu")
    torch.manual_seed(0)  # dropout draws from the global generator: the same masks whatever ran before
    model = copy.deepcopy(tiny_bert).requires_grad_(True)
    before = next(model.parameters()).detach().clone()
    loss_before = evaluate(model, data, batch_size=16, num_classes=3, device=cpu)["loss"]
    result = train(model, data, list(range(len(data))), epochs=5, batch_size=8, grad_accum_steps=1, lr=1e-2,
                   weight_decay=0.0, prox_mu=0.0, seed=0, device=cpu, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(next(model.parameters()), before)
    assert torch.isfinite(torch.tensor(result.loss))
    # Held-out-free check on the training rows themselves: 5 epochs at lr 1e-2 must fit them better.
    assert evaluate(model, data, batch_size=16, num_classes=3, device=cpu)["loss"] < loss_before
    fp32 = evaluate(model, data, batch_size=16, num_classes=3, device=cpu)
    bf16 = evaluate(model, data, batch_size=16, num_classes=3, device=cpu, dtype=torch.bfloat16)
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    assert abs(bf16["accuracy"] - fp32["accuracy"]) <= 3 / len(data)


def test_compute_dtype():
    cpu = torch.device("cpu")
    assert compute_dtype("fp32", cpu) == torch.float32
    assert compute_dtype("bf16", cpu) == torch.bfloat16
    assert compute_dtype("auto", cpu) in (torch.float32, torch.bfloat16)


X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
PI5 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16 svebf16\n"


@pytest.mark.parametrize("machine, cpuinfo, native", [
    ("x86_64", X86_BF16, True),
    ("x86_64", X86_BF16.replace(" avx512_bf16", ""), False),
    ("aarch64", PI5, False),
    ("aarch64", GRAVITON3, True),
    ("aarch64", X86_BF16, False),  # qemu-user: an emulated aarch64 process reads the x86 host's cpuinfo
    ("riscv64", X86_BF16, False),
])
def test_native_bf16_reads_the_features_of_the_machine_torch_runs_on(machine, cpuinfo, native):
    assert native_bf16(machine, cpuinfo) is native


def lora_copy(tiny_bert):
    """LoRA with a non-zero B (as after a first round): at peft's init B = 0, so A gets no gradient at all."""
    modules = adapted_modules(tiny_bert, ["query", "value"], ["classifier"])
    model = build_lora_model(tiny_bert, dict.fromkeys(modules, 2), 2.0, 0.0, ["classifier"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def test_warmup_shrinks_the_first_step_and_the_ratio_is_reported(tiny_bert, data):
    """A fresh AdamW moves every entry by about lr in its first step; warmup k starts at lr / (k + 1)."""
    cpu, rows = torch.device("cpu"), list(range(32))
    common = dict(epochs=1, batch_size=8, grad_accum_steps=1, lr=1e-2, weight_decay=0.0, prox_mu=0.0, seed=0,
                  device=cpu)
    plain = train(lora_copy(tiny_bert), data, rows, **common).first_step_a_ratio
    warmed = train(lora_copy(tiny_bert), data, rows, warmup_steps=4, **common).first_step_a_ratio
    assert plain > 0 and warmed == pytest.approx(plain / 5, rel=0.05)
    assert train(tiny_bert.__class__(tiny_bert.config), data, rows, **common).first_step_a_ratio is None  # no LoRA


def test_sgd_steps_down_the_gradient(data):
    """One SGD step at a small lr lowers the loss on its own batch (no dropout: a deterministic gradient)."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=40, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    batch = Encoded(data.labels[:16], data.preprocessor, tokens=data.tokens[:16])
    cpu = torch.device("cpu")
    before = evaluate(model, batch, batch_size=16, num_classes=3, device=cpu)["loss"]
    train(model, batch, list(range(16)), epochs=1, batch_size=16, grad_accum_steps=1, lr=0.05, weight_decay=0.0,
          prox_mu=0.0, seed=0, device=cpu, optimizer_name="sgd")
    assert evaluate(model, batch, batch_size=16, num_classes=3, device=cpu)["loss"] < before
