# `llm serve` (the OpenAI-compatible HTTP server) on ONNX Runtime, numpy and the tokenizer: no PyTorch.
#
# Build, from the project root, after the export stage (`dvc repro` or `llm export onnx`):
#   docker build -f serve.Dockerfile -t llm-serve .                            # bakes in artifacts/onnx
#   docker build -f serve.Dockerfile -t llm-serve --build-arg MODEL=exports/v3 .  # another export folder
# MODEL is a path inside the build context; serve.Dockerfile.dockerignore (read instead of .dockerignore)
# lets through only the package, the requirements and artifacts/onnx: add a `!` line for another folder.
#
# Run:
#   docker run --rm --init -p 8000:8000 -e LLM_API_KEY=... llm-serve          # the export baked in at /model
#   docker run --rm --init -p 8000:8000 -e LLM_API_KEY=... -v "$PWD/artifacts/onnx:/model:ro" llm-serve
# It binds 0.0.0.0 inside the container, so it refuses to start without a key (`--no-auth` to mean it).
# A registry model is resolved outside the image, which has no MLflow: the version's tag onnx.artifact_uri
# names its export; `mlflow artifacts download --artifact-uri <that URI> --dst-path exports/prod` fetches it
# into exports/prod/onnx, to build with (MODEL=exports/prod/onnx) or to mount.

ARG BASE=python:3.11-slim

# --- build: a virtualenv with the serving requirements, then the package without its dependencies ---------
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/serve.txt requirements/serve.txt
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --requirement requirements/serve.txt
COPY pyproject.toml README.md ./
COPY llm ./llm
# --no-deps: pyproject's base dependencies pin torch, which this image must not hold
RUN pip install --no-cache-dir --no-deps .

# --- runtime: the virtualenv and one export folder, run as a non-root user ----------------------------------
FROM ${BASE}
ARG MODEL=artifacts/onnx
LABEL org.opencontainers.image.title="llm-serve" \
      org.opencontainers.image.description="An OpenAI-compatible server for the GPT's ONNX export, without PyTorch" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 1000 app \
    && useradd --create-home --uid 1000 --gid app --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY ${MODEL} /model
WORKDIR /home/app
# numeric, so Kubernetes runAsNonRoot can verify it
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["llm"]
# --host 0.0.0.0: inside a container, 127.0.0.1 is unreachable from outside it, published port or not
CMD ["serve", "--model", "/model", "--host", "0.0.0.0", "--port", "8000"]
