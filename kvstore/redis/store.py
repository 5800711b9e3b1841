"""`redis://` and `rediss://`: blocks in a shared Redis, one pipeline per batch."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvstore.codec import HEADER_LEN, BlockCodec, BlockCodecError, tail_key
from kvstore.hashing import BlockHash
from kvstore.redis.resp_packer import ScatterValue, ZeroCopyRespPacker
from kvstore.redis.resp_reader import RespReader
from kvstore.spec import BlockSpec
from kvstore.stats import StatsRecorder, StoreStats
from kvstore.store import KVStore, StoreUnavailableError

DEFAULT_TIMEOUT_S = 1.0
DEFAULT_BLOCK_TTL_S = 3600
DEFAULT_TAIL_TTL_S = 60


class RedisStore(KVStore):
    """Blocks as encoded values in Redis, under a key prefix per model fingerprint.

    - Keys: `kvrelay:<fingerprint hex>:b:<hash hex>` for blocks,
      `kvrelay:<fingerprint hex>:t:<request id>` for tails. Every key has a TTL
      (`block_ttl_s`, refreshed by each read with GETEX, so hot prefixes stay;
      `tail_ttl_s` for tails), so nothing outlives its use even with no
      `maxmemory`. Under `maxmemory-policy allkeys-lru` Redis may evict any
      block at any time; an evicted block is a miss.
    - Each batch is one pipeline (one round trip), not a transaction: every
      single SET/GET is atomic, a batch is not.
    - Values are `BlockCodec` payloads, sent with no copy (`ZeroCopyRespPacker`),
      received with one (`RespReader`, past hiredis) and checked on every read;
      a bad one is a miss counted in `corrupt_blocks`.
    - Connections come from one pool, so the store is safe to share between
      threads. Socket and connect timeouts (`timeout_s`) and no retries bound
      every call: an unreachable Redis raises `StoreUnavailableError` within
      about `timeout_s`. The pool reconnects on the next call, so the store
      recovers by itself once Redis is back.
    - AUTH (`redis://user:password@host`) and TLS (`rediss://`, `ssl_*` query
      parameters) come from the URL, as redis-py's `from_url` reads them.
    """

    def __init__(
        self,
        url: str,
        spec: BlockSpec,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        block_ttl_s: int = DEFAULT_BLOCK_TTL_S,
        tail_ttl_s: int = DEFAULT_TAIL_TTL_S,
        max_connections: int = 64,
        secret: bytes | None = None,
    ) -> None:
        """`secret`: the cluster's KV secret; with it every block carries a MAC and a
        block without a valid one is a counted miss (see `kvstore.codec`)."""
        super().__init__(spec)
        if timeout_s <= 0 or block_ttl_s <= 0 or tail_ttl_s <= 0:
            raise ValueError("timeout_s, block_ttl_s and tail_ttl_s must be positive")
        self.block_ttl_s = int(block_ttl_s)
        self.tail_ttl_s = int(tail_ttl_s)
        self._codec = BlockCodec(spec, secret)
        self._stats = StatsRecorder()
        self._prefix = f"kvrelay:{spec.fingerprint.hex()}:".encode()
        self._pool = redis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # No retries: a retry doubles the time to fail, and the caller
            # (prefill: recompute; decode: fail the request) decides anyway.
            retry=Retry(NoBackoff(), 0),
            max_connections=max_connections,
            command_packer=ZeroCopyRespPacker(),
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._close_lock = threading.Lock()
        self._is_closed = False

    def block_key(self, block_hash: BlockHash) -> bytes:
        """The Redis key a block is stored under (tests write corrupt values there)."""
        return self._prefix + b"b:" + block_hash.hex().encode()

    def tail_key(self, request_id: str) -> bytes:
        """The Redis key a request's tail is stored under."""
        return self._prefix + b"t:" + request_id.encode("utf-8")

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        if not hashes:
            return 0

        def run(pipe: redis.client.Pipeline) -> None:
            for block_hash in hashes:
                pipe.exists(self.block_key(block_hash))

        num_present = 0
        for exists in self._pipeline(run):
            if not exists:
                break
            num_present += 1
        return num_present

    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        for _, kv in blocks:
            self.spec.check_payload(kv)
        if not blocks:
            return
        # Encoded views alias the callers' tensors until the pipeline has sent them.
        encoded = [(h, ScatterValue(self._codec.encode(h, kv))) for h, kv in blocks]

        def run(pipe: redis.client.Pipeline) -> None:
            for block_hash, value in encoded:
                pipe.set(self.block_key(block_hash), value, ex=self.block_ttl_s)

        self._pipeline(run)
        self._stats.add(bytes_in=len(blocks) * self.spec.nbytes)

    def _get_blocks(
        self, hashes: Sequence[BlockHash], out: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """One GETEX pipeline, its replies received past hiredis (`RespReader`).

        Each value lands once, straight from the socket: in a new tensor that
        `get` returns, or (for `get_into`) in a scratch tensor that is verified
        before it is copied to `out[i]`, so a corrupt block leaves `out[i]`
        untouched as the contract says.
        """
        if not hashes:
            return []
        commands = [("GETEX", self.block_key(h), "EX", self.block_ttl_s) for h in hashes]
        scratch = (
            None
            if all(dest is None for dest in out)
            else torch.empty(self.spec.shape, dtype=self.spec.payload_dtype)
        )
        with self._translate_errors(), self._raw_connection() as connection:
            connection.send_packed_command(connection.pack_commands(commands))
            # redis-py has no public handle on the socket; its own parser holds
            # no bytes between commands, so reading past it here is safe.
            reader = RespReader(connection._sock)
            blocks = [
                self._read_block(reader, block_hash, dest, scratch)
                for block_hash, dest in zip(hashes, out, strict=True)
            ]
            if reader.num_buffered:
                raise redis.InvalidResponse("Redis sent more replies than commands")
        return blocks

    def _read_block(
        self,
        reader: RespReader,
        block_hash: BlockHash,
        dest: torch.Tensor | None,
        scratch: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Receives one GETEX reply and checks it; `None` for a miss or a corrupt block."""
        value_len = reader.read_bulk_len()
        if value_len is None:
            self._stats.add(misses=1)
            return None
        if value_len != HEADER_LEN + self.spec.nbytes:
            reader.skip(value_len)  # a block of any other size is corrupt: never keep it
            reader.read_bulk_end()
            self._stats.add(misses=1, corrupt_blocks=1)
            return None
        header = bytearray(HEADER_LEN)
        reader.read_into(memoryview(header))
        kv = (
            torch.empty(self.spec.shape, dtype=self.spec.payload_dtype) if dest is None else scratch
        )
        assert kv is not None, "get_into always passes a scratch tensor"
        payload = kv.view(torch.uint8).reshape(-1).numpy()
        reader.read_into(memoryview(payload))
        reader.read_bulk_end()
        try:
            if dest is None:
                self._codec.verify(header, payload, block_hash)
            else:
                kv = self._codec.decode_parts(header, payload, block_hash, out=dest)
        except BlockCodecError:
            self._stats.add(misses=1, corrupt_blocks=1)
            return None
        self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv

    def put_tail(self, request_id: str, kv: torch.Tensor, prompt_hash: BlockHash) -> None:
        self.spec.check_payload(kv, is_tail=True)
        value = ScatterValue(self._codec.encode(tail_key(request_id, prompt_hash), kv))
        with self._translate_errors():
            self._client.set(self.tail_key(request_id), value, ex=self.tail_ttl_s)
        self._stats.add(bytes_in=kv.nbytes)

    def get_tail(self, request_id: str, prompt_hash: BlockHash) -> torch.Tensor | None:
        with self._translate_errors():
            value = self._client.get(self.tail_key(request_id))
        return self._decode(value, tail_key(request_id, prompt_hash), is_tail=True, out=None)

    def delete_tail(self, request_id: str) -> None:
        with self._translate_errors():
            self._client.delete(self.tail_key(request_id))

    def num_tails(self) -> int:
        with self._translate_errors():
            pattern = self._prefix + b"t:*"
            return sum(1 for _ in self._client.scan_iter(match=pattern, count=1000))

    def stats(self) -> StoreStats:
        return self._stats.snapshot()

    @property
    def is_authenticated(self) -> bool:
        return self._codec.is_authenticated

    def is_healthy(self) -> bool:
        try:
            return bool(self._client.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        with self._close_lock:
            if not self._is_closed:
                self._is_closed = True
                self._pool.disconnect()

    def _decode(
        self, value: bytes | None, key: BlockHash, *, is_tail: bool, out: torch.Tensor | None
    ) -> torch.Tensor | None:
        if value is None:
            self._stats.add(misses=1)
            return None
        try:
            kv = self._codec.decode(value, key, is_tail=is_tail, out=out)
        except BlockCodecError:
            self._stats.add(misses=1, corrupt_blocks=1)
            return None
        self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv

    def _pipeline(self, fill: Callable[[redis.client.Pipeline], None]) -> list:
        """Runs the commands `fill` queues as one pipeline; one reply per command."""
        with self._translate_errors(), self._client.pipeline(transaction=False) as pipe:
            fill(pipe)
            return pipe.execute()

    @contextmanager
    def _raw_connection(self) -> Iterator[redis.connection.AbstractConnection]:
        """A pooled connection for reading replies ourselves; dropped on any error.

        After an error the socket may hold the rest of a reply, so the connection
        is disconnected (the pool reconnects it on its next use) rather than
        handed back out of step.
        """
        connection = self._pool.get_connection()
        try:
            yield connection
        except BaseException:
            connection.disconnect()
            raise
        finally:
            self._pool.release(connection)

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.RedisError, OSError) as exc:
            self._stats.add(errors=1)
            raise StoreUnavailableError(f"Redis store unavailable: {exc}") from exc
