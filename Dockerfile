# covidscan on Hugging Face Spaces (Docker SDK, Streamlit template) or any Docker host.
# Research and teaching use only: not a medical device.
#   docker build -t covidscan . && docker run -p 8501:8501 covidscan   -> http://localhost:8501
FROM python:3.11-slim

# Spaces run the container as user 1000; owning the app folder lets Streamlit and torch write caches.
RUN useradd --create-home --uid 1000 user
USER user
# Spaces show the app in an iframe where browsers drop Streamlit's XSRF cookie, which breaks
# uploads (HTTP 403); the Space has no login for that protection to guard.
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TORCH_HOME=/home/user/.cache/torch \
    STREAMLIT_SERVER_ENABLE_XSRF_PROTECTION=false \
    COVIDSCAN_WEIGHTS_DIR=/home/user/app/weights
WORKDIR /home/user/app

# CPU-only torch wheels first (a tenth of the CUDA wheels' size), at the versions requirements.txt
# pins; then the same requirements.txt as everywhere else, which keeps those torch wheels.
COPY --chown=user requirements.txt ./
RUN grep -E '^(torch|torchvision)==' requirements.txt > /tmp/torch-pins.txt \
    && pip install --no-cache-dir --user --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch-pins.txt \
    && pip install --no-cache-dir --user -r requirements.txt

COPY --chown=user . .
RUN pip install --no-cache-dir --user --no-deps .

# app_port in README.md's front matter must match.
EXPOSE 8501
HEALTHCHECK --start-period=180s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=3)"
# The launcher preloads torch, Grad-CAM and the shipped models before Streamlit answers, so the
# health check turns OK when the first upload can be answered at once.
CMD ["covidscan", "app", "--host", "0.0.0.0", "--port", "8501"]
