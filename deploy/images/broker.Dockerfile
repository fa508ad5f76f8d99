# syntax=docker/dockerfile:1.7
#
# xpu-broker — the control plane (management cluster).
#
#   docker buildx build -f deploy/images/broker.Dockerfile \
#     --platform linux/amd64,linux/arm64 -t ghcr.io/xpu-broker/xpu-broker:0.1.0 .
#
# Build context: the repository root (the whole workspace is needed: `cargo build --locked`).
# Runtime: distroless (glibc, no shell, no package manager), user 65532, nothing written to the
# root filesystem — the pod runs with readOnlyRootFilesystem. glibc rather than musl because the
# broker is the hot path of every attach and musl's allocator costs throughput.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-trixie AS build
ARG RUST_VERSION
# rust-toolchain.toml asks for "stable": pin it to the image's toolchain so the build never
# downloads another one and is reproducible.
ENV RUSTUP_TOOLCHAIN=${RUST_VERSION} CARGO_TERM_COLOR=never CARGO_INCREMENTAL=0
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p xpu-broker --bin xpu-broker \
 && install -D -m 0755 target/release/xpu-broker /out/xpu-broker

# A static busybox, used only by HEALTHCHECK (distroless has no HTTP client). Kubernetes does not
# use HEALTHCHECK: the manifests probe /healthz and /readyz with httpGet.
FROM docker.io/library/busybox:1.37.0-musl AS busybox

FROM gcr.io/distroless/cc-debian13:nonroot
COPY --from=build /out/xpu-broker /usr/local/bin/xpu-broker
COPY --from=busybox /bin/busybox /usr/local/bin/busybox
USER 65532:65532
# 50051: gRPC and the status API, mutual TLS only. 8080: /healthz, /readyz, /metrics, and the
# status API and dashboard with bearer tokens (plain HTTP).
EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/xpu-broker"]
CMD ["serve"]
