# Broken on purpose (tests/containers/test_static.py): apt-get install without
# --no-install-recommends and without cleaning the lists, and `cd` in RUN.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y python3
RUN cd /opt && touch ready
