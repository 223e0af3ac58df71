# One image for workers, Flower and the producer. The CUDA build of torch comes from PyPI,
# pinned; a CPU image: --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
FROM python:3.12-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# torch first, in a layer of its own: it is most of the image and changes least.
# (Unquoted on purpose: TORCH_SPEC may carry pip options such as --index-url.)
RUN pip install ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY engine engine
COPY tasks tasks
COPY producer producer
COPY configs configs
COPY examples examples
RUN pip install .
# Run as an unprivileged user; it owns only its home and the demo's model folder (.tideq).
RUN useradd --create-home --uid 10001 --user-group tideq \
    && mkdir -p /app/.tideq && chown tideq:tideq /app/.tideq
USER tideq
ENV HOME=/home/tideq
