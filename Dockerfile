# edow's binaries in one image: orchestrator, worker, edow (CLI) and edow-registry.
#   docker build -t edow:local .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p edow -p edow-orchestrator -p edow-worker -p edow-registry

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/orchestrator /src/target/release/worker \
     /src/target/release/edow /src/target/release/edow-registry /usr/local/bin/
COPY examples /opt/edow/examples
# The blob store's default place: a volume mounted here takes this owner, so the unprivileged user may write it.
RUN mkdir -p /var/lib/edow/blobs && chown -R 65532:65532 /var/lib/edow
USER 65532:65532
ENTRYPOINT []
CMD ["orchestrator"]
