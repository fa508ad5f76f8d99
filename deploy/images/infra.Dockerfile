# syntax=docker/dockerfile:1.7
#
# The infrastructure side (DPUs): two images from one build.
#
#   docker buildx build -f deploy/images/infra.Dockerfile --target infra-sync \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/xpu-broker/xpu-infra-sync:0.1.0 .
#   docker buildx build -f deploy/images/infra.Dockerfile --target dpu-agent \
#     --platform linux/arm64,linux/amd64 -t ghcr.io/xpu-broker/xpu-dpu-agent:0.1.0 .
#
# Build context: the repository root. dpu-agent runs on the DPUs' Arm cores: build arm64 (natively
# or under emulation). Its linux dataplane drives the kernel through the `ip`, `tc` and `nft`
# commands, so its runtime is a slim Debian with iproute2 and nftables; infra-sync needs nothing
# but its binary and runs on distroless.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-trixie AS build
ARG RUST_VERSION
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p xpu-infra-sync --bin infra-sync --bin dpu-agent \
 && install -D -m 0755 target/release/infra-sync /out/infra-sync \
 && install -D -m 0755 target/release/dpu-agent /out/dpu-agent

FROM docker.io/library/busybox:1.37.0-musl AS busybox

# ---- infra-sync: the infra cluster's controller ------------------------------------------------
FROM gcr.io/distroless/cc-debian13:nonroot AS infra-sync
COPY --from=build /out/infra-sync /usr/local/bin/infra-sync
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
USER 65532:65532
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8081/healthz"]
ENTRYPOINT ["/usr/local/bin/infra-sync"]

# ---- dpu-agent: one per DPU ----------------------------------------------------------------------
FROM docker.io/library/debian:trixie-slim AS dpu-agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/dpu-agent /usr/local/bin/dpu-agent
# Non-root by default. With the linux dataplane the DaemonSet runs it as uid 0 with NET_ADMIN
# only (see deploy/infra/base/dpu-agent/daemonset.yaml for why); with the OPI dataplane it needs
# no capability at all.
USER 65532:65532
# dpu-agent has no HTTP endpoint (it only dials out to the broker and the OPI server), so there
# is nothing to health-check over HTTP; the DaemonSet uses an exec probe on its state file.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/dpu-agent"]
