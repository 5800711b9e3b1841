"""The `ray` backend: `store.RayStore` on the Ray object store, the index actor
(`index_actor`) every worker asks, the `ObjectIndex` both use, each store's ref
cache, and the packing of a put batch into one object (`block_batch`)."""
