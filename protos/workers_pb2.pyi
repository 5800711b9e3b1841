from protos import generator_pb2 as _generator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generator_pb2.SamplingParams
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generator_pb2.SamplingParams, _Mapping]] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "has_tail", "num_cached_tokens", "num_computed_tokens", "finish_reason", "tail_id")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    HAS_TAIL_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TAIL_ID_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: float
    has_tail: bool
    num_cached_tokens: int
    num_computed_tokens: int
    finish_reason: _generator_pb2.FinishReason
    tail_id: str
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[float] = ..., has_tail: _Optional[bool] = ..., num_cached_tokens: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[_generator_pb2.FinishReason, str]] = ..., tail_id: _Optional[str] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("result", "worker_id")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    result: PrefillResult
    worker_id: str
    def __init__(self, result: _Optional[_Union[PrefillResult, _Mapping]] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "prefill", "generated_token_ids", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _generator_pb2.SamplingParams
    prefill: PrefillResult
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_generator_pb2.SamplingParams, _Mapping]] = ..., prefill: _Optional[_Union[PrefillResult, _Mapping]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("token_ids", "logprobs", "finish_reason", "num_resident_blocks", "num_fetched_blocks", "num_cached_tokens", "num_reused_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_RESIDENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FETCHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: _generator_pb2.FinishReason
    num_resident_blocks: int
    num_fetched_blocks: int
    num_cached_tokens: int
    num_reused_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[_generator_pb2.FinishReason, str]] = ..., num_resident_blocks: _Optional[int] = ..., num_fetched_blocks: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., num_reused_tokens: _Optional[int] = ...) -> None: ...

class CountResidentRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CountResidentResponse(_message.Message):
    __slots__ = ("num_resident_blocks",)
    NUM_RESIDENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_resident_blocks: int
    def __init__(self, num_resident_blocks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "role", "num_waiting", "num_running", "num_blocks", "num_used_blocks", "num_computed_tokens_total", "num_cached_tokens_total", "num_generated_tokens_total", "num_finished_requests_total", "num_preemptions_total", "store", "num_live_tails", "num_resumed_requests_total", "num_resumed_computed_tokens_total", "num_published_blocks_total", "kv_cache_dtype", "kv_pool_tokens", "kv_pool_bytes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    NUM_LIVE_TAILS_FIELD_NUMBER: _ClassVar[int]
    NUM_RESUMED_REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_RESUMED_COMPUTED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PUBLISHED_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    num_waiting: int
    num_running: int
    num_blocks: int
    num_used_blocks: int
    num_computed_tokens_total: int
    num_cached_tokens_total: int
    num_generated_tokens_total: int
    num_finished_requests_total: int
    num_preemptions_total: int
    store: StoreStats
    num_live_tails: int
    num_resumed_requests_total: int
    num_resumed_computed_tokens_total: int
    num_published_blocks_total: int
    kv_cache_dtype: str
    kv_pool_tokens: int
    kv_pool_bytes: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_blocks: _Optional[int] = ..., num_used_blocks: _Optional[int] = ..., num_computed_tokens_total: _Optional[int] = ..., num_cached_tokens_total: _Optional[int] = ..., num_generated_tokens_total: _Optional[int] = ..., num_finished_requests_total: _Optional[int] = ..., num_preemptions_total: _Optional[int] = ..., store: _Optional[_Union[StoreStats, _Mapping]] = ..., num_live_tails: _Optional[int] = ..., num_resumed_requests_total: _Optional[int] = ..., num_resumed_computed_tokens_total: _Optional[int] = ..., num_published_blocks_total: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., kv_pool_tokens: _Optional[int] = ..., kv_pool_bytes: _Optional[int] = ...) -> None: ...

class StoreStats(_message.Message):
    __slots__ = ("hits", "misses", "bytes_in", "bytes_out", "corrupt_blocks", "errors")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    corrupt_blocks: int
    errors: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., corrupt_blocks: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "role", "address", "model", "kv_fingerprint", "block_size", "vocab_size", "max_context_len", "max_local_prefill_len", "kv_cache_dtype")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_LOCAL_PREFILL_LEN_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    model: str
    kv_fingerprint: bytes
    block_size: int
    vocab_size: int
    max_context_len: int
    max_local_prefill_len: int
    kv_cache_dtype: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., model: _Optional[str] = ..., kv_fingerprint: _Optional[bytes] = ..., block_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_context_len: _Optional[int] = ..., max_local_prefill_len: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s",)
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "num_waiting", "num_running", "kv_usage", "is_draining", "is_stalled", "is_store_unavailable")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    IS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    IS_STALLED_FIELD_NUMBER: _ClassVar[int]
    IS_STORE_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    num_waiting: int
    num_running: int
    kv_usage: float
    is_draining: bool
    is_stalled: bool
    is_store_unavailable: bool
    def __init__(self, worker_id: _Optional[str] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_usage: _Optional[float] = ..., is_draining: _Optional[bool] = ..., is_stalled: _Optional[bool] = ..., is_store_unavailable: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "num_waiting", "num_running", "kv_usage", "last_seen_s", "is_draining", "is_stalled", "is_store_unavailable")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    IS_DRAINING_FIELD_NUMBER: _ClassVar[int]
    IS_STALLED_FIELD_NUMBER: _ClassVar[int]
    IS_STORE_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    address: str
    num_waiting: int
    num_running: int
    kv_usage: float
    last_seen_s: float
    is_draining: bool
    is_stalled: bool
    is_store_unavailable: bool
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ..., address: _Optional[str] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., kv_usage: _Optional[float] = ..., last_seen_s: _Optional[float] = ..., is_draining: _Optional[bool] = ..., is_stalled: _Optional[bool] = ..., is_store_unavailable: _Optional[bool] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "model", "kv_cache_dtype")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    model: str
    kv_cache_dtype: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., model: _Optional[str] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...
