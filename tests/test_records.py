"""The round config: one typed record, written by the server's round plan and read by the nodes."""

import dataclasses

import pytest
from flwr.app import ConfigRecord

from safedlora_app.core.records import RoundConfig, RoundConfigError


def test_a_lora_round_config_travels_as_a_config_record_and_back():
    sent = RoundConfig(server_round=3, kind="lora", lr=1e-3, prox_mu=0.0, wire_dtype="float16",
                       label_names=("neg", "pos"), backbone_hash="ab12", lora_modules=("m0", "m1"), lora_ranks=(4, 2),
                       lora_scale=2.0)
    record = sent.to_record()
    assert dict(record) == {"server-round": 3, "kind": "lora", "lr": 1e-3, "prox-mu": 0.0, "wire-dtype": "float16",
                            "label-names": ["neg", "pos"], "backbone-hash": "ab12", "lora-modules": ["m0", "m1"],
                            "lora-ranks": [4, 2], "lora-scale": 2.0}
    assert RoundConfig.from_record(record) == sent
    frozen = dataclasses.replace(sent, lora_frozen_a=True)
    assert frozen.to_record()["lora-frozen-a"] is True and RoundConfig.from_record(frozen.to_record()) == frozen


def test_a_full_round_config_has_no_lora_keys():
    sent = RoundConfig(server_round=1, kind="full", lr=5e-5, prox_mu=0.01, wire_dtype="float32", label_names=("a",))
    assert not any(key.startswith("lora-") for key in sent.to_record())
    assert RoundConfig.from_record(sent.to_record()) == sent


@pytest.mark.parametrize("change, message", [
    ({"server-round": None}, "has no 'server-round'"),
    ({"lr": "fast"}, "'lr' is 'fast', not of type float"),
    ({"server-round": True}, "'server-round' is True, not of type int"),
    ({"lora-ranks": [4.0, 2.0]}, "'lora-ranks' is 4.0, not of type int"),
    ({"label-names": "neg"}, "'label-names' is 'neg', not of type tuple"),
])
def test_a_bad_round_config_is_refused_naming_the_key(change, message):
    values = dict(RoundConfig(server_round=1, kind="lora", lr=1e-3, prox_mu=0.0, wire_dtype="float32",
                              label_names=("a", "b"), lora_modules=("m0", "m1"), lora_ranks=(4, 2),
                              lora_scale=2.0).to_record())
    values.update(change)
    with pytest.raises(RoundConfigError, match=message):
        RoundConfig.from_record(ConfigRecord({k: v for k, v in values.items() if v is not None}))
