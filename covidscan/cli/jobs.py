"""``covidscan jobs``: submit, list, inspect, follow and cancel training jobs.

    covidscan jobs submit --name ct-1 -- --dataset folder --root data/ct --arch tiny_cnn --epochs 1
    covidscan jobs list --json
    covidscan jobs status JOB_ID --json
    covidscan jobs logs JOB_ID --follow
    covidscan jobs cancel JOB_ID

Jobs run outside this command (a local process, or a Ray cluster with ``--ray-address``); the
runner picks each job's run directory, so the train arguments need no ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", help="job database folder (default: $COVIDSCAN_STATE_DIR or the user data dir)")
    common.add_argument("--ray-address", help="run jobs on this Ray cluster, e.g. http://head:8265 "
                        "(default: $COVIDSCAN_RAY_ADDRESS; none = local processes)")
    common.add_argument("--concurrency", type=int, help="local jobs that may run at once (default 1)")
    return common


def register(subparsers) -> None:
    parser = subparsers.add_parser("jobs", help="training jobs that run in the background (local or Ray)")
    commands = parser.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND")
    common = _common_options()
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])

    submit = commands.add_parser("submit", parents=[common], help="queue a `covidscan train` run; prints its id",
                                 usage="covidscan jobs submit [--name NAME] [--gpus N] -- TRAIN_ARGUMENTS...")
    submit.add_argument("--name", help="a label for the job")
    submit.add_argument("--gpus", type=float, help="Ray: GPUs the job reserves (default $COVIDSCAN_RAY_GPUS or 0)")
    submit.add_argument("train_args", nargs=argparse.REMAINDER, help="`covidscan train` arguments, after --")
    submit.set_defaults(func=run_submit)

    listing = commands.add_parser("list", parents=[common], help="list jobs, oldest first")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    listing.set_defaults(func=run_list)

    status = commands.add_parser("status", parents=[common], help="one job's state, progress and latest metrics")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print a JSON object")
    status.set_defaults(func=run_status)

    logs = commands.add_parser("logs", parents=[common], help="print a job's training log")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(func=run_logs)

    cancel = commands.add_parser("cancel", parents=[common], help="stop a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--no-wait", action="store_true", help="return at once instead of waiting for it to stop")
    cancel.add_argument("--json", action="store_true", help="print the job as a JSON object")
    cancel.set_defaults(func=run_cancel)


def _runner(args: argparse.Namespace, num_gpus: float | None = None):
    from covidscan.jobs import get_runner

    return get_runner(state_dir=args.state_dir, ray_address=args.ray_address, concurrency=args.concurrency,
                      num_gpus=num_gpus)


def run_submit(args: argparse.Namespace) -> int:
    from covidscan.errors import JobError

    train_args = list(args.train_args)
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    if not train_args:
        raise JobError("Give the `covidscan train` arguments after --, e.g. "
                       "`covidscan jobs submit -- --dataset folder --root DATA --epochs 3`.")
    record = _runner(args, num_gpus=args.gpus).submit(train_args, name=args.name)
    print(record.id)
    return 0


def run_list(args: argparse.Namespace) -> int:
    records = _runner(args).list()
    if args.json:
        print(json.dumps([record.to_dict() for record in records], indent=2))
        return 0
    if not records:
        print("No jobs.")
        return 0
    print(f"{'ID':<23} {'STATUS':<10} {'CREATED':<26} NAME")
    for record in records:
        print(f"{record.id:<23} {record.status:<10} {record.created:<26} {record.name}")
        if record.error and record.status == "failed":
            print(f"{'':<23} {record.error}")
    return 0


def _status_dict(runner, job_id: str) -> dict[str, Any]:
    record = runner.get(job_id)
    metrics = runner.metrics(job_id)
    data = record.to_dict()
    data["progress"] = runner.progress(job_id)
    data["last_metrics"] = metrics[-1] if metrics else None
    data["model_dir"] = str(record.model_dir) if (record.model_dir / "card.json").is_file() else None
    return data


def run_status(args: argparse.Namespace) -> int:
    data = _status_dict(_runner(args), args.job_id)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"{data['id']}  {data['name']}\n  status:  {data['status']}")
    if data["error"]:
        print(f"  reason:  {data['error']}")
    progress = data["progress"] or {}
    if progress and data["status"] == "running":
        eta = progress.get("eta_seconds")
        print(f"  epoch:   {progress.get('epoch')}/{progress.get('epochs')}, step {progress.get('step')}"
              + (f", about {eta:.0f} s left" if isinstance(eta, (int, float)) else ""))
    if data["last_metrics"]:
        shown = {k: v for k, v in data["last_metrics"].items() if k.startswith("val_") and v is not None}
        print("  latest:  " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    print(f"  run dir: {data['run_dir']}")
    if data["model_dir"]:
        print(f"  model:   {data['model_dir']}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    runner = _runner(args)
    if not args.follow:
        sys.stdout.write(runner.logs(args.job_id))
        return 0
    for chunk in runner.follow_logs(args.job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    runner = _runner(args)
    before = runner.get(args.job_id)
    if before.done:
        record = before
        message = f"Job {record.id} had already ended ({record.status}); nothing to cancel."
    else:
        grace = getattr(runner, "grace_seconds", 10.0)
        record = runner.cancel(args.job_id, wait=0.0 if args.no_wait else grace + 10.0)
        message = (f"Job {record.id} is {record.status}." if record.done
                   else f"Job {record.id}: asked to stop; it is still {record.status}.")
    if args.json:
        print(json.dumps(record.to_dict(), indent=2))
    else:
        print(message)
    return 0
