# syntax=docker/dockerfile:1.7
#
# The tenant side (hosts): tenant-sync, host-agent, xpu-device-plugin and xpu-cni in one image.
#
#   docker buildx build -f deploy/images/tenant.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/xpu-broker/xpu-tenant:0.1.0 .
#
# Build context: the repository root. The binaries are static (musl): xpu-cni is copied onto the
# host by the DaemonSet's init container and executed there by the container runtime, whatever the
# host's libc is. Runtime: distroless static, user 65532, read-only root filesystem friendly.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-trixie AS build
ARG RUST_VERSION
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0 TARGET_CC=musl-gcc
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(uname -m)-unknown-linux-musl" \
 && cargo build --release --locked --target "$target" -p xpu-tenant-sync \
      --bin tenant-sync --bin host-agent --bin xpu-device-plugin --bin xpu-cni \
 && for b in tenant-sync host-agent xpu-device-plugin xpu-cni; do \
      install -D -m 0755 "target/$target/release/$b" "/out/$b"; \
    done

# A static busybox: the CNI install init container (cp + atomic mv into the host's CNI bin dir),
# the exec probes of the node agents (which have no HTTP port) and HEALTHCHECK use it.
FROM docker.io/library/busybox:1.37.0-musl AS busybox

FROM gcr.io/distroless/static-debian13:nonroot
COPY --from=build /out/ /usr/local/bin/
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
USER 65532:65532
# tenant-sync serves /healthz, /readyz and /metrics on 8081. host-agent and xpu-device-plugin
# serve gRPC on unix sockets only; the DaemonSet probes their sockets instead (HEALTHCHECK below
# applies to the default command, tenant-sync).
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8081/healthz"]
ENTRYPOINT ["/usr/local/bin/tenant-sync"]
