"""Span names, attribute keys and service names, in one place.

GenAI attributes follow the OpenTelemetry GenAI semantic conventions; kvrelay's
own attributes live under `kvrelay.`.
"""

from __future__ import annotations

# service.name of each role.
SERVICE_ROUTER = "kvrelay-router"
SERVICE_PREFILL = "kvrelay-prefill"
SERVICE_DECODE = "kvrelay-decode"

# Spans.
SPAN_GENERATE = "generate"  # the router's root span, one per request
SPAN_PREFILL_CALL = "router.prefill"
SPAN_DECODE_CALL = "router.decode"
SPAN_PREFILL_QUEUE = "prefill.queue"
SPAN_PREFILL = "prefill"
SPAN_PREFILL_FORWARD = "prefill.forward"
SPAN_STORE_LOOKUP = "kvstore.lookup"
SPAN_STORE_GET = "kvstore.get"
SPAN_STORE_PUT = "kvstore.put"
SPAN_DECODE = "decode"
SPAN_DECODE_ADMISSION = "decode.admission"
SPAN_DECODE_QUEUE = "decode.queue"
SPAN_DECODE_GENERATION = "decode.generation"

# GenAI semantic-convention attributes.
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"

# kvrelay's own attributes.
REQUEST_ID = "kvrelay.request_id"  # the client's
INTERNAL_REQUEST_ID = "kvrelay.internal_request_id"  # the router's, unique
CACHED_PROMPT_TOKENS = "kvrelay.cached_prompt_tokens"
COMPUTED_PROMPT_TOKENS = "kvrelay.computed_prompt_tokens"
PREFILL_WORKER = "kvrelay.prefill_worker"
DECODE_WORKER = "kvrelay.decode_worker"
NUM_BLOCKS = "kvrelay.num_blocks"
NUM_BYTES = "kvrelay.num_bytes"
NUM_HITS = "kvrelay.num_hits"
NUM_RESIDENT_BLOCKS = "kvrelay.num_resident_blocks"
NUM_FETCHED_BLOCKS = "kvrelay.num_fetched_blocks"
TIME_TO_FIRST_TOKEN_S = "kvrelay.time_to_first_token_s"
NUM_GENERATED_TOKENS = "kvrelay.num_generated_tokens"
QUEUE_TIME_S = "kvrelay.queue_time_s"
WORKER_ID = "kvrelay.worker_id"
STATUS_CODE = "kvrelay.status_code"
NUM_ATTEMPTS = "kvrelay.num_attempts"

# Span events on the router's request span.
EVENT_RESUME = "kvrelay.resume"  # a decode worker failed; the request moved on
EVENT_PREFILL_RETRY = "kvrelay.prefill_retry"  # a prefill worker failed; another tries
EVENT_LOCAL_PREFILL = "kvrelay.local_prefill"  # no prefill worker could; decode does
