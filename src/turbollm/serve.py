"""`python -m turbollm.serve`: one rank of a torchrun launch, on one host or several
(docs/distributed.md, "Multi-node launch").

Every rank runs this module with the same flags as `turbollm serve`, and
--tensor-parallel-size x --pipeline-parallel-size must equal torchrun's WORLD_SIZE. Rank 0
serves HTTP, with the engine (the one scheduler) over the torchrun executor
(executor/torchrun.py), and is a worker rank itself; every other rank loads its slice of the
model and runs rank 0's calls (executor/torchrun_rank.py) until rank 0 shuts down or is lost.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from turbollm.cli_errors import run_reporting_errors
from turbollm.executor.torchrun_rank import check_world, launch_env, serve_rank
from turbollm.server.cli import SERVE_DESCRIPTION, add_serve_args, run_serve, serve_engine_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m turbollm.serve",
                                description="One rank of a torchrun launch. "
                                            + SERVE_DESCRIPTION)
    p.add_argument("--log-level", default="INFO")
    add_serve_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run this process's rank; its exit code (2: bad flags or launch, 1: a rank was lost)."""
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(levelname)s rank{rank} %(name)s: %(message)s")

    def run() -> int:
        env = launch_env()
        config = serve_engine_config(args)
        check_world(config, env)  # every rank refuses a mismatch before joining anything
        if env.rank == 0:
            return run_serve(args, launcher="torchrun")
        config.parallel.launcher = "torchrun"
        return serve_rank(config, env)
    return run_reporting_errors(run, f"turbollm.serve (rank {rank})")


if __name__ == "__main__":
    code = main()
    if os.environ.get("RANK", "0") == "0":
        sys.exit(code)  # rank 0 exits normally: its executor's finalizer tells the others
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip teardown: torch's threads and a broken gloo group can hang it
