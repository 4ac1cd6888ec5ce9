"""``python -m service.cluster``: the same service on Ray Serve, as replicas behind one endpoint.

    python -m service.cluster [--address local|auto|ray://host:10001] [--host 127.0.0.1] [--port 8000]
        [--min-replicas 1] [--max-replicas 2] [--target-ongoing 8] [--replica-cpus 1]

Every replica builds the FastAPI app of ``python -m service`` (``create_app``: same routes, same
errors, same lifespan: it loads the model repository, runs its batchers and job workers) from the
``GSA_*`` settings of the process that deploys it, which are passed to the replicas. Ray Serve's
proxy takes the HTTP requests on ``--host:--port`` and sends each to a replica; the number of
replicas follows the ongoing requests per replica (``--target-ongoing``) between ``--min-replicas``
and ``--max-replicas``. A replica that dies is replaced by Serve; its in-flight requests fail, and
the clients retry them.

Every answer carries ``X-GSA-Replica`` (the Serve replica that produced it), so that a client or a
test can see the work spread. The model repository and the jobs directory must be visible to every
node at the same path (jobs are shared through the SQLite store, safe across processes on one
file system).

The same application for ``serve run`` / ``serve deploy`` and KubeRay: ``service.cluster:app_builder`` with
``deploy/serve.yaml`` and ``deploy/rayservice.yaml``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["build", "app_builder", "main", "REPLICA_HEADER"]

REPLICA_HEADER = "X-GSA-Replica"
LOCAL = "local"


def _settings_env() -> dict[str, str]:
    """The service's settings of this process, for the replicas (``GSA_*``, and where it runs)."""
    return {k: v for k, v in os.environ.items() if k.startswith("GSA_")}


def _asgi_app():
    """Built on each replica when it starts: the service's app, with the replica's name on every answer."""
    from ray import serve

    from service.app import create_app

    app = create_app()
    replica = serve.get_replica_context().replica_id.unique_id

    @app.middleware("http")
    async def name_the_replica(request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return app


def build(*, min_replicas: int = 1, max_replicas: int = 2, target_ongoing: float = 8.0, replica_cpus: float = 1.0,
          max_ongoing: int = 64, upscale_delay_s: float = 30.0, downscale_delay_s: float = 600.0,
          env: dict[str, str] | None = None):
    """The Serve application: one deployment, the service's app as its ingress, autoscaling."""
    from ray import serve

    if not 1 <= min_replicas <= max_replicas:
        raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {min_replicas} and {max_replicas}")
    ingress = serve.ingress(_asgi_app)

    class GSAServe:
        """One replica: the whole service in a Ray actor."""

    deployment = serve.deployment(
        ingress(GSAServe),
        name="gsa-serve",
        max_ongoing_requests=max_ongoing,
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target_ongoing,
                            "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s},
        ray_actor_options={"num_cpus": replica_cpus, "runtime_env": {"env_vars": env if env is not None else _settings_env()}},
        health_check_period_s=5,
    )
    return deployment.bind()


def app_builder(args: dict[str, Any]):
    """For ``serve run service.cluster:app_builder min_replicas=1 max_replicas=2`` and Serve config files."""
    known = {"min_replicas", "max_replicas", "target_ongoing", "replica_cpus", "max_ongoing", "upscale_delay_s",
             "downscale_delay_s"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return build(min_replicas=int(args.get("min_replicas", 1)), max_replicas=int(args.get("max_replicas", 2)),
                 target_ongoing=float(args.get("target_ongoing", 8)), replica_cpus=float(args.get("replica_cpus", 1)),
                 max_ongoing=int(args.get("max_ongoing", 64)), upscale_delay_s=float(args.get("upscale_delay_s", 30)),
                 downscale_delay_s=float(args.get("downscale_delay_s", 600)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default=LOCAL, help="'local' (a Ray instance on this machine), 'auto', ray://host:10001")
    p.add_argument("--host", default="127.0.0.1", help="address of Serve's HTTP proxy (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--target-ongoing", type=float, default=8.0, help="ongoing requests per replica to scale at")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves for each replica")
    p.add_argument("--max-ongoing", type=int, default=64, help="requests a replica takes at once; more wait in the proxy")
    p.add_argument("--upscale-delay-s", type=float, default=30.0, help="load above target this long adds a replica")
    p.add_argument("--downscale-delay-s", type=float, default=600.0, help="load below target this long removes one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    args = p.parse_args(argv)
    if args.address == LOCAL:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at import: every socket on loopback
    os.environ.setdefault("GSA_HOST", args.host)  # GSA_AUTH=auto decides from the address clients reach
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.exit("python -m service.cluster: Ray Serve is not installed: pip install -e '.[distributed]'")
    if args.address == LOCAL:
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    else:
        ray.init(address=args.address, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(min_replicas=args.min_replicas, max_replicas=args.max_replicas, target_ongoing=args.target_ongoing,
                    replica_cpus=args.replica_cpus, max_ongoing=args.max_ongoing, upscale_delay_s=args.upscale_delay_s,
                    downscale_delay_s=args.downscale_delay_s), name="gsa-serve", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port} with {args.min_replicas}-{args.max_replicas} replicas", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
