"""The covidscan REST API (FastAPI): health, the model list, prediction and Grad-CAM explanation.

Records are built by :mod:`covidscan.records`, the code behind ``covidscan predict --json``, so
the API and the command line answer with the same keys. Uploads stay in memory and nothing about
them (bytes, file names, DICOM headers) is logged; the request log holds only paths and counts.
Research and teaching use only: not a medical device.
"""
from __future__ import annotations

import base64
import io
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from starlette.formparsers import MultiPartParser

from covidscan import __version__
from covidscan.errors import CovidscanError, ImageReadError
from covidscan.records import error_record, predict_records, prediction_record
from covidscan.serve.models import ModelRegistry, ServedModel, env_api_key

log = logging.getLogger("covidscan.serve")

MAX_FILES = 32
MAX_FILE_BYTES = 64 * 1024 * 1024
API_KEY_HEADER = "X-API-Key"
RESEARCH_NOTE = "Research and teaching use only: not a medical device, not for diagnosis."


class BodyLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413, before it is parsed.

    Checks Content-Length first, and counts the bytes of a chunked body as they arrive.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        received = 0
        started = False

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(self.max_bytes)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse({"detail": f"The request is larger than {max_bytes // (1024 * 1024)} MiB."}, status_code=413)


def create_app(registry: ModelRegistry, *, api_key: str | None = None, max_files: int = MAX_FILES,
               max_file_bytes: int = MAX_FILE_BYTES, load_on_startup: bool = True) -> FastAPI:
    """The FastAPI application over ``registry``'s models.

    Args:
        registry: the served models (:func:`covidscan.serve.models.resolve_models` wrapped in a registry).
        api_key: when set, every ``/v1`` call must send it in the ``X-API-Key`` header (default:
            the ``COVIDSCAN_API_KEY`` environment variable).
        max_files: most files in one predict request (more: 413).
        max_file_bytes: largest file accepted (larger: 413).
        load_on_startup: start loading the models in the background when the server starts.

    Returns:
        The app; ``/healthz`` answers 503 until the models have loaded.
    """
    api_key = api_key if api_key is not None else env_api_key()
    max_body = max_files * max_file_bytes + 1024 * 1024
    # Starlette spools an upload over 1 MiB to a temporary file on disk; uploads must stay in memory.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_file_bytes + 1)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if load_on_startup and not registry.ready:
            registry.start_loading()
        yield

    app = FastAPI(title="covidscan", version=__version__, lifespan=lifespan,
                  description="COVID-19 findings on chest CT slices and chest X-rays, with Grad-CAM. " + RESEARCH_NOTE)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    app.state.registry = registry

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER) or ""
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(status_code=401, detail=f"A valid {API_KEY_HEADER} header is required.")

    def served(name: str) -> ServedModel:
        model = registry.models.get(name)
        if model is None:
            raise HTTPException(status_code=404,
                                detail=f"No model named '{name}'. Served models: {', '.join(registry.models)}.")
        if not registry.ready:
            raise HTTPException(status_code=503, detail="The models are still loading; try again shortly.")
        if model.predictor is None:
            raise HTTPException(status_code=503, detail=f"The model {name} could not be loaded: {model.error}")
        return model

    def read_upload(upload: UploadFile) -> bytes:
        if upload.size is not None and upload.size > max_file_bytes:
            raise HTTPException(status_code=413, detail=_file_too_large(max_file_bytes))
        data = upload.file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise HTTPException(status_code=413, detail=_file_too_large(max_file_bytes))
        return data

    @app.get("/healthz", summary="200 once the models are loaded, 503 before")
    def healthz() -> JSONResponse:
        if not registry.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        errors = {m.name: m.error for m in registry.models.values() if m.predictor is None}
        if errors:
            return JSONResponse({"status": "error", "errors": errors}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(registry.models)})

    @app.get("/v1/models", summary="The served models (the records of `covidscan models --json`)",
             dependencies=[Depends(require_key)])
    def list_models() -> list[dict]:
        return [m.record for m in registry.models.values()]

    @app.post("/v1/predict", summary="Classify one or more files (records of `covidscan predict --json`)",
              dependencies=[Depends(require_key)])
    def predict(
        files: Annotated[list[UploadFile], File(description="PNG, JPEG, BMP, TIFF, GIF or DICOM files")],
        model: Annotated[str, Query(description="a served model's name (see /v1/models)")],
        window: Annotated[str | None, Query(description="DICOM window: lung, mediastinum, bone or file")] = None,
    ) -> dict:
        entry = served(model)
        if len(files) > max_files:
            raise HTTPException(status_code=413, detail=f"At most {max_files} files per request, not {len(files)}.")
        inputs = [(upload.filename or f"file{index}", read_upload(upload)) for index, upload in enumerate(files)]
        started = time.perf_counter()
        try:
            results = predict_records(entry.predictor, inputs, window=window)
        except CovidscanError as exc:  # e.g. an unknown window name: the request, not a file, is wrong
            raise HTTPException(status_code=422, detail=str(exc)) from None
        log.info("predict model=%s files=%d errors=%d %.0f ms", model, len(inputs),
                 sum("error" in r for r in results), 1000 * (time.perf_counter() - started))
        return {"model": model, "results": results}

    @app.post("/v1/explain", summary="Classify one file and explain it with a class-activation map",
              dependencies=[Depends(require_key)])
    def explain(
        file: Annotated[UploadFile, File(description="one image or DICOM file")],
        model: Annotated[str, Query(description="a served model's name (see /v1/models)")],
        method: Annotated[str, Query(description="CAM method, e.g. gradcam or gradcam++")] = "gradcam",
        target_class: Annotated[str | None, Query(description="class to explain (default: the predicted one)")] = None,
        opacity: Annotated[float, Query(ge=0.0, le=1.0, description="heatmap opacity of the overlay")] = 0.4,
        window: Annotated[str | None, Query(description="DICOM window: lung, mediastinum, bone or file")] = None,
    ) -> dict:
        entry = served(model)
        name = file.filename or "file0"
        data = read_upload(file)
        started = time.perf_counter()
        predictor = entry.predictor
        try:
            image = predictor.load(data, window=window)
        except ImageReadError as exc:
            return JSONResponse(error_record(name, exc), status_code=422)
        except CovidscanError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        try:
            prediction, explanation = predictor.explain(image, method=method, target_class=target_class,
                                                        opacity=opacity)
        except CovidscanError as exc:  # unknown method or class
            raise HTTPException(status_code=422, detail=str(exc)) from None
        log.info("explain model=%s %.0f ms", model, 1000 * (time.perf_counter() - started))
        return {"model": model, **prediction_record(name, prediction),
                "cam_target_class": explanation.target_class,
                "heatmap_png": png_base64(np.round(explanation.heatmap * 255).astype(np.uint8)),
                "overlay_png": png_base64(explanation.overlay)}

    return app


def _file_too_large(max_file_bytes: int) -> str:
    return f"A file is larger than {max_file_bytes // (1024 * 1024)} MiB."


def png_base64(pixels: np.ndarray) -> str:
    """PNG bytes of a uint8 array (H x W grayscale or H x W x 3 RGB), base64-encoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
