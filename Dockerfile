# understudy: sync-agent and sync-cli, plus a docker CLI for hooks that stop
# and start the app (`docker stop jellyfin`) through the host's socket.
#
#   docker build -t understudy:latest .
#
# Build stage: the workspace, release profile, the lock file as committed.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p sync-agent -p sync-cli \
 && install -D -m 0755 target/release/sync-agent /out/sync-agent \
 && install -D -m 0755 target/release/sync-cli /out/sync-cli

# The docker CLI only (a static binary), not the daemon.
FROM docker:27-cli AS dockercli

# Runtime: the same Debian release as the build stage (same glibc). The
# binaries need only libc, libm and libgcc_s (SQLite is built in); curl and jq
# serve the Kubernetes hooks (dist/k8s/scale.sh); acl and attr
# are for looking at what the mirror preserved.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl jq acl attr \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/sync-agent /out/sync-cli /usr/local/bin/
COPY --from=dockercli /usr/local/bin/docker /usr/local/bin/docker
# Root: owners, ACLs and trusted.* xattrs of the mirrored folder are kept
# exactly (see dist/compose/README.md for the capabilities this needs).
USER 0:0
ENV UNDERSTUDY_LOG=info
EXPOSE 7878/udp
ENTRYPOINT ["sync-agent"]
CMD ["--config", "/etc/understudy/understudy.toml"]
