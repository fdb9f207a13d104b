"""``adapt-serve --ray``: start (or join) a Ray cluster and run the ingress + engine application on Serve."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click
from adapt_runtime.serving.types import CliOptions

if TYPE_CHECKING:
    from adapt_runtime.serving.cluster.config import ClusterConfig
    from adapt_runtime.serving.config import ServerConfig
    from ray.serve import Application

F = TypeVar("F", bound=Callable[..., object])
log = logging.getLogger("adapt_serve")
INGRESS_BODY_LIMIT = 2**30  # the engines' guard applies the exact per-route limits


def build_application(config: ClusterConfig) -> Application:
    """The bound Serve application: Ingress -> SessionEngine."""
    from adapt_runtime.serving.cluster.engine_deployment import engine_deployment
    from adapt_runtime.serving.cluster.ingress import Ingress

    engine = engine_deployment(config).bind(config.for_replica())
    return Ingress.bind(engine,  # type: ignore[attr-defined]  # serve.deployment adds bind (ray not analysed)
                        max(INGRESS_BODY_LIMIT, config.server.max_request_bytes))


def check_stores(config: ClusterConfig) -> None:
    """Fail at start, not at the first turn, when Redis or the state store cannot be reached."""
    import redis
    from adapt_runtime.serving.cluster.blobs import BlobStore

    client = redis.Redis.from_url(config.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
    try:
        client.ping()
    except redis.RedisError as err:
        raise LookupError(f"redis at {config.redis_url} is unreachable: {err}") from None
    finally:
        client.close()
    BlobStore(config.state_store)


def start(config: ClusterConfig, address: str | None = None) -> None:
    """Start Serve's HTTP proxy where the single-process server would listen and deploy the application."""
    import ray
    from ray import serve

    check_stores(config)
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_application(config), name=config.app_name, route_prefix="/")


def run_forever(config: ClusterConfig, address: str | None = None) -> None:
    """``start``, then block until SIGINT/SIGTERM and shut Serve down."""
    from ray import serve

    start(config, address)
    log.info("adapt-serve cluster: %d engine replica(s) behind http://%s:%d", config.replicas, config.server.host,
             config.server.port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(config.app_name)
    serve.shutdown()


FLAGS = ("ray_mode", "replicas", "max_replicas", "redis_url", "state_store", "ray_address", "lease_ttl")


def cluster_options(fn: F) -> F:
    """The ``--ray`` flags of ``adapt-serve`` (kept here so the command's own options stay as they are)."""
    options = [
        click.option("--ray", "ray_mode", is_flag=True,
                     help="Serve on Ray Serve: a stateless ingress and --replicas engine replicas, each turn under a "
                          "Redis lease and committed to --state-store (needs the 'ray' extra)."),
        click.option("--replicas", type=int, default=2, show_default=True, help="Engine replicas (with --ray)."),
        click.option("--max-replicas", type=int, default=None,
                     help="Autoscale engine replicas between --replicas and this (with --ray)."),
        click.option("--redis", "redis_url", default=None, metavar="URL",
                     help="Redis for leases and heads, e.g. redis://127.0.0.1:6379/0 (with --ray)."),
        click.option("--state-store", default=None, metavar="URL",
                     help="Directory or fsspec URL (e.g. s3://bucket/sessions) shared by all replicas (with --ray)."),
        click.option("--ray-address", default=None, metavar="ADDRESS",
                     help="Join this Ray cluster (e.g. 'auto'); default: start a local one (with --ray)."),
        click.option("--lease-ttl", type=int, default=10_000, show_default=True, metavar="MS",
                     help="Lease lifetime in ms, renewed every third of it while a turn runs (with --ray)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def cluster_server(options: CliOptions) -> Callable[..., None] | None:
    """Take the ``--ray`` flags out of ``options``; without ``--ray`` None, else a ``serve(config, log_level)``
    that runs the cluster."""
    flags = {name: options.pop(name) for name in FLAGS}
    if not flags["ray_mode"]:
        return None
    if not flags["redis_url"] or not flags["state_store"]:
        raise click.UsageError("--ray needs --redis URL and --state-store URL")

    def serve(config: ServerConfig, log_level: str = "info") -> None:
        try:
            import ray  # noqa: F401
            import redis  # noqa: F401
            from adapt_runtime.serving.cluster.config import ClusterConfig
        except ImportError as err:
            raise LookupError(f"--ray needs the ray extra (pip install 'adapt-runtime[ray]'): {err}") from None

        cluster = ClusterConfig(config, flags["redis_url"], flags["state_store"], replicas=flags["replicas"],
                                max_replicas=flags["max_replicas"], lease_ttl_ms=flags["lease_ttl"])
        run_forever(cluster, flags["ray_address"])

    return serve
