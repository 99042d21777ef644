# bids-denoise: a BIDS-App image for the NVIDIA container runtime.
#
#   docker build -t bids-denoise:0.1.0 .
#   docker run --rm --gpus all -v /data/ds:/data:ro -v /data/out:/out bids-denoise:0.1.0 /data /out participant
#
# Build arguments (production defaults):
#   BASE_IMAGE  a Debian/Ubuntu image; Python 3 is installed from apt if the base lacks it
#   TORCH_SPEC  the PyTorch requirement; PyPI's Linux wheels are CUDA builds that carry the CUDA
#               runtime libraries, so the NVIDIA runtime only has to inject the driver
# A local wheelhouse: wheels/ (empty in git) is searched first, so a build can use wheels the builder
# already has. pip may need a CA bundle: pass it as a build secret (--secret id=ca,src=/path/ca.pem).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch>=2.2"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# a C compiler (and Python's headers where the base lacks them) for MP-PCA's compiled solver; only
# the build stage has them, the final image gets the built module
RUN python_packages=""; \
    command -v python3 >/dev/null 2>&1 || python_packages="python3 python3-venv python3-dev"; \
    apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates ${python_packages} \
    && (python3 -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
        || apt-get install -y --no-install-recommends python3-dev) \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
COPY wheels/ /tmp/wheels/
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --find-links /tmp/wheels "${TORCH_SPEC}"
# the dependencies first, read from pyproject.toml, in a layer of their own: a change to the code
# alone rebuilds from the next step (skipped where the base's Python has no tomllib, < 3.11)
COPY pyproject.toml /tmp/pyproject.toml
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if python3 -c "import tomllib" 2>/dev/null; then \
        python3 -c "import tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['validator']))" > /tmp/requirements.txt \
        && pip install --find-links /tmp/wheels -r /tmp/requirements.txt; \
    fi
COPY pyproject.toml setup.py README.md CHANGES.md LICENSE /src/
COPY bids_denoise /src/bids_denoise
RUN --mount=type=secret,id=ca,required=false \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --find-links /tmp/wheels "/src[validator]" && rm -rf /src /tmp/wheels \
    && python3 -c "from bids_denoise.methods.core.localpca import kernel_available; assert kernel_available(), 'MP-PCA solver not built'"

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ENV DEBIAN_FRONTEND=noninteractive
RUN command -v python3 >/dev/null 2>&1 \
    || (apt-get update && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*)
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin bidsdenoise \
    && mkdir -p /work && chmod 1777 /work
# Works under any --user UID:GID, a --read-only root and --network none: every cache goes to /tmp.
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    DENO_DIR=/tmp/deno \
    TORCH_HOME=/tmp/torch \
    NIPYPE_NO_ET=1 \
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    BIDS_DENOISE_CONTAINER=docker \
    BIDS_DENOISE_IMAGE=bids-denoise:${VERSION}
LABEL org.opencontainers.image.title="bids-denoise" \
      org.opencontainers.image.description="Self-supervised denoising of diffusion MRI as a BIDS-App" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/bids-denoise/bids-denoise" \
      org.opencontainers.image.licenses="Apache-2.0"
USER bidsdenoise
WORKDIR /tmp
ENTRYPOINT ["bids-denoise"]
CMD ["--help"]
