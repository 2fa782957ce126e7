"""Stage 4: the response cache (per row, for deterministic model versions)."""

from gateway.cache.response_cache import CacheResult, Identity, ResponseCache, cacheable, identity

__all__ = ["CacheResult", "Identity", "ResponseCache", "cacheable", "identity"]
