# adapt-serve on a CUDA machine: docker build -t adapt-runtime . && docker run --gpus all -p 8000:8000 adapt-runtime
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 adapt
WORKDIR /opt/adapt-runtime
COPY pyproject.toml README.md ./
COPY adapt_runtime ./adapt_runtime
COPY kernels ./kernels
COPY serving ./serving
COPY eval ./eval

RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install ".[serve,triton]"
ENV PATH=/opt/venv/bin:$PATH

USER adapt
EXPOSE 8000
# Listen on all interfaces inside the container; publish the port deliberately, and set --api-key for any
# network beyond the host.
CMD ["adapt-serve", "--model", "llama", "--rule", "hebbian", "--device", "cuda", "--host", "0.0.0.0", "--port", "8000"]
