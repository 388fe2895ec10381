# herald in a container: one image for every role (herald serve | gateway | certs).
# Built with Kafka support (librdkafka from source: cmake and libcurl's headers) and the
# CQL projection store (ScyllaDB or Cassandra).
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features kafka,cql --bin herald

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libcurl4 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/herald /usr/local/bin/herald
ENTRYPOINT ["herald"]
CMD ["serve", "--data-dir", "/data"]
