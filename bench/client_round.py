"""One ClientApp round in a fresh process, as a SuperNode runs it in deployment: time and peak memory.

    python bench/client_round.py [--data-path FILE] [--profile default|low-memory] [--rounds N]

The parent builds round 1's real message with the app's strategy (LoRA at rank-max) and writes it
to a temp dir; each round then runs in a *fresh* Python process that imports the ClientApp, loads
what it needs and trains, reporting import / load / train seconds and the process's peak RSS.
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

PROFILES = {
    "default": {},
    # --node-config of a 1 GB edge board: short sequences, small batches, one thread, batch 16 by accumulation.
    "low-memory": {"batch-size": 4, "grad-accum-steps": 4, "max-seq-len": 48, "torch-threads": 1},
}


def build_message(workdir: Path, run_config: dict) -> None:
    """Round 1's payload for one node, as the server would send it."""
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import save_file

    from safedlora_app.core import payload as pl
    from safedlora_app.core.config import RunConfig
    from safedlora_app.core.data import SENTIMENTS
    from safedlora_app.core.model import adapted_modules, full_state, head_parameters, load_base_model, module_shapes
    from safedlora_app.core.round_plan import initial_tensors
    from safedlora_app.server.strategy import SAFedLoRA

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

    message = list(strategy.configure_train(1, pl.pack(initial_tensors(config.effective, state)),
                                            ConfigRecord({"label-names": list(SENTIMENTS)}), OneNode()))[0]
    save_file({k: v.contiguous() for k, v in pl.unpack(message.content["arrays"]).items()}, str(workdir / "arrays.st"))
    (workdir / "config.json").write_text(json.dumps(dict(message.content["config"])))


def child(workdir: Path, run_config: dict, node_config: dict) -> dict:
    """Runs in the fresh process: import, rebuild the message, call the ClientApp's train handler."""
    start = time.perf_counter()
    import resource

    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file

    from safedlora_app.client_app import train_handler
    from safedlora_app.core import payload as pl
    imported = time.perf_counter()
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    content = RecordDict({"arrays": pl.pack(load_file(str(workdir / "arrays.st"))),
                          "config": ConfigRecord(json.loads((workdir / "config.json").read_text()))})
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    reply = train_handler(message, context)
    done = time.perf_counter()
    metrics = reply.content["metrics"]
    return {"import-seconds": imported - start, "round-seconds": done - imported,
            "train-seconds": metrics["train-time"], "num-examples": metrics["num-examples"],
            "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default="", help="node-local csv/json/parquet (default: a partition)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes to run (the first fills caches)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import tomllib
    defaults = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    run_config = defaults["tool"]["flwr"]["app"]["config"]
    node_config = {"data-path": args.data_path} if args.data_path else {"partition-id": 0, "num-partitions": 2}
    node_config.update(PROFILES[args.profile])  # a node's own profile, as --node-config sets it
    if args.child:
        print(json.dumps(child(Path(args.child), run_config, node_config)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run_config = {**run_config, "cache-dir": str(workdir / "cache")}
        build_message(workdir, run_config)
        for index in range(args.rounds):
            command = [sys.executable, __file__, "--child", str(workdir), "--profile", args.profile,
                       "--data-path", args.data_path]
            wall = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode:
                sys.exit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["process-wall-seconds"] = time.perf_counter() - wall
            rounded = {k: round(v, 2) for k, v in result.items()}
            print(json.dumps({"round": index + 1, "profile": args.profile, **rounded}))


if __name__ == "__main__":
    main()
