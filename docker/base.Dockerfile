# What flwr/base is, built from a debootstrap root file system for hosts that cannot pull images
# (`make images`): Debian bookworm's Python 3.11 in a venv at /python/venv, owned by the
# unprivileged user `app` (uid 49999, home /app), as in Flower's official images, so images
# built FROM it install packages without root and the compose files need no change.
ARG ROOTFS=fedpsg-rootfs:bookworm
FROM ${ROOTFS}

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/python/venv \
    PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

RUN groupadd --gid 49999 app \
    && useradd --uid 49999 --gid 49999 --home-dir /app --no-create-home --shell /bin/false app \
    && mkdir -p /app /python \
    && python3 -m venv /python/venv \
    && chown -R app:app /app /python

WORKDIR /app
USER app
ENV HOME=/app
