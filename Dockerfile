# One image for workers, Flower and the producer. The CUDA build of torch comes from PyPI.
FROM python:3.12-slim
WORKDIR /app
RUN pip install --no-cache-dir "torch>=2.4"
COPY pyproject.toml README.md ./
COPY engine engine
COPY tasks tasks
COPY producer producer
COPY configs configs
COPY examples examples
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
