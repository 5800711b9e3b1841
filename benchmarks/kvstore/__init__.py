"""KV-store throughput: put-then-get of real KV blocks, next to the raw baseline.

    python -m benchmarks.kvstore --backend redis --url redis://127.0.0.1:6379 --mib 256
    python -m benchmarks.kvstore --backend all --mib 256   # starts its own redis-server and Ray

Blocks have the `dummy:135m` shape (30 layers, 3 KV heads, head_dim 64, block 16,
float32: 720 KiB each). Each side does, per batch of `--batch` blocks:

- ours put: `KVStore.put` (codec header, xxh3 checksum; Redis: one pipeline of
  SET EX sent with no copy; Ray: one `ray.put` of the whole batch as one object,
  one index-actor call).
- ours get: `KVStore.get_into` preallocated tensors (Redis: one GETEX pipeline
  received past hiredis; Ray: the refs from the store's ref cache, which its own
  put filled, and one `ray.get`), every header and checksum verified before the
  block is copied into its tensor.
- ours cold get (Ray): a Ray actor (another process) with no refs of its own
  reads blocks this process put: one index-actor call per batch turns the hashes
  into refs, as for a decode worker reading what a prefill worker wrote.
- raw redis: redis-py pipelined SET EX / GET of `bytes` (hiredis), nothing checked,
  values left as `bytes`.
- raw ray: `ray.put` of uint8 arrays, `ray.get` of the refs (already in hand):
  read-only views of shared memory, not a byte moved. "raw+copy" also copies each
  array into preallocated memory, the least a KV consumer must do (it needs the
  block in its own pool, writable): the Ray goal is measured against raw+copy.
  "list+copy" puts each batch's arrays as one list, one object, as ours does.

Every client holds one round of blocks at a time: the raw ones drop the last
round's refs before they put, ours clear their index first (`measure` says how
the rounds are ordered and timed). Modules: `measure` (rounds, timing,
throughput), `workloads` (what each client does), `servers` (a throwaway
redis-server), `report` (the printed lines), `__main__` (the command).
"""
