//! bulwark's gRPC surface, generated from `proto/` at build time.
