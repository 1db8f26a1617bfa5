# syntax=docker/dockerfile:1
# The dictsweep node image: every Ray node (head and GPU workers), the sweep's driver, and the
# compose stack's MLflow server run it. CUDA comes from the Ray GPU base image and torch's CUDA
# wheels; the user is the base image's non-root `ray` (uid 1000, group users). No credentials are
# baked in: S3 and MLflow settings come from the environment at run time (README, "Environment").
#
#   docker build -t dictsweep:0.1.0 .
#   docker run --rm --gpus all dictsweep:0.1.0 dictsweep bench train --d-model 512 --n-latents 16384
#
# BASE_IMAGE must be a rayproject/ray image (its `ray` user and Python are used below) whose Ray
# version is the one pinned in infra/docker/requirements.txt.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# Ray frees released objects every 50 ms rather than once a second, so that a node's object store
# holds no more stream windows than the spec's budget (as `dictsweep.cluster.LOCAL_RAY_CONFIG`
# sets for a local Ray); every Ray node started from this image reads it
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_free_objects_period_milliseconds=50
USER ray
WORKDIR /home/ray/dictsweep

# Layers from the least to the most often changed: torch, the pinned dependencies, the package.
RUN pip install "torch==${TORCH_VERSION}"
COPY --chown=1000:100 infra/docker/requirements.txt /tmp/dictsweep-requirements.txt
RUN pip install -r /tmp/dictsweep-requirements.txt
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 service ./service
COPY --chown=1000:100 jobs ./jobs
RUN pip install --no-deps . \
    && python -c "import dictsweep, torch, ray, mlflow; print('dictsweep', dictsweep.__version__, 'torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)" \
    && dictsweep --help > /dev/null

# No ENTRYPOINT: KubeRay and the Ray cluster launcher start containers with their own commands
# (the launcher runs `docker run IMAGE bash`).
CMD ["dictsweep", "--help"]
