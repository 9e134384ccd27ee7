"""The REST API: a FastAPI app (:func:`covidscan.serve.app.create_app`) served by uvicorn or Ray Serve."""
