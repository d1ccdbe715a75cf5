# Broken on purpose (tests/containers/test_static.py): the base is named by tag, not digest.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN useradd --create-home srpo
USER srpo
