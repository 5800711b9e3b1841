"""`RayDeployment`: a kvrelay cluster (router, prefill and decode workers) as Ray
actors on the Ray cluster this process is connected to.

Placement: the router on the head node (it serves the public port there), the
workers spread over the nodes (`SPREAD`), each worker with a GPU where the cluster
has GPUs. Worker actors restart forever (`max_restarts=-1`): a restarted worker
registers again under its id. The router is restarted too, and workers re-register
with it when it answers that it does not know them. Every actor gets the `OTEL_*`
environment of the launching process, so one trace spans the whole cluster.

Start-up is ready when the router's health check says SERVING and every worker is
registered. `shutdown()` stops the services (workers deregister), kills the actors
and removes this launch's KV index actor; stopping Ray itself is the caller's job.
On a local Ray instance that is about to stop anyway, `stop_services()` is enough.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.exceptions import GetTimeoutError, RayError

from deploy.launch_config import LaunchConfig
from deploy.ray_actors import ActorInfo, DecodeActor, PrefillActor, RouterActor
from deploy.worker_flags import decode_config, prefill_config
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from router.service import RouterConfig
from rpc.channel import open_blocking_channel
from rpc.worker_server import WorkerAddress

# Ray's resource on the head node; a tiny amount of it pins an actor there.
HEAD_NODE_RESOURCE = "node:__internal_head__"
STOP_TIMEOUT_S = 10.0
READY_POLL_S = 0.5

Progress = Callable[[str], None]


class LaunchError(RuntimeError):
    """The cluster could not be started; the message says why."""


@dataclass(frozen=True)
class WorkerActor:
    """One worker of the deployment."""

    worker_id: str
    """Its id in the router's registry (stable across restarts)."""
    role: str
    """"prefill" or "decode"."""
    actor: ray.actor.ActorHandle


class RayDeployment:
    """A kvrelay cluster on Ray: `start()` creates it, `shutdown()` removes it."""

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.router: ray.actor.ActorHandle | None = None
        self.endpoint = ""
        """host:port of the router's public port, dialable from every node (once
        started)."""
        self.internal_endpoint = ""
        """host:port of the router's Registry, where the workers register."""
        self.workers: list[WorkerActor] = []
        self.store_namespace = f"kvrelay-{uuid.uuid4().hex[:8]}"
        """Ray namespace of this launch's KV index actor (store `ray`)."""

    def start(self, progress: Progress = lambda _: None) -> None:
        """Creates the actors and waits until the cluster serves. Needs
        `ray.is_initialized()`. Raises `LaunchError` after removing what it
        created; on a signal (a BaseException) the caller shuts down."""
        try:
            self._start(progress)
        except Exception:
            self.shutdown()
            raise

    def _start(self, progress: Progress) -> None:
        config = self.config
        env = {k: v for k, v in os.environ.items() if k.startswith("OTEL_")}
        runtime_env = {"env_vars": env} if env else None
        router_options = {
            "num_cpus": config.num_cpus_per_actor,
            "resources": {HEAD_NODE_RESOURCE: 0.001, **config.router_resources},
            "max_restarts": -1,
            "max_task_retries": 3,
            "runtime_env": runtime_env,
        }
        self.router = (
            ray.remote(RouterActor)
            .options(**router_options)
            .remote(
                RouterConfig(
                    model=config.model,
                    address=f"0.0.0.0:{config.port}",
                    tls=config.tls,
                    http_port=config.http_port,
                    served_model_name=config.served_model_name,
                )
            )
        )
        # No retries: a router that cannot start fails the same way again.
        router_info = self._get(self.router.info.options(max_task_retries=0).remote(), "the router")
        self.endpoint = router_info.address
        self.internal_endpoint = router_info.internal_address
        progress(f"router ready at {self.endpoint}")

        num_gpus = config.num_gpus_per_worker
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        device = "cuda" if num_gpus > 0 else "cpu"
        num_threads = max(1, int(config.num_cpus_per_actor))
        store_url = config.store_url_in_namespace(self.store_namespace)
        actor_options = {
            "num_cpus": config.num_cpus_per_actor,
            "num_gpus": num_gpus,
            "scheduling_strategy": "SPREAD",
            "max_restarts": -1,
            "max_task_retries": 3,
            "runtime_env": runtime_env,
        }
        options = dataclasses.replace(config.workers, device=device, num_threads=num_threads)
        for i in range(config.num_prefill_workers):
            where = WorkerAddress(
                router=self.internal_endpoint, worker_id=f"prefill-{i}", tls=config.tls
            )
            actor = (
                ray.remote(PrefillActor)
                .options(**actor_options, resources=dict(config.prefill_resources))
                .remote(prefill_config(options, where, store_url))
            )
            self.workers.append(WorkerActor(where.worker_id, "prefill", actor))
        for i in range(config.num_decode_workers):
            where = WorkerAddress(
                router=self.internal_endpoint, worker_id=f"decode-{i}", tls=config.tls
            )
            actor = (
                ray.remote(DecodeActor)
                .options(**actor_options, resources=dict(config.decode_resources))
                .remote(decode_config(options, where, store_url))
            )
            self.workers.append(WorkerActor(where.worker_id, "decode", actor))
        progress(
            f"starting {config.num_prefill_workers} prefill and "
            f"{config.num_decode_workers} decode workers ({device})..."
        )
        for worker in self.workers:
            info = self._get(worker.actor.info.remote(), worker.worker_id)
            progress(f"  {worker.worker_id} serving at {info.address}")
        self.wait_ready(self.config.ready_timeout_s)
        progress(f"{len(self.workers)} workers registered")

    def _get(self, ref: ray.ObjectRef, what: str) -> ActorInfo:
        try:
            return ray.get(ref, timeout=self.config.ready_timeout_s)
        except GetTimeoutError:
            raise LaunchError(
                f"{what} did not start within {self.config.ready_timeout_s:.0f} s; "
                "the Ray cluster may lack the CPUs/GPUs it asks for (see `ray status`)"
            ) from None
        except RayError as err:
            raise LaunchError(f"{what} failed to start: {_root_cause(err)}") from None

    def wait_ready(self, timeout_s: float) -> None:
        """Waits until the router is SERVING and lists every worker of the deployment."""
        expected = {w.worker_id for w in self.workers}
        deadline = time.monotonic() + timeout_s
        with (
            grpc.insecure_channel(self.endpoint) as public,
            open_blocking_channel(self.internal_endpoint, self.config.tls) as internal,
        ):
            health = health_pb2_grpc.HealthStub(public)
            registry = wgrpc.RegistryStub(internal)
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    listed = registry.ListWorkers(wpb.ListWorkersRequest(), timeout=2).workers
                    registered = {w.worker_id for w in listed}
                    if status == health_pb2.HealthCheckResponse.SERVING and expected <= registered:
                        return
                except grpc.RpcError:
                    registered = set()
                if time.monotonic() > deadline:
                    missing = ", ".join(sorted(expected - registered)) or "none"
                    raise LaunchError(
                        f"the cluster at {self.endpoint} was not ready within {timeout_s:.0f} s "
                        f"(workers not registered: {missing})"
                    )
                time.sleep(READY_POLL_S)

    def stop_services(
        self, timeout_s: float = STOP_TIMEOUT_S, drain_timeout_s: float = 0.0
    ) -> None:
        """Asks every service to stop; gives up on an actor after `timeout_s` (plus
        the drain). With `drain_timeout_s`, all of them drain at once: the router
        refuses new requests while the workers finish those in flight. Without it,
        workers stop first so they deregister while the router still answers. Direct
        actor calls only, so it works (or times out) even when Ray's GCS is gone."""
        workers, router = [w.actor for w in self.workers], [self.router] if self.router else []
        groups = [workers + router] if drain_timeout_s > 0 else [workers, router]
        for group in groups:
            refs = [
                actor.stop.options(max_task_retries=0).remote(drain_timeout_s) for actor in group
            ]
            # A dead or stuck actor is killed by `shutdown` (or with Ray) either way.
            with contextlib.suppress(RayError):
                ray.get(refs, timeout=timeout_s + drain_timeout_s)

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stops every service (draining it for `drain_timeout_s`), kills the actors
        and this launch's KV index, so the Ray cluster is as before. Safe to call
        twice and after a failed start."""
        self.stop_services(drain_timeout_s=drain_timeout_s)
        for actor in [w.actor for w in self.workers] + ([self.router] if self.router else []):
            ray.kill(actor, no_restart=True)
        self.workers, self.router = [], None
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == self.store_namespace:
                with contextlib.suppress(ValueError):  # already gone
                    ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))


def _root_cause(err: RayError) -> str:
    """The actor constructor's own error message, without Ray's wrapping."""
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(err).__name__
