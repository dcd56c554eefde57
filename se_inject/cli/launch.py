"""``--nproc N``: the same command in N processes through torch's elastic launcher (torchrun's engine)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from pathlib import Path

import typer

from se_inject.errors import first_line


def worker_arguments(argv: list[str]) -> list[str]:
    """The command line without ``--nproc N`` / ``--nproc=N`` (each worker is one process)."""
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip or arg == "--nproc":
            skip = not skip
            continue
        if not arg.startswith("--nproc="):
            args.append(arg)
    return args


def launch_torchrun(nproc: int, device: str) -> int:
    """Run this same command in ``nproc`` processes; the exit code of the whole.

    The arguments go to the workers untouched: torchrun's own command line would mistake options such
    as ``--r`` for abbreviations of its own. The workers' stderr goes to files: a failing worker's
    one-line error is printed once (not once per worker, not with the launcher's report), and on
    success the first worker's warnings are shown.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if device != "cuda":
        os.environ["SE_INJECT_BACKEND"] = "gloo"
    launcher_log = logging.getLogger("torch.distributed.elastic")
    level = launcher_log.level
    launcher_log.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="se_inject_workers_") as logs:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=nproc,
            run_id=str(uuid.uuid4()),
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            max_restarts=0,
            monitor_interval=0.2,
            logs_specs=DefaultLogsSpecs(log_dir=logs, redirects=Std.ERR),
        )
        failure: Exception | None = None
        try:
            elastic_launch(config, sys.executable)("-m", "se_inject", *worker_arguments(sys.argv[1:]))
        except Exception as err:
            failure = err
        finally:
            launcher_log.setLevel(level)
        by_rank = {
            int(f.parent.name): f.read_text(errors="replace").splitlines()
            for f in Path(logs).rglob("stderr.log")
            if f.parent.name.isdigit()
        }
    return _report(failure, by_rank)


def _report(failure: Exception | None, by_rank: dict[int, list[str]]) -> int:
    if failure is None:
        for line in by_rank.get(0, []):
            if line.startswith("se-inject: warning: "):
                typer.echo(line, err=True)
        return 0
    errors = [line for rank in sorted(by_rank) for line in by_rank[rank] if line.startswith("se-inject: error: ")]
    typer.echo(errors[0] if errors else f"se-inject: error: a worker process failed ({first_line(failure)})", err=True)
    return 2


def is_first_process() -> bool:
    """Under torchrun only the first process reports (the rank is the process group's, as the run's)."""
    from se_inject.runtime import rank_and_world

    return rank_and_world()[0] == 0
