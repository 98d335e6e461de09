"""`tw`: the command line of Training Wheels.

    tw train --config configs/synthetic.json     # phase 1 + phase 2 (+ checkpoint selection)
    tw train --algo ppo --config ...              # the PPO ablation
    tw eval  --config ...                         # quality, teacher use, latency of every method
    tw plot  --results DIR                        # operating-point plots and the token view
    tw gkd   --config ...                         # DistillSpec's draft model (GKD), for the baseline
    tw co-llm --config ...                        # Co-LLM's deferral router, for the router baseline
    tw bench-env ... | tw bench-decode ...        # speed benchmarks (docs/benchmarks.md)
    tw bench-parallel ...                         # data-parallel training throughput (docs/benchmarks.md)
    tw bench-train ...                            # BC, PCL and GKD steps against their floor (docs/benchmarks.md)
    tw train-mt --config configs/deen-models.json # a de-en teacher and student from scratch (real text)

Each subcommand has one typed config (a dataclass) that ``--config FILE.json`` and flags set;
``tw COMMAND --help`` lists its flags. A command prints its own short ending (a table, where its
files are); what it returns is written to its files (e.g. ``summary.json``), not printed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, config class, entry function)
COMMANDS = {
    "train": ("agents.train", "TrainConfig", "run"),
    "train-ppo": ("agents.ppo", "PPOConfig", "run"),
    "gkd": ("agents.gkd", "GKDConfig", "run"),
    "co-llm": ("agents.co_llm", "CoLLMConfig", "run"),
    "eval": ("scripts.evaluate", "EvalConfig", "run"),
    "plot": ("scripts.plot", "PlotConfig", "run"),
    "bench-env": ("scripts.bench_env", "BenchEnvConfig", "run"),
    "bench-decode": ("scripts.bench_decode", "BenchDecodeConfig", "run"),
    "bench-parallel": ("scripts.bench_parallel", "BenchParallelConfig", "run"),
    "bench-train": ("scripts.bench_train", "BenchTrainConfig", "run"),
    "train-mt": ("scripts.train_translation", "TranslationConfig", "run"),
}

# subcommand -> what it does, for `tw --help` and `tw COMMAND --help`.  Written here rather than
# taken from the config classes' docstrings, which describe the configs (and can be shared).
HELP = {
    "train": "Train the student: phase 1 (behaviour cloning of the KL-ranked oracle), then phase 2 "
             "(PCL with one Lagrange multiplier per budget) and checkpoint selection on validation.",
    "train-ppo": "The PPO ablation of phase 2 (Stable-Baselines3 PPO on the Eq. 17 reward with "
                 "per-budget λ); the same as `tw train --algo ppo`.",
    "gkd": "Distil the student with GKD: DistillSpec's draft model, the baseline's draft for lossy "
           "speculative decoding (`tw eval` uses it).",
    "co-llm": "Train Co-LLM's deferral router (a baseline for `tw eval`): P(the teacher writes token t) from "
              "the student's states, by the marginal likelihood of the reference outputs.",
    "eval": "Quality, teacher use, wasted tokens and latency of every method on held-out data.",
    "plot": "Operating-point plots (quality vs teacher use) and the token view from `tw eval` results.",
    "bench-env": "Speed benchmark: vector-env steps/s against the teacher's own generate "
                 "(docs/benchmarks.md).",
    "bench-decode": "Speed benchmark: decode latency (batch 1) and batched throughput of Training "
                    "Wheels against its neighbours (docs/benchmarks.md).",
    "bench-parallel": "Speed benchmark: phase-2 and GKD tokens/s with 1 process against N data-parallel "
                      "processes on the same cores (docs/benchmarks.md).",
    "bench-train": "Speed benchmark: a BC, a PCL and a GKD batch against their floor, the same forward and "
                   "backward passes as plain transformers calls, per model pair (docs/benchmarks.md).",
    "train-mt": "Train a translation teacher and a smaller student from scratch on parallel JSON-lines text, "
                "with a tokenizer trained on it (resumable; real-text models for TrainingWheels-WMT19-v0).",
}


def main(argv: list[str] | None = None) -> int:
    from agents.config import add_config_arguments, config_from_namespace
    from agents.run import reuse_freed_memory

    reuse_freed_memory()  # results unchanged, the passes over large tensors faster (agents.run; docs/benchmarks.md)

    argv = list(sys.argv[1:] if argv is None else argv)
    # `tw train --algo ppo` is the PPO ablation.  `tw bench env` is still accepted for bench-env
    # (and `tw bench decode` for bench-decode); the documented spelling is the subcommand's.
    if argv[:1] == ["train"] and "--algo" in argv:
        i = argv.index("--algo")
        algo = argv[i + 1] if i + 1 < len(argv) else ""
        if algo not in ("pcl", "ppo"):
            print(f"tw train: --algo must be 'pcl' or 'ppo', got {algo!r}", file=sys.stderr)
            return 2
        del argv[i : i + 2]
        if algo == "ppo":
            argv[0] = "train-ppo"
    if argv[:1] == ["bench"] and argv[1:2] in (["env"], ["decode"]):
        argv = [f"bench-{argv[1]}"] + argv[2:]
    parser = argparse.ArgumentParser(prog="tw", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, cls_name, _) in COMMANDS.items():
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError):
            continue  # an optional command whose dependencies are missing
        add_config_arguments(sub.add_parser(name, help=HELP[name], description=HELP[name]), cls)
    args = parser.parse_args(argv)
    module, cls_name, entry = COMMANDS[args.command]
    mod = importlib.import_module(module)
    try:
        config = config_from_namespace(getattr(mod, cls_name), args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    getattr(mod, entry)(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
