"""peft LoRA built by the app: fixed scale under truncation, weight round trips, proximal term."""

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from safedlora_app.core import adapter_math as am
from safedlora_app.core.model import (
    ModelError,
    adapted_modules,
    build_lora_model,
    get_lora_weights,
    head_parameters,
    set_lora_weights,
)
from safedlora_app.core.training import macro_f1, proximal_term


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).eval()


def delta_w(peft_model, module):
    layer = peft_model.base_model.model.get_submodule(module)
    x = torch.eye(layer.in_features)
    with torch.no_grad():
        return (layer(x) - layer.base_layer(x)).T  # (d_out, d_in) update actually applied


def test_truncation_never_rescales_the_update(tiny_bert):
    modules = adapted_modules(tiny_bert, ["query", "value"], ["classifier"])
    assert modules == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    g = torch.Generator().manual_seed(1)
    full = {m: am.refactor(torch.randn(16, 4, generator=g), torch.randn(4, 16, generator=g), 4) for m in modules}
    ranks = {modules[0]: 4, modules[1]: 1, modules[2]: 2, modules[3]: 3}
    cut = {m: am.resize(*full[m], ranks[m]) for m in modules}
    model = build_lora_model(tiny_bert, ranks, scale=2.0, dropout=0.0, head_modules=["classifier"])
    set_lora_weights(model, cut, {})
    for m in modules:
        b, a = cut[m]
        assert torch.allclose(delta_w(model, m), 2.0 * b @ a, atol=1e-5)  # s * B_r A_r for every rank


def test_weights_round_trip_and_the_base_stays_untouched(tiny_bert):
    modules = adapted_modules(tiny_bert, ["value"], ["classifier"])
    heads = head_parameters(tiny_bert, ["classifier"])
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    factors = {m: (torch.randn(16, 2), torch.randn(2, 16)) for m in modules}
    head = {n: torch.randn_like(dict(tiny_bert.named_parameters())[n]) for n in heads}
    model = build_lora_model(tiny_bert, dict.fromkeys(modules, 2), 2.0, 0.0, ["classifier"])
    set_lora_weights(model, factors, head)
    got_factors, got_head = get_lora_weights(model, modules, heads)
    assert all(torch.equal(got_factors[m][0], factors[m][0]) and torch.equal(got_factors[m][1], factors[m][1])
               for m in modules)
    assert all(torch.equal(got_head[n], head[n]) for n in heads)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert all(torch.equal(before[k], v) for k, v in tiny_bert.state_dict().items())  # a copy was adapted


def test_unknown_target_or_head_module_names_what_exists(tiny_bert):
    with pytest.raises(ModelError, match="target-modules = 'qkv' matches no Linear layer.*query"):
        adapted_modules(tiny_bert, ["qkv"], ["classifier"])
    with pytest.raises(ModelError, match="head-modules = 'score' matches no parameters.*classifier"):
        head_parameters(tiny_bert, ["score"])


def test_every_head_parameter_a_node_trains_travels_on_distilbert():
    """peft matches modules_to_save by plain suffix: on DistilBERT 'classifier' also wraps 'pre_classifier', so
    that layer trains on every node and must be sent and aggregated with the head."""
    torch.manual_seed(0)
    base = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=3)).eval()
    heads = head_parameters(base, ["classifier"])
    assert set(heads) == {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"}
    modules = adapted_modules(base, ["q_lin", "v_lin"], ["classifier"])
    model = build_lora_model(base, dict.fromkeys(modules, 2), 2.0, 0.0, ["classifier"])
    trained = {n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
               for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == set(heads)
    _, sent = get_lora_weights(model, modules, heads)
    assert set(sent) == trained


def test_proximal_term_value_and_gradient():
    w = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    anchor = torch.tensor([0.0, 2.0, 5.0])
    term = proximal_term([w], [anchor], mu=0.5)
    assert term.item() == pytest.approx(0.25 * (1 + 0 + 4))
    term.backward()
    assert torch.allclose(w.grad, 0.5 * (w.detach() - anchor))  # d/dw (mu/2)||w - a||^2 = mu (w - a)


def test_macro_f1_by_hand():
    predicted, labels = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> .5; class 1: tp1 fp0 fn1 -> 2/3; class 2: tp1 fp1 fn0 -> 2/3
    assert macro_f1(predicted, labels, 3) == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
