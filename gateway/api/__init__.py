"""Generated gRPC modules (from protos/); do not edit."""
