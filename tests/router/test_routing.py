from router.registry import Role, WorkerEntry, WorkerRegistry
from router.routing import PrefixLoadPolicy


def workers(*loads):
    return [
        WorkerEntry(f"w{i}", Role.DECODE, f"h:{i}", num_inflight=load)
        for i, load in enumerate(loads)
    ]


def test_decode_prefers_resident_blocks_within_load_slack():
    policy = PrefixLoadPolicy(load_slack=2)
    ws = workers(0, 2)
    assert policy.pick_decode(ws, {"w1": 5}).worker_id == "w1"


def test_decode_load_beats_locality_beyond_slack():
    policy = PrefixLoadPolicy(load_slack=2)
    ws = workers(0, 3)
    assert policy.pick_decode(ws, {"w1": 5}).worker_id == "w0"


def test_ties_go_to_least_loaded_then_id():
    policy = PrefixLoadPolicy()
    assert policy.pick_decode(workers(1, 0, 0), {}).worker_id == "w1"


def test_prefill_follows_the_worker_that_computed_the_prefix():
    policy = PrefixLoadPolicy()
    ws = workers(0, 0)
    chain = [b"a", b"b", b"c"]
    policy.on_prefilled(ws[1], chain[:2])
    assert policy.pick_prefill(ws, chain).worker_id == "w1"
    assert policy.prefix_index.num_matched("w1", chain) == 2
    policy.prefix_index.forget_worker("w1")
    assert policy.pick_prefill(ws, chain).worker_id == "w0"


def test_registry_expires_silent_workers_and_reports_unknown_heartbeats():
    now = [0.0]
    registry = WorkerRegistry(expiry_s=3.0, clock=lambda: now[0])
    registry.register("p0", Role.PREFILL, "h:1")
    registry.register("d0", Role.DECODE, "h:2")
    now[0] = 2.0
    assert registry.heartbeat("d0", num_waiting=1, num_running=2, kv_usage=0.5)
    now[0] = 4.0
    assert [w.worker_id for w in registry.expire()] == ["p0"]
    assert [w.worker_id for w in registry.workers()] == ["d0"]
    assert not registry.heartbeat("p0", 0, 0, 0.0)
    assert registry.get("d0").num_running == 2


def test_router_modules_do_not_import_torch():
    """The router starts fast and stays small: tokenizer, protos and routing only."""
    import subprocess
    import sys

    code = "import sys, router.service, router.relay; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
