from specserve.cache.kv_cache import KVCache, KVCacheFull

__all__ = ["KVCache", "KVCacheFull"]
