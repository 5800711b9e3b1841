"""gRPC plumbing shared by every service: server builder, channels, limits."""
