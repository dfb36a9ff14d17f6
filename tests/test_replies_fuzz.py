"""Malformed and hostile replies (issue #37 §1): each is dropped with its reason, the round completes, and the global
model is what the good reply alone makes of it.

Every case drives the strategy's own hooks (``aggregate_train``, ``aggregate_evaluate``) with one good reply, from
node 11, and one bad one, from node 22. The bad ones are crafted ``flwr.app.Array`` objects whose labels
(``shape``, ``dtype``) and bytes may disagree, as a node running other code can send them: the named cases of the
issue, then seeded random mutations of an honest reply.
"""

import io
import math
import random
import zipfile
from functools import cache

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from support.strategy import (
    evaluate_round,
    evaluation_reply,
    initial,
    make_strategy,
    modules_of,
    noisy,
    reply,
    send,
    trained,
)

from safedlora_app.core import payload as pl
from safedlora_app.server.outputs import RoundLog

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py

#: The rounds fuzzed: a LoRA round at float32 and at float16 on the wire, a full (fedavg) round at float16.
ROUNDS = {"lora": {}, "lora-fp16": {"wire_dtype": "float16"},
          "full-fp16": {"method": "fedavg", "wire_dtype": "float16"}}


def honest(message, seed):
    """The ArrayRecord a sound node returns for ``message``: its update, on the wire, in the round's wire-dtype."""
    config = message.content["config"]
    update = noisy(message, seed) if config["kind"] == "full" else trained(message, seed)
    return pl.pack(pl.to_wire(update, modules_of(message)), config["wire-dtype"])


def first_round(kind):
    strategy = make_strategy(**ROUNDS[kind])
    return strategy, send(strategy, 1, initial(strategy))


@cache
def good_alone(kind):
    """Round 1's global tensors and metrics when only node 11 replies (node 22 silent)."""
    strategy, messages = first_round(kind)
    arrays, metrics = strategy.aggregate_train(1, [reply(messages[0], honest(messages[0], 1))])
    return pl.unpack(arrays), dict(metrics)


def npy(values):
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=True)  # object arrays too: the server must refuse them unread
    return buffer.getvalue()


def crafted(values, *, shape=None, dtype=None, stype="numpy.ndarray", data=None):
    """An Array whose labels default to ``values``' own; any of them may be set to disagree with the bytes."""
    shape = values.shape if shape is None else shape
    dtype = str(values.dtype) if dtype is None else dtype
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=npy(values) if data is None else data)


def with_array(record, name, array):
    return ArrayRecord({**{k: v for k, v in record.items() if k != name}, name: array})


def npy_header(shape, descr="<f4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz(values):
    buffer = io.BytesIO()
    np.savez(buffer, x=values)
    assert zipfile.is_zipfile(io.BytesIO(buffer.getvalue()))  # np.load would hand back a lazy NpzFile
    return buffer.getvalue()


def head_key(record):
    return next(k for k in record if k.startswith(pl.HEAD + pl.SEP))


def mutate_array(target, change):
    """A bad reply: the honest record of node 22 with ``change(array, its values)`` in place of one array
    (``target``: ``"packed"``, ``"head"`` or ``"backbone"``)."""
    def bad(message):
        record = honest(message, 2)
        name = {"packed": pl.PACKED, "head": head_key(record), "backbone": "backbone::emb.w"}[target]
        values = record[name].numpy()
        return reply(message, with_array(record, name, change(record[name], values)))
    return bad


def mutate_record(change):
    """A bad reply: node 22's honest record changed as a whole (``change(record)``: a new ArrayRecord)."""
    return lambda message: reply(message, change(honest(message, 2)))


def with_metrics(metrics):
    """A bad reply: node 22's honest arrays with ``metrics`` (a record, or anything else) under ``metrics``."""
    def bad(message):
        node = ConfigRecord({"backbone-hash": message.content["config"].get("backbone-hash", "")})
        return Message(RecordDict({"arrays": honest(message, 2), "metrics": metrics, "node": node}), reply_to=message)
    return bad


# Named cases: (rounds they apply to, how node 22's reply is made). What is checked before any array (the records,
# num-examples) is fuzzed in one kind of round.
NAMED = {
    # The (a): lora::packed labelled at its full length, holding 5 values.
    "packed-labelled-long-holds-5": (("lora", "lora-fp16"), mutate_array(
        "packed", lambda a, v: crafted(v[:5], shape=v.shape))),
    # The (b): a head tensor labelled (2, 3) holding (1, 3), or a 0-d array (broadcast by the mean).
    "head-holds-one-row": (ROUNDS, mutate_array("head", lambda a, v: crafted(v[:1], shape=v.shape))),
    "head-holds-0d": (ROUNDS, mutate_array("head", lambda a, v: crafted(v[0, 0].reshape(()), shape=v.shape))),
    "head-0d-labelled-0d": (ROUNDS, mutate_array("head", lambda a, v: crafted(v[0, 0].reshape(())))),
    "backbone-holds-one-row": (("full-fp16",), mutate_array("backbone", lambda a, v: crafted(v[:1], shape=v.shape))),
    "packed-bytes-truncated": (("lora", "lora-fp16"), mutate_array(
        "packed", lambda a, v: crafted(v, data=a.data[:-7]))),
    "head-bytes-extended": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, data=a.data + b"\0" * 8))),
    "packed-float64-labelled-wire": (("lora", "lora-fp16"), mutate_array(
        "packed", lambda a, v: crafted(v.astype(np.float64), dtype=a.dtype))),
    "head-int32": (ROUNDS, mutate_array("head", lambda a, v: crafted(v.astype(np.int32), dtype=a.dtype))),
    "head-complex": (ROUNDS, mutate_array("head", lambda a, v: crafted(v.astype(np.complex64), dtype=a.dtype))),
    "head-big-endian": (ROUNDS, mutate_array("head", lambda a, v: crafted(v.astype(v.dtype.newbyteorder(">")),
                                                                            dtype=a.dtype))),
    "head-strings": (ROUNDS, mutate_array("head", lambda a, v: crafted(v.astype("<U3"), dtype=a.dtype))),
    "head-objects": (ROUNDS, mutate_array("head", lambda a, v: crafted(v.astype(object), dtype=a.dtype))),
    "head-labelled-float64": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, dtype="float64"))),
    "packed-nan": (("lora", "lora-fp16"), mutate_array("packed", lambda a, v: crafted(np.where(
        np.arange(v.size) == 3, np.nan, v).astype(v.dtype)))),
    "head-inf": (ROUNDS, mutate_array("head", lambda a, v: crafted(np.full_like(v, -np.inf)))),
    "head-labelled-huge": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, shape=(10**20, 10**20)))),
    "head-labelled-negative": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, shape=(-2, -3)))),
    "packed-header-announces-2**40": (("lora", "lora-fp16"), mutate_array(
        "packed", lambda a, v: crafted(v, data=npy_header((2**40,), v.dtype.str) + a.data[-64:]))),
    "head-header-announces-huge-labelled-so": (ROUNDS, mutate_array("head", lambda a, v: Array(
        dtype=a.dtype, shape=(2**31, 2**31), stype=a.stype, data=npy_header((2**31, 2**31), v.dtype.str)))),
    "head-not-npy": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, data=b"not an array"))),
    "head-empty-bytes": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, data=b""))),
    "head-npz": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, data=npz(v)))),
    "head-torch-stype": (ROUNDS, mutate_array("head", lambda a, v: crafted(v, stype="torch.Tensor"))),
    "extra-key": (ROUNDS, mutate_record(lambda r: ArrayRecord({**r, "head::extra": r[head_key(r)]}))),
    "missing-key": (ROUNDS, mutate_record(lambda r: ArrayRecord({k: v for k, v in r.items() if k != head_key(r)}))),
    "no-arrays": (("lora",), mutate_record(lambda r: ArrayRecord())),
    "arrays-not-an-array-record": (("lora",), lambda m: Message(RecordDict({
        "arrays": ConfigRecord({"x": 1}), "metrics": MetricRecord({"num-examples": 10})}), reply_to=m)),
    "empty-content": (("lora",), lambda m: Message(RecordDict(), reply_to=m)),
    "num-examples-missing": (("lora",), with_metrics(MetricRecord({"train-loss": 1.0}))),
    "num-examples-list": (("lora",), with_metrics(MetricRecord({"num-examples": [10, 10]}))),
    "num-examples-nan": (("lora",), with_metrics(MetricRecord({"num-examples": math.nan}))),
    "num-examples-inf": (("lora",), with_metrics(MetricRecord({"num-examples": math.inf}))),
    "num-examples-negative": (("lora",), with_metrics(MetricRecord({"num-examples": -10}))),
    "num-examples-fraction": (("lora",), with_metrics(MetricRecord({"num-examples": 2.5}))),
    "num-examples-beyond-float": (("lora",), with_metrics(MetricRecord({"num-examples": 10**400}))),
    "num-examples-above-max": (("lora",), with_metrics(MetricRecord({"num-examples": 10**9}))),
    "metrics-as-strings": (("lora",), with_metrics(ConfigRecord({"num-examples": "10", "train-loss": "low"}))),
    "metrics-as-bools": (("lora",), with_metrics(ConfigRecord({"num-examples": True}))),
}


def assert_dropped_and_unchanged(kind, strategy, arrays, metrics, caplog, case=""):
    stats = strategy.rounds.current
    assert (stats.replies, stats.dropped) == (1, 1), case
    assert "dropped the training reply of node 22: " in caplog.text, case
    expected, expected_metrics = good_alone(kind)
    got = pl.unpack(arrays)
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected), case
    assert dict(metrics) == expected_metrics, case


def train_with(kind, bad):
    strategy, messages = first_round(kind)
    arrays, metrics = strategy.aggregate_train(1, [reply(messages[0], honest(messages[0], 1)), bad(messages[1])])
    return strategy, arrays, metrics


@pytest.mark.parametrize("kind, case", [(kind, case) for case, (kinds, _) in NAMED.items() for kind in kinds])
def test_a_named_bad_reply_is_dropped_and_leaves_the_model_as_the_good_reply_makes_it(kind, case, caplog):
    strategy, arrays, metrics = train_with(kind, NAMED[case][1])
    assert_dropped_and_unchanged(kind, strategy, arrays, metrics, caplog)


def random_change(rng, wire_dtype):
    """One seeded change of an honest array that makes it unusable, and its description."""
    other_dtypes = [d for d in ("float16", "float32", "float64", "int8", "int64", "bool", "complex128", "<U2")
                    if d != wire_dtype]
    poison = rng.choice([np.nan, np.inf, -np.inf])
    changes = {
        "truncate": lambda a, v: crafted(v, data=a.data[:rng.randrange(len(a.data))]),
        "extend": lambda a, v: crafted(v, data=a.data + rng.randbytes(rng.randrange(1, 65))),
        "relabel-shape": lambda a, v: crafted(v, shape=rng.choice(
            [(v.size + 1,), (1, *v.shape), (), (0,), v.shape[:-1] + (v.shape[-1] * 2,), (2**62, 4)])),
        "relabel-dtype": lambda a, v: crafted(v, dtype=rng.choice(other_dtypes)),
        "real-shape": lambda a, v: crafted(rng.choice(
            [v.reshape(-1)[:rng.randrange(v.size)], v.reshape(-1)[0].reshape(()), np.concatenate([v, v]),
             v.reshape(1, -1), v.reshape(-1, 1)]), shape=v.shape),
        "real-dtype": lambda a, v: crafted(v.astype(rng.choice(other_dtypes)), dtype=a.dtype),
        "poison": lambda a, v: crafted(np.where(np.arange(v.size).reshape(v.shape) == rng.randrange(v.size),
                                                poison, v).astype(v.dtype)),
        "garbage": lambda a, v: crafted(v, data=rng.randbytes(rng.randrange(200))),
        "flip-magic": lambda a, v: crafted(v, data=bytes([a.data[0] ^ 0xFF]) + a.data[1:]),
        "stype": lambda a, v: crafted(v, stype=rng.choice(["", "torch.Tensor", "numpy.ndarray "])),
    }
    name = rng.choice(sorted(changes))
    return name, changes[name]


@pytest.mark.parametrize("seed", range(48))
def test_a_randomly_mutated_reply_is_dropped_and_leaves_the_model_as_the_good_reply_makes_it(seed, caplog):
    rng = random.Random(seed)
    kind = rng.choice(sorted(ROUNDS))
    target = rng.choice(["head", "backbone"] if kind.startswith("full") else ["head", "packed"])
    what, change = random_change(rng, make_strategy(**ROUNDS[kind]).config.wire_dtype)
    strategy, arrays, metrics = train_with(kind, mutate_array(target, change))
    assert_dropped_and_unchanged(kind, strategy, arrays, metrics, caplog, f"{kind}: {what} {target}")


def test_a_sound_reply_in_fortran_order_is_read_as_the_same_values():
    """Control: the checks refuse labels that disagree with the bytes, not sound encodings of the right values."""
    results = []
    for order in ("C", "F"):
        strategy, messages = first_round("lora")
        record = honest(messages[1], 2)
        name = head_key(record)
        values = record[name].numpy()
        bad = with_array(record, name, crafted(np.asarray(values, order=order)))
        arrays, _ = strategy.aggregate_train(1, [reply(messages[0], honest(messages[0], 1)), reply(messages[1], bad)])
        assert strategy.rounds.current.replies == 2
        results.append(pl.unpack(arrays))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_second_reply_to_a_message_and_a_reply_to_no_message_are_dropped(caplog):
    strategy, messages = first_round("lora")
    stranger = Message(RecordDict({"config": messages[1].content["config"]}), dst_node_id=22, message_type="train")
    stranger.metadata.__dict__["_message_id"] = "not-sent-this-round"
    replies = [reply(messages[0], honest(messages[0], 1)),
               reply(messages[0], honest(messages[0], 5), num_examples=300),  # node 11 again, to count twice
               reply(stranger, honest(messages[1], 2))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert "node 11: a second reply to the same message" in caplog.text
    assert "node 22: answers no message of this round" in caplog.text
    assert strategy.rounds.current.replies == 1
    expected, expected_metrics = good_alone("lora")
    assert all(torch.equal(pl.unpack(arrays)[k], expected[k]) for k in expected) and dict(metrics) == expected_metrics


# --- Evaluation replies: metrics of the wrong types ------------------------------------------------------------

def evaluation_with(metrics):
    """A bad evaluation reply: ``metrics`` (a record, or anything else) under ``metrics``."""
    def bad(message):
        node = ConfigRecord({"backbone-hash": message.content["config"].get("backbone-hash", "")})
        return Message(RecordDict({"metrics": metrics, "node": node}), reply_to=message)
    return bad


def sound(**changes):
    return {"num-examples": 10, "accuracy": 0.5, "macro-f1": 0.5, "loss": 0.7, **changes}


EVALUATION = {
    "accuracy-list": evaluation_with(MetricRecord(sound(accuracy=[0.5, 0.5]))),
    "accuracy-nan": evaluation_with(MetricRecord(sound(accuracy=math.nan))),
    "accuracy-above-1": evaluation_with(MetricRecord(sound(accuracy=1.5))),
    "loss-inf": evaluation_with(MetricRecord(sound(loss=math.inf))),
    "loss-beyond-float": evaluation_with(MetricRecord(sound(loss=10**400))),
    "macro-f1-missing": evaluation_with(MetricRecord({k: v for k, v in sound().items() if k != "macro-f1"})),
    "num-examples-beyond-float": evaluation_with(MetricRecord(sound(**{"num-examples": 10**400}))),
    "num-examples-list": evaluation_with(MetricRecord(sound(**{"num-examples": [10]}))),
    "metrics-as-strings": evaluation_with(ConfigRecord({k: str(v) for k, v in sound().items()})),
    "metrics-as-bools": evaluation_with(ConfigRecord({k: True for k in sound()})),
    "no-metrics": evaluation_with(ConfigRecord()),
    "empty-content": lambda m: Message(RecordDict(), reply_to=m),
}


@pytest.mark.parametrize("case", sorted(EVALUATION))
def test_a_bad_evaluation_reply_is_dropped_and_the_others_count(case, caplog):
    strategy = make_strategy(fraction_evaluate=1.0)
    strategy.rounds = RoundLog()
    sent = send(strategy, 1, initial(strategy))
    arrays, _ = strategy.aggregate_train(1, [reply(m, honest(m, i)) for i, m in enumerate(sent)])
    messages = evaluate_round(strategy, 1, arrays, (11, 22))
    metrics = strategy.aggregate_evaluate(1, [evaluation_reply(messages[0], 30, 0.6, 0.5, 0.9),
                                              EVALUATION[case](messages[1])])
    stats = strategy.rounds.current
    assert (stats.eval_replies, stats.eval_dropped, stats.eval_rows) == (1, 1, 30)
    assert "dropped the evaluation reply of node 22: " in caplog.text
    assert dict(metrics) == pytest.approx({"fed-accuracy": 0.6, "fed-macro-f1": 0.5, "fed-loss": 0.9, "eval-rows": 30})
