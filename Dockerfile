# jpaged on an NVIDIA GPU: `jpaged serve` as a non-root user.
#   docker build -t jpaged .
#   docker run --gpus all -p 8000:8000 -v /models:/models:ro -e JPAGED_API_KEY=... \
#       jpaged --model /models/Llama-3.1-8B-Instruct --served-model-name llama
# The build stage installs into a virtual environment that the runtime stage
# copies, so compilers and pip caches stay out of the final image.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# Ubuntu's own python3 (3.12); the version pins are left to the base image's
# snapshot of the archive, which is what a rebuild of the same tag gets.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/jpaged
ENV PATH=/opt/jpaged/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jpaged ./jpaged
RUN pip install --no-cache-dir './[cuda12]'

FROM ${CUDA_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin jpaged
COPY --from=build /opt/jpaged /opt/jpaged
# JPAGED_PORT is the port the HEALTHCHECK asks; set it too when passing another --port.
ENV PATH=/opt/jpaged/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    JPAGED_PORT=8000
USER 10001
WORKDIR /home/jpaged
EXPOSE 8000 50051
# /health answers 200 once the engine runs and 503 while it drains or after it
# died; the start period covers model loading and the first compilations.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('JPAGED_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["jpaged", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD []
