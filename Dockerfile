# The `llm` command in an image, with the pipeline (Prefect, MLflow, DVC) and ONNX export: CPU by default, CUDA by
# build argument. tests/test_docker.py runs every `llm` command documented below against the installed `llm`.
#
# Build:
#   docker build -t llm .                                            # CPU wheels of torch
#   docker build -t llm:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .  # CUDA wheels (they bundle the CUDA runtime)
#   docker build -t llm --build-arg EXTRAS="[pipeline,onnx,dev]" .   # other optional dependencies of pyproject.toml
#
# Run (data, artifacts and MLflow runs live under /app; mount them to keep them; --init forwards Ctrl-C/stop):
#   docker run --rm llm                                              # llm --help
#   docker run --rm --init -v "$PWD/data:/app/data" llm data fetch --source default
#   docker run --rm --init -v "$PWD/data:/app/data" -v "$PWD/artifacts:/app/artifacts" \
#     -v "$PWD/mlruns:/app/mlruns" llm pipeline --set pretrain:max_steps=200   # the whole pipeline (Prefect flow)
#   docker run --rm -it --init -v "$PWD/artifacts:/app/artifacts" llm chat --model artifacts/finetune
#   docker run --rm -it --init -v "$PWD/mlruns:/app/mlruns" llm chat --model models:/gpt/Production
#   docker run --rm --init --gpus all -v "$PWD/artifacts:/app/artifacts" llm:cuda pretrain   # NVIDIA toolkit
# The container runs as uid 1000: on Linux, mounted folders must be writable by it (or add --user "$(id -u)").
# MLflow runs and the registry go to /app/mlruns (MLFLOW_TRACKING_URI below). The pipeline runs as one Prefect flow
# (`llm pipeline`), without git or DVC; `dvc repro` is for a checkout (README).

ARG BASE=python:3.11-slim

# --- build: a virtualenv with torch from TORCH_INDEX, then the project ---------------------------------------
FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the pipeline (Prefect, MLflow, DVC) and the ONNX export, so `llm pipeline` runs every stage
ARG EXTRAS="[pipeline,onnx]"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# torch first and alone: its layer (the biggest by far) survives changes to the project
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY llm ./llm
# torch==2.13.0 is already satisfied (a +cpu/+cu local version matches the pin), so PyPI's build is not pulled
RUN pip install --no-cache-dir "./${EXTRAS}"

# --- runtime: the virtualenv and the project files, run as a non-root user -----------------------------------
FROM ${BASE}
LABEL org.opencontainers.image.title="llm" \
      org.opencontainers.image.description="A GPT language model from scratch in PyTorch, with its MLOps pipeline" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_TRACKING_URI=sqlite:////app/mlruns/mlflow.db
RUN groupadd --gid 1000 app \
    && useradd --create-home --uid 1000 --gid app --shell /usr/sbin/nologin app \
    && install -d -o app -g app /app
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# params/, pipeline definitions and the package sources; .dockerignore keeps data, artifacts, caches out
COPY --chown=app:app . .
# numeric, so Kubernetes runAsNonRoot can verify it
USER 1000:1000
ENTRYPOINT ["llm"]
CMD ["--help"]
