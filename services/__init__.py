"""gRPC services wrapping the engine."""
