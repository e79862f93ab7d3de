# syntax=docker/dockerfile:1
# llama-speed-exporter in a container. See docs/deploy.md.
#
#   docker build -t llama-speed-exporter .
#   docker run -d --name llama-speed-exporter --network host --pid host --gpus all \
#     -v /srv/models:/srv/models:ro -v llama-speed-state:/var/lib/llama-speed-exporter \
#     llama-speed-exporter --target http://127.0.0.1:8080
#
# No NVIDIA driver or CUDA is in the image: NVML's libnvidia-ml comes from the host's driver,
# which the NVIDIA container runtime mounts (--gpus, or the compose/Kubernetes device
# requests); NVIDIA_DRIVER_CAPABILITIES=utility asks it for NVML and nvidia-smi only.
#
# The builder stage's RUN lines are also run, verbatim, by scripts/docker-build-steps.sh
# outside Docker (tests/test_deploy.py checks that both say the same), so CI catches a broken
# step without a Docker engine. Keep them one command a line, with $PYTHON, $VENV and $WHEELS.

ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS builder
ARG PYTHON=python3
ARG VENV=/opt/venv
ARG WHEELS=/tmp/wheels
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter/ exporter/
RUN "$PYTHON" -m venv "$VENV"
RUN "$VENV/bin/python" -m pip wheel --no-deps -w "$WHEELS" .
RUN "$VENV/bin/python" -m pip install "$WHEELS"/llama_speed_exporter-*.whl
RUN "$VENV/bin/llama-speed-exporter" --version

FROM ${PYTHON_IMAGE}
ARG VENV=/opt/venv
# A fixed uid, so that Kubernetes' runAsNonRoot can check it and file permissions
# (an API key file, a models directory) can be granted to it on the host.
# The state directory (below) is made here, in the same step, so that this user owns it.
RUN groupadd --system --gid 10001 exporter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin exporter \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/llama-speed-exporter
COPY --from=builder ${VENV} ${VENV}
ENV PATH=${VENV}/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=utility \
    LLAMA_SPEED_STORAGE_PATH=/var/lib/llama-speed-exporter
# The state directory (--storage.path) holds baselines.json, each speed series' band: kept
# across restarts, it keeps the regression alerts armed; lost, they re-arm only after 6 hours
# of new rounds. A volume, so that it outlives the container's own layer and stays writable
# under --read-only. Name it (-v llama-speed-state:/var/lib/llama-speed-exporter) to keep it
# across `docker rm` and upgrades: each new container would get a new, empty anonymous one.
# A new named volume takes this directory's owner (uid 10001) and mode; for another --user,
# chown it (docs/deploy.md, "Container image"). VOLUME comes after the RUN that makes the
# directory: a build step's later changes under a volume's path are discarded.
VOLUME ["/var/lib/llama-speed-exporter"]
EXPOSE 18088
# `healthcheck` asks /healthz where `run` listens, over TLS when the web config turns it on
# (README, docs/deploy.md), within 3 s; exit 1 and one line (docker inspect) when it does not
# answer 200. It reads the LLAMA_SPEED_* variables and config file as `run` does, never run's
# flags, which it cannot see: set the listen address and web config file as variables.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["llama-speed-exporter", "healthcheck"]
USER 10001:10001
ENTRYPOINT ["llama-speed-exporter"]
CMD ["run"]
