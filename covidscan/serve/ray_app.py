"""The REST API as a Ray Serve deployment: the same FastAPI app, in replicas across a Ray cluster.

Each replica builds the app itself (:func:`covidscan.serve.app.create_app`) and loads its models
before it takes traffic, so a scaled-up replica never answers 503. Requires ``ray[serve]``
(``pip install "covidscan[ray]"``). Started by ``covidscan serve --ray-address ADDRESS`` or, for a
Serve config file, with ``import_path: covidscan.serve.ray_app:app_builder`` and these options as ``args``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

DEPLOYMENT_NAME = "covidscan"
APP_NAME = "covidscan"


@dataclass
class RayServeOptions:
    """How the API is deployed on Ray Serve.

    Attributes:
        models: model names or bundle paths (None: every available model); paths must exist on every node.
        num_replicas: fixed replica count (ignored when ``max_replicas`` asks for autoscaling).
        num_cpus, num_gpus: resources reserved per replica.
        min_replicas, max_replicas: autoscaling bounds; autoscaling is on when ``max_replicas`` is set.
        target_ongoing_requests: requests per replica the autoscaler aims for.
        device: ``cpu``, ``cuda`` or ``auto`` for each replica's models.
        max_files, max_file_bytes: request limits (as for uvicorn).
    """

    models: list[str] | None = None
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_replicas: int = 1
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    device: str = "cpu"
    max_files: int = 32
    max_file_bytes: int = 64 * 1024 * 1024
    api_key: str | None = field(default=None, repr=False)


def build(**options):
    """A bound Ray Serve application of the API (``serve.run(build(...))``, or a config's import_path).

    Args:
        options: the fields of :class:`RayServeOptions`.

    Returns:
        The bound deployment, ready for ``serve.run``.
    """
    from ray import serve

    settings = RayServeOptions(**options)
    config = asdict(settings)

    def build_app():
        # Runs on each replica: load the models there, then serve the same FastAPI app as uvicorn does.
        from covidscan.serve.app import create_app
        from covidscan.serve.models import ModelRegistry, resolve_models

        registry = ModelRegistry({m.name: m for m in resolve_models(config["models"])}, device=config["device"])
        registry.load_all()
        return create_app(registry, api_key=config["api_key"], max_files=config["max_files"],
                          max_file_bytes=config["max_file_bytes"], load_on_startup=False)

    deployment_options: dict = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus},
    }
    if settings.max_replicas is not None:
        deployment_options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests}
    else:
        deployment_options["num_replicas"] = settings.num_replicas
    deployment = serve.deployment(serve.ingress(build_app)(), **deployment_options)
    return deployment.bind()


def run_on_ray(address: str, host: str, port: int, **options) -> None:
    """Deploy the API on the Ray cluster at ``address``, with Serve's HTTP proxy on ``host:port``; blocks.

    Ctrl+C removes the application from the cluster (the cluster itself keeps running).
    """
    import ray
    from ray import serve

    ray.init(address=address, logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(**options), name=APP_NAME, route_prefix="/", blocking=False)
    print(f"covidscan API on Ray Serve at http://{host}:{port} (docs: /docs)", flush=True)
    try:
        import threading

        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)


def app_builder(args: dict):
    """The application builder for a Serve config file (``import_path: covidscan.serve.ray_app:app_builder``).

    Args:
        args: the config's ``args``: fields of :class:`RayServeOptions`.

    Returns:
        The bound deployment.
    """
    return build(**(args or {}))
