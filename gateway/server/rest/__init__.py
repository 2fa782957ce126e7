"""Stage 1, the HTTP/REST edge (KServe v2 REST, Triton's binary tensor extension)."""
