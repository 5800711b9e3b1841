"""The `redis://` backend: `store.RedisStore`, and the RESP packer and reader it
sends and receives blocks with, each without an extra copy."""
