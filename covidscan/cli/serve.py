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
    registry = ModelRegistry({m.name: m for m in models}, device=args.device)
    app = create_app(registry, max_files=args.max_files, max_file_bytes=args.max_file_mb * 1024 * 1024)
    print(f"covidscan API on http://{args.host}:{args.port} (docs: /docs) serving {', '.join(registry.models)}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
