# adapt-serve on a CUDA machine: docker build -t adapt-runtime . && docker run --gpus all -p 8000:8000 adapt-runtime
# Ubuntu 24.04: Python 3.12, new enough for every version in constraints/main.txt (made on 3.11; 22.04 has 3.10).
FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/*

# 24.04 images ship a user "ubuntu" with uid 1000
RUN (userdel --remove ubuntu 2> /dev/null || true) && useradd --create-home --uid 1000 adapt
WORKDIR /opt/adapt-runtime
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY adapt_runtime ./adapt_runtime
COPY kernels ./kernels
COPY serving ./serving
COPY eval ./eval

# The exact versions the suite last passed with (constraints/main.txt) but triton, which torch's CUDA build pins
# itself (the file was made on a CPU machine, where triton comes from the test extra).
RUN grep -v '^triton==' constraints/main.txt > /tmp/constraints.txt \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install -c /tmp/constraints.txt ".[serve,triton]"
ENV PATH=/opt/venv/bin:$PATH

USER adapt
EXPOSE 8000
# Listen on all interfaces inside the container; publish the port deliberately, and set --api-key for any
# network beyond the host.
CMD ["adapt-serve", "--model", "llama", "--rule", "hebbian", "--device", "cuda", "--host", "0.0.0.0", "--port", "8000"]
