"""The worker flags of `kvrelay serve` and `kvrelay up` become the workers' configs
in one place (`deploy.worker_flags`); bad values are refused naming the flag."""

from __future__ import annotations

import argparse

import pytest

from deploy.worker_flags import add_worker_flags, decode_config, prefill_config, worker_options
from rpc.worker_server import WorkerAddress


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_worker_flags(parser)
    return parser.parse_args(argv)


def test_defaults_publish_generated_blocks_and_bound_the_queue():
    options = worker_options(parse())
    decode = decode_config(options, WorkerAddress(), "memory")
    prefill = prefill_config(options, WorkerAddress(), "memory")
    assert decode.publish_computed_blocks
    assert decode.limits == prefill.limits
    assert (decode.limits.max_queued, decode.limits.engine_stall_timeout_s) == (128, 60.0)
    assert options.drain_timeout_s == 30.0


def test_every_failover_and_bound_flag_reaches_the_configs():
    args = parse(
        "--no-publish-generated",
        "--max-queued",
        "7",
        "--engine-stall-timeout",
        "2.5",
        "--drain-timeout",
        "4",
    )
    options = worker_options(args)
    decode = decode_config(options, WorkerAddress(), "memory")
    prefill = prefill_config(options, WorkerAddress(), "memory")
    assert not decode.publish_computed_blocks
    assert decode.limits.max_queued == prefill.limits.max_queued == 7
    assert decode.limits.engine_stall_timeout_s == prefill.limits.engine_stall_timeout_s == 2.5
    assert options.drain_timeout_s == 4.0


def test_the_decode_token_budget_reaches_the_scheduler():
    from decode_worker.scheduler import SchedulerConfig

    default = decode_config(worker_options(parse()), WorkerAddress(), "memory")
    assert default.engine.scheduler.max_num_batched_tokens == 512
    assert SchedulerConfig().max_num_batched_tokens == 512  # the flag's default is the engine's
    options = worker_options(parse("--max-num-batched-tokens", "96"))
    assert decode_config(options, WorkerAddress(), "memory").engine.scheduler == SchedulerConfig(
        max_num_batched_tokens=96
    )


def test_enforce_eager_reaches_the_decode_engine():
    default = decode_config(worker_options(parse()), WorkerAddress(), "memory")
    assert not default.engine.enforce_eager
    eager = decode_config(worker_options(parse("--enforce-eager")), WorkerAddress(), "memory")
    assert eager.engine.enforce_eager


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--max-num-batched-tokens", "0"), "--max-num-batched-tokens must be >= 1, got 0"),
        (("--max-queued", "-1"), "--max-queued must be >= 0"),
        (("--engine-stall-timeout", "0"), "--engine-stall-timeout must be > 0"),
        (("--drain-timeout", "-2"), "--drain-timeout must be >= 0"),
    ],
)
def test_bad_values_name_their_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        worker_options(parse(*argv))


def test_the_kv_secret_file_reaches_both_workers_stores(tmp_path):
    secret_file = tmp_path / "kv.secret"
    secret_file.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    options = worker_options(parse("--kv-secret-file", str(secret_file)))
    secret = b"0123456789abcdef0123456789abcdef"
    assert decode_config(options, WorkerAddress(), "memory").store_secret == secret
    assert prefill_config(options, WorkerAddress(), "memory").store_secret == secret
    assert "0123" not in repr(options) + repr(decode_config(options, WorkerAddress(), "memory"))


def test_a_short_or_missing_kv_secret_file_is_refused(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    with pytest.raises(ValueError, match="holds 4 bytes; use at least 16"):
        worker_options(parse("--kv-secret-file", str(short)))
    with pytest.raises(ValueError, match="cannot read --kv-secret-file"):
        worker_options(parse("--kv-secret-file", str(tmp_path / "absent")))
