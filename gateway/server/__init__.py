"""Stage 1: the gRPC edge (servicer, pb <-> types conversion)."""
