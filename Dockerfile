# neuroal, CUDA-ready: the package and its pinned stack (make setup: torch==2.13.0 from PyPI, whose
# Linux wheel bundles the CUDA runtime; the host provides the driver via the NVIDIA container
# toolkit). `neuroal` is the entry point; the same image serves a Prefect process work pool:
#   docker run --gpus all --entrypoint prefect IMAGE worker start --pool neuroal
FROM python:3.11-slim

# git: the code revision recorded with every result, and DVC's repository; make: `make setup`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 neuroal
WORKDIR /opt/neuroal
COPY --chown=neuroal:neuroal . .
USER neuroal
# data/: where deploy/compose.yaml mounts the servers' volumes (owned by neuroal, so writable).
RUN make setup && rm -rf /home/neuroal/.cache/pip && mkdir /home/neuroal/data

ENV PATH=/opt/neuroal/.venv/bin:$PATH \
    NEUROAL_HOME=/opt/neuroal \
    NEUROAL_CACHE=/home/neuroal/.cache/neuroal \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
ENTRYPOINT ["neuroal"]
CMD ["--help"]
