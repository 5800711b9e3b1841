"""Breaks each rule the flow tests cover, one at a time, and checks that they fail.

`python tests/break_rules.py` (a few minutes): each line says `caught` or `MISSED`;
the exit status is 1 if any rule could be broken without a test failing. Not a
test itself (it rewrites source files while it runs, restoring each one after).
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
MUTATIONS = [
    (
        "prefill: tail released on cancel",
        "prefill_worker/handoff.py",
        "            put.add_done_callback(_retrieve_exception)  # the thread logs what matters\n            lease.release()\n",
        "            put.add_done_callback(_retrieve_exception)  # the thread logs what matters\n",
        "tests/prefill_worker/test_prefill_flow.py",
    ),
    (
        "prefill: claims released",
        "prefill_worker/inflight_prefixes.py",
        "        finally:\n            claim.release_all()",
        "        finally:\n            pass",
        "tests/prefill_worker/test_prefill_flow.py",
    ),
    (
        "prefill: waiter waits for in-flight prefix",
        "prefill_worker/inflight_prefixes.py",
        "            await asyncio.wait(waits)",
        "            break",
        "tests/prefill_worker/test_prefill_flow.py",
    ),
    (
        "prefill: stored prefix reused",
        "prefill_worker/store_io.py",
        "num_usable = min(num_present, (prompt_len - 1) // block_size)",
        "num_usable = 0",
        "tests/prefill_worker/test_prefill_flow.py",
    ),
    (
        "decode: resident blocks reused",
        "decode_worker/engine.py",
        "        return self.pool.lookup_prefix(block_hashes)",
        "        return 0",
        "tests/decode_worker/test_decode_flow.py",
    ),
    (
        "decode: tail deleted once read",
        "decode_worker/kv_fetch.py",
        "            with TailLease(functools.partial(store.delete_tail, tail_id), tail_id):\n                tail = store.get_tail(tail_id, prompt_hash)",
        "            tail = store.get_tail(tail_id, prompt_hash)",
        "tests/decode_worker/test_decode_flow.py",
    ),
    (
        "decode: a tail is read for its own prompt only",
        "kvstore/memory_store.py",
        "        if stored is None or stored[0] != prompt_hash:",
        "        if stored is None:",
        "tests/decode_worker/test_decode_flow.py",
    ),
    (
        "decode: the prompt is hashed with its cache salt",
        "decode_worker/admission.py",
        "hash_token_blocks(tokens, spec.block_size, spec.fingerprint, call.cache_salt)",
        "hash_token_blocks(tokens, spec.block_size, spec.fingerprint)",
        "tests/decode_worker/test_decode_flow.py",
    ),
    (
        "decode: abort when the caller leaves",
        "decode_worker/decode_flow.py",
        "                self.loop.abort(call.request_id)",
        "                pass",
        "tests/decode_worker/test_decode_flow.py",
    ),
    (
        "router: fail over on UNAVAILABLE",
        "router/worker_calls.py",
        "                    continue  # the worker is gone",
        "                    pass  # the worker is gone",
        "tests/router/test_relay_flow.py",
    ),
    (
        "router: tail released on a failed prefill",
        "router/worker_calls.py",
        "                # The worker may have put the tail before it failed or its answer was lost.\n                tail.release()\n",
        "",
        "tests/router/test_relay_flow.py",
    ),
    (
        "router: tail released when the request ends before decode",
        "router/relay.py",
        "        with prefilled.tail if prefilled else contextlib.nullcontext():",
        "        with contextlib.nullcontext():",
        "tests/router/test_relay_flow.py",
    ),
    (
        "router: tail handed over on the first decode message",
        "router/relay.py",
        "                    prefilled.tail.hand_over()",
        "                    pass",
        "tests/router/test_relay_flow.py",
    ),
    (
        "router: one tail id per attempt",
        "router/worker_calls.py",
        'attempt_id = f"{req.request_id}.p{len(tried)}"',
        'attempt_id = f"{req.request_id}.p1"',
        "tests/router/test_relay_flow.py",
    ),
    (
        "precedence: a stop string wins over LENGTH",
        "model/sampling_params.py",
        "return FinishReason.STOP if is_stop_string_matched else token_reason",
        "return token_reason or (FinishReason.STOP if is_stop_string_matched else None)",
        "tests/router/test_relay_flow.py tests/router/test_responses.py tests/model/test_sampling.py",
    ),
    (
        "precedence: a stop token wins over LENGTH",
        "model/sampling_params.py",
        "    if token_id in stop_token_ids:\n        return FinishReason.STOP\n    if num_output_tokens >= max_tokens:\n        return FinishReason.LENGTH",
        "    if num_output_tokens >= max_tokens:\n        return FinishReason.LENGTH\n    if token_id in stop_token_ids:\n        return FinishReason.STOP",
        "tests/router/test_relay_flow.py tests/model/test_sampling.py",
    ),
    (
        "tiny temperatures are greedy",
        "model/sampling_params.py",
        "return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1",
        "return self.temperature == 0.0 or self.top_k == 1",
        "tests/model/test_sampling.py",
    ),
]
failures = []
for name, path, old, new, tests in MUTATIONS:
    file = ROOT / path
    original = file.read_text()
    assert old in original, f"{name}: pattern not found in {path}"
    file.write_text(original.replace(old, new, 1))
    try:
        result = subprocess.run(
            [str(ROOT / ".venv/bin/pytest"), "-q", "-x", "-p", "no:cacheprovider", *tests.split()],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        file.write_text(original)
    caught = result.returncode != 0
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")][:1]
    print(f"{'caught' if caught else 'MISSED'}: {name}  {failed[0] if failed else ''}", flush=True)
    if not caught:
        failures.append(name)
sys.exit(1 if failures else 0)
