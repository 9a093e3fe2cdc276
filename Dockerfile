# The kernel gateway image.
#
#   docker build -t kgw-gateway:dev .
#   docker run -d -p 127.0.0.1:8888:8888 -e GATEWAY_AUTH_TOKEN=... kgw-gateway:dev
#
# BASE (default: the official python:3.11-slim-bookworm) must be Debian bookworm or later with apt,
# python3 >= 3.11 (with venv), useradd and CA certificates; tini comes from apt below. Without a
# registry, tests/services/base_image.sh makes such a base (kgw-base:bookworm): pass it with
# `--build-arg BASE=kgw-base:bookworm`, and `--network host` so apt and pip reach their mirrors as
# the host does.
#
# Configuration is by environment only: every option has a GATEWAY_* variable
# (`kernel-gateway config-reference` lists them). The command only makes it listen on 0.0.0.0.
# To start Docker kernels, mount /var/run/docker.sock and add its group (`--group-add <gid>`);
# see docker-compose.yml and deploy/swarm-stack.yml.
ARG BASE=python:3.11-slim-bookworm

# ---- builder: a wheel of this repository, and the list of its runtime requirements
FROM ${BASE} AS builder
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python3 -m venv /opt/build
COPY pyproject.toml README.md ./
RUN /opt/build/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['docker']))" > /src/requirements.txt
COPY kernel_gateway ./kernel_gateway
COPY provisioners ./provisioners
COPY launchers ./launchers
RUN /opt/build/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && ls -l /wheels

# ---- runtime: the wheel (with the docker extra) in a venv, run as a non-root user
FROM ${BASE}
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/gateway/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# tini as PID 1 (forwards signals, reaps children): Debian's package, as Python's images have none.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && /usr/bin/tini --version

# Dependencies first: this layer is reused until pyproject.toml's requirements change.
COPY --from=builder /src/requirements.txt /tmp/requirements.txt
RUN python3 -m venv /opt/gateway \
 && /opt/gateway/bin/pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY --from=builder /wheels/ /tmp/wheels/
RUN /opt/gateway/bin/pip install --no-deps /tmp/wheels/*.whl \
 && /opt/gateway/bin/pip check \
 && rm -rf /tmp/wheels \
 && find /opt/gateway -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/gateway/bin/python -m compileall -q /opt/gateway/lib \
 && useradd --uid 1000 --gid 100 --create-home --shell /usr/sbin/nologin gateway

USER 1000:100
WORKDIR /home/gateway
EXPOSE 8888
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/gateway/bin/python", "-c", "import os, urllib.request; base = os.environ.get('GATEWAY_BASE_URL', '/').strip('/'); urllib.request.urlopen('http://127.0.0.1:%s/%shealthz' % (os.environ.get('GATEWAY_PORT') or '8888', base + '/' if base else ''), timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["kernel-gateway", "--ip=0.0.0.0"]
