"""``covidscan app``: start the Streamlit app with its heavy imports and default models already loaded.

``streamlit run app.py`` imports PyTorch, torchvision and pytorch-grad-cam and loads the model
during the first visitor's page runs (seconds of waiting after the first upload). This launcher
does all of that first, in the same process, and only then starts Streamlit's server (through
Streamlit's own bootstrap), so its health check turns OK when the app can answer at once.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from covidscan.errors import CovidscanError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    parser = subparsers.add_parser("app", help="start the Streamlit app, preloaded (answers the first upload at once)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    parser.add_argument("--script", help="the app's main script (default: app.py of this checkout or the folder)")
    parser.add_argument("--no-preload", action="store_true", help="start at once and load on the first visit")
    parser.set_defaults(func=run)


def find_app_script(script: str | None = None) -> Path:
    """The Streamlit main script: ``script``, else app.py beside the package, else in the current folder."""
    candidates = [Path(script)] if script else [Path(__file__).resolve().parents[2] / "app.py", Path.cwd() / "app.py"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise CovidscanError(f"No Streamlit app script at {', '.join(map(str, candidates))}; pass --script PATH.")


def preload(script: Path) -> list[str]:
    """Import what the pages import and load every available model into the app's model cache.

    Args:
        script: the app's main script; its folder holds ``app_pages`` (Streamlit puts it on
            ``sys.path`` too, so the pages then import the very modules loaded here).

    Returns:
        The names of the models loaded (a model that fails to load is left to the page to report).
    """
    import importlib
    import sys

    import pytorch_grad_cam  # noqa: F401 - the first Grad-CAM would import it
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    from covidscan import report  # noqa: F401 - the Predict page's modules
    from covidscan.serve.models import available_models

    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    ui = importlib.import_module("app_pages.ui")

    loaded = []
    for model in available_models():
        try:
            # The same st.cache_resource the Predict page calls: its entry is what the first visitor gets.
            ui.load_predictor(str(model.path), model.card.weights_sha256)
            loaded.append(model.name)
        except CovidscanError as exc:
            log.warning("Could not preload %s: %s", model.name, exc)
    return loaded


def run(args: argparse.Namespace) -> int:
    from streamlit.web import bootstrap

    if not 0 < args.port < 65536:
        raise CovidscanError(f"--port must be between 1 and 65535, not {args.port}.")
    script = find_app_script(args.script)
    if not args.no_preload:
        started = time.perf_counter()
        names = _quietly(lambda: preload(script))
        print(f"covidscan app: preloaded {', '.join(names) or 'no models'} in {time.perf_counter() - started:.1f} s",
              flush=True)
    flag_options = {"server.port": args.port, "server.address": args.host, "server.headless": True,
                    "browser.gatherUsageStats": False}
    bootstrap.load_config_options(flag_options=flag_options)
    bootstrap.run(str(script), False, [], flag_options)
    return 0


def _quietly(function):
    """Run ``function`` with Streamlit's 'no script run context' warnings silenced (expected here)."""
    logger = logging.getLogger("streamlit.runtime.scriptrunner_utils.script_run_context")
    caching = logging.getLogger("streamlit.runtime.caching.cache_data_api")
    levels = logger.level, caching.level
    logger.setLevel(logging.ERROR)
    caching.setLevel(logging.ERROR)
    try:
        return function()
    finally:
        logger.setLevel(levels[0])
        caching.setLevel(levels[1])
