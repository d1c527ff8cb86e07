# One image for every service of docker-compose.yml: the collector, the trainers (plain and
# torchrun) and the dashboard. Each service picks its role with its `prismatic ...` command.
#
#   docker build -t prismatic-dynamics .                                # CPU torch (the default)
#   docker build -t prismatic-dynamics --build-arg TORCH_VARIANT=cu126 .  # CUDA 12.6 torch
#
# TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...). Installing torch from that
# index before anything else means pip never resolves the multi-GB CUDA build for a CPU image.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

RUN pip install "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"

# The other dependencies, read from pyproject.toml, in their own layer: editing code does not
# reinstall them. torch==2.13.0 is already met by the build above (2.13.0+cpu or +cuXXX).
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code and the experiment configs. Editable, so `prismatic up` finds configs/ next to it.
COPY prismatic ./prismatic
COPY trainer ./trainer
COPY collector ./collector
COPY dashboard ./dashboard
COPY configs ./configs
RUN pip install --no-deps -e .

# Not root. /runs is the named volume of docker-compose.yml: created here so that the volume
# starts out owned by this user.
RUN useradd --create-home --uid 10001 prismatic \
    && mkdir /runs \
    && chown prismatic:prismatic /runs
USER prismatic

# 5557: the collector's ZeroMQ PULL socket. 8501: the dashboard.
EXPOSE 5557 8501
CMD ["prismatic", "--help"]
