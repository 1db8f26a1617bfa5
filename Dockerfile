# dictsweep node image: the package on a CUDA-capable PyTorch base, run as a non-root user.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /opt/dictsweep
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-cache-dir -e . && useradd --create-home --uid 1000 dictsweep
USER dictsweep
ENTRYPOINT ["dictsweep"]
