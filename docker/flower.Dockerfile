# flwr/superlink, flwr/supernode and flwr/superexec for hosts that cannot pull images
# (`make images` tags them with the official names, so docker-compose.yml runs unchanged):
# Flower alone on the base image, no torch, one entrypoint per role.
# Build: docker build -f docker/flower.Dockerfile --target superlink docker/
ARG BASE_IMAGE=fedpsg-base:bookworm
FROM ${BASE_IMAGE} AS flower
ARG FLWR_VERSION=1.42.0
# Where pip looks: PyPI by default; `make images` passes its host-side wheelhouse
ARG PIP_INDEX=
RUN python -m pip install --no-cache-dir --disable-pip-version-check ${PIP_INDEX} \
        "flwr==${FLWR_VERSION}" \
    && flower-superlink --version

FROM flower AS superlink
ENTRYPOINT ["flower-superlink"]

FROM flower AS supernode
ENTRYPOINT ["flower-supernode"]

FROM flower AS superexec
ENTRYPOINT ["flower-superexec"]
