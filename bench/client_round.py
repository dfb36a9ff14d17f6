"""One ClientApp round in a fresh process, as a SuperNode runs it in deployment: time and peak memory.

    python bench/client_round.py [--data-path FILE] [--profile default|low-memory] [--rounds N]
                                 [--set KEY=VALUE ...] [--op-profile N]

The parent builds round 1's real message with the app's strategy (LoRA at rank-max) and writes it
to a temp dir; each round then runs in a *fresh* Python process that imports the ClientApp, loads
what it needs and trains. It reports each step's seconds (imports, the base model, the node's data,
the LoRA set-up and reply around training, training), seconds per training sample, and the process's
peak RSS. ``--set`` overrides run-config keys (``--set local-samples=8 --set "precision='fp32'"``), as
``flwr run --run-config`` would; ``--op-profile N`` prints the N torch ops that took the most time. An
emulated arm64 node runs it in its rootfs (``scripts/arm64-node.sh ROOTFS run python bench/client_round.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safedlora_app.core.profiles import LOW_MEMORY_NODE

PROFILES = {"default": {}, "low-memory": LOW_MEMORY_NODE}  # a node's --node-config


def build_message(workdir: Path, run_config: dict) -> None:
    """Round 1's payload for one node, as the server would send it."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import save_file

    from safedlora_app.core import payload as pl
    from safedlora_app.core.config import RunConfig
    from safedlora_app.core.data import SENTIMENTS
    from safedlora_app.core.model import adapted_modules, full_state, head_parameters, module_shapes
    from safedlora_app.core.round_plan import initial_tensors
    from safedlora_app.server.dispatch import NodeLimits
    from safedlora_app.server.strategy import SAFedLoRA
    from safedlora_app.tasks import load_base_model

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    config = RunConfig.from_mapping(run_config)
    base = load_base_model(config.model_name, config.task, SENTIMENTS, seed=config.seed)
    heads = head_parameters(base, ["classifier"])
    modules = adapted_modules(base, config.module_names(config.target_modules), ["classifier"])
    state = full_state(base, heads)
    strategy = SAFedLoRA(config.effective, module_shapes(base, modules), {k: tuple(v.shape) for k, v in state.items()})

    class OneNode:
        def get_node_ids(self):
            return [1, 2]

    strategy.node_limits = dict.fromkeys(OneNode().get_node_ids(), NodeLimits(max_rank=0, name=""))  # no query

    message = list(strategy.configure_train(1, pl.pack(initial_tensors(config.effective, state)),
                                            ConfigRecord({"label-names": list(SENTIMENTS)}), OneNode()))[0]
    save_file({k: v.contiguous() for k, v in pl.unpack(message.content["arrays"]).items()}, str(workdir / "arrays.st"))
    (workdir / "config.json").write_text(json.dumps(dict(message.content["config"])))


def child(workdir: Path, run_config: dict, node_config: dict, op_profile: int = 0) -> dict:
    """Runs in the fresh process: import, rebuild the message, call the ClientApp's train handler."""
    start = time.perf_counter()
    import resource

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file

    from safedlora_app.client.node_resources import MODELS, node_resources
    from safedlora_app.client.rounds import train_reply  # noqa: F401  (imported here: counted as import time)
    from safedlora_app.client_app import train_handler
    from safedlora_app.core import payload as pl
    from safedlora_app.core.config import RunConfig
    from safedlora_app.tasks import load_base_model
    imported = time.perf_counter()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    round_config = json.loads((workdir / "config.json").read_text())
    # The handler loads model and data itself (node_resources, cached per process): load them first, one
    # after the other, to time each; the handler then finds both cached, as in a later round of one process.
    config = RunConfig.from_mapping(run_config).with_node_config(node_config).effective
    if config.torch_threads:  # as the handler sets them, so that every step runs on the node's threads
        import torch
        torch.set_num_threads(config.torch_threads)
    labels = tuple(round_config["label-names"])
    MODELS.get_or_load((config.model_name, config.task, labels, config.seed),
                       lambda: load_base_model(config.model_name, config.task, labels, seed=config.seed))
    model_loaded = time.perf_counter()
    node_resources(config, node_config, labels)
    data_loaded = time.perf_counter()
    content = RecordDict({"arrays": pl.pack(load_file(str(workdir / "arrays.st"))),
                          "config": ConfigRecord(round_config)})
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    if op_profile:  # torch's own profile of the round (its overhead inflates setup-seconds), to stderr
        import torch.profiler
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            reply = train_handler(message, context)
        print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=op_profile), file=sys.stderr)
    else:
        reply = train_handler(message, context)
    done = time.perf_counter()
    metrics = reply.content["metrics"]
    return {"import-seconds": imported - start, "model-seconds": model_loaded - imported,
            "data-seconds": data_loaded - model_loaded, "setup-seconds": done - data_loaded - metrics["train-time"],
            "train-seconds": metrics["train-time"], "num-examples": metrics["num-examples"],
            "seconds-per-sample": metrics["train-time"] / max(metrics["num-examples"], 1),
            "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="", help="node-local csv/json/parquet (default: a partition)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes to run (the first fills caches)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override in TOML syntax, e.g. local-samples=8 or precision='fp32'")
    parser.add_argument("--op-profile", type=int, default=0, metavar="N",
                        help="print the N torch ops with the most self CPU time in each round (to stderr)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.op_profile < 0:
        parser.error(f"--op-profile {args.op_profile}: give a number of ops >= 1, or 0 for none")

    import tomllib
    defaults = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    run_config = defaults["tool"]["flwr"]["app"]["config"]
    overrides = {}
    for item in args.set:
        try:
            override = tomllib.loads(item)
        except tomllib.TOMLDecodeError as error:
            parser.error(f"--set {item!r} is not KEY=VALUE in TOML syntax (strings quoted): {error}")
        unknown = sorted(set(override) - set(run_config))
        if unknown:
            parser.error(f"--set {item!r}: unknown run-config key {unknown[0]!r}; the keys are pyproject.toml's")
        overrides.update(override)
    run_config.update(overrides)
    node_config = {"data-path": args.data_path} if args.data_path else {"partition-id": 0, "num-partitions": 2}
    node_config.update(PROFILES[args.profile])  # a node's own profile, as --node-config sets it
    node_config.update({k: v for k, v in overrides.items() if k in node_config})  # --set wins over the profile
    if args.child:
        print(json.dumps(child(Path(args.child), run_config, node_config, args.op_profile)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run_config = {**run_config, "cache-dir": str(workdir / "cache")}
        build_message(workdir, run_config)
        for index in range(args.rounds):
            command = [sys.executable, __file__, "--child", str(workdir), "--profile", args.profile,
                       "--data-path", args.data_path, "--op-profile", str(args.op_profile),
                       *(f"--set={item}" for item in args.set)]
            wall = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            if args.op_profile and "-----" in out.stderr:
                print(out.stderr[out.stderr.index("-----"):], file=sys.stderr)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["process-wall-seconds"] = time.perf_counter() - wall
            rounded = {k: round(v, 4 if k == "seconds-per-sample" else 2) for k, v in result.items()}
            print(json.dumps({"round": index + 1, "profile": args.profile, **rounded}))


if __name__ == "__main__":
    main()
