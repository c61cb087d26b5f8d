# syntax=docker/dockerfile:1
# Build stage: a wheel of pgveil and of its dependencies, from this repository alone.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY rules ./rules
COPY audit ./audit
COPY erasure ./erasure
COPY shared ./shared
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run stage: no compiler, no sources, an unprivileged user. One image for every command:
# `proxy` by default, `erase run` for the erasure worker, `demo --dsn ...` to try it.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin pgveil
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
EXPOSE 6432 7432
STOPSIGNAL SIGTERM
ENTRYPOINT ["pgveil"]
CMD ["proxy", "--listen", "0.0.0.0:6432", "--upstream", "postgres:5432", "--metrics", "0.0.0.0:7432"]
