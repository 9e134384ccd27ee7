"""``covidscan serve``: the REST API on uvicorn (or Ray Serve with ``--ray-address``)."""
from __future__ import annotations

import argparse

from covidscan.errors import CovidscanError


def register(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve the REST API (FastAPI; docs at /docs)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: loopback only; set an API key before exposing it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--model", action="append", metavar="NAME_OR_PATH",
                        help="a model to serve, by name or bundle path (repeatable; default: every available model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--max-files", type=int, default=32, help="most files per predict request")
    parser.add_argument("--max-file-mb", type=int, default=64, help="largest file accepted, in MiB")
    ray = parser.add_argument_group("Ray Serve (pip install 'covidscan[ray]')")
    ray.add_argument("--ray-address", help="deploy on this Ray cluster (e.g. 127.0.0.1:6379) instead of uvicorn")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (fixed count; default 1)")
    ray.add_argument("--min-replicas", type=int, default=1, help="autoscaling lower bound (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling upper bound (turns autoscaling on)")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs reserved per replica")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs reserved per replica")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from covidscan.serve.app import create_app
    from covidscan.serve.models import ModelRegistry, resolve_models

    if not 0 < args.port < 65536:
        raise CovidscanError(f"--port must be between 1 and 65535, not {args.port}.")
    models = resolve_models(args.model)
    if not models:
        raise CovidscanError("No model to serve: install a shipped model in weights/ or pass --model PATH.")
    if args.ray_address:
        from covidscan.serve.models import env_api_key
        from covidscan.serve.ray_app import run_on_ray

        # Paths, so every replica loads exactly the bundles checked here.
        run_on_ray(args.ray_address, args.host, args.port, models=[str(m.path) for m in models],
                   num_replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                   num_cpus=args.cpus_per_replica, num_gpus=args.gpus_per_replica, device=args.device,
                   max_files=args.max_files, max_file_bytes=args.max_file_mb * 1024 * 1024, api_key=env_api_key())
        return 0
    registry = ModelRegistry({m.name: m for m in models}, device=args.device)
    app = create_app(registry, max_files=args.max_files, max_file_bytes=args.max_file_mb * 1024 * 1024)
    print(f"covidscan API on http://{args.host}:{args.port} (docs: /docs) serving {', '.join(registry.models)}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
