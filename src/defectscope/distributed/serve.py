"""Serve the REST API as N Ray Serve replicas of the same FastAPI app.

Each replica builds `defectscope.serving.app.create_app` from ``DEFECTSCOPE_*`` settings passed
through its runtime environment and loads the model before it reports ready, so Serve routes no
request to a replica without a model. Ray Serve's proxy does the HTTP; batching, limits, API key,
metrics and the prediction log are the app's own, per replica.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError

APP_NAME = "defectscope"


def build_app() -> Any:
    """ASGI builder run inside each replica: load the model, then build the app around it."""
    from defectscope.export.runtimes import load_detector
    from defectscope.serving.app import create_app
    from defectscope.serving.settings import ServingSettings
    from defectscope.serving.thresholds import file_fingerprint

    set_threads_from_reservation()
    settings = ServingSettings()  # fields come from DEFECTSCOPE_*
    if settings.model_path is None:
        raise DefectscopeError("no model configured (set DEFECTSCOPE_MODEL_PATH)")
    detector = load_detector(settings.model_path, settings.runtime, settings.device)
    app = create_app(settings, detector=detector)
    # The same model identity as `defectscope serve` reports (file hash, not training hash).
    app.state.serving.use_detector(detector, file_fingerprint(settings.model_path))
    return app


def set_threads_from_reservation() -> None:
    """Torch threads = the CPUs this replica reserved: N replicas must not fight over cores."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))


def replica_environment(model: Path, runtime: str) -> dict[str, str]:
    """DEFECTSCOPE_* settings for the replicas: this process's, plus the model to serve."""
    env = {k: v for k, v in os.environ.items() if k.startswith("DEFECTSCOPE_")}
    env["DEFECTSCOPE_MODEL_PATH"] = str(model.resolve())
    env["DEFECTSCOPE_RUNTIME"] = runtime
    log_url = env.get("DEFECTSCOPE_PREDICTION_LOG_URL", "sqlite:///predictions.db")
    if log_url.startswith("sqlite:///") and not log_url.startswith("sqlite:////"):
        # Replicas run in Ray's session folder: anchor a relative SQLite file where the user is.
        env["DEFECTSCOPE_PREDICTION_LOG_URL"] = "sqlite:///" + str(
            Path(log_url.removeprefix("sqlite:///")).resolve()
        )
    return env


def deploy(
    model: str | Path,
    *,
    replicas: int = 1,
    runtime: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    cpus_per_replica: float | None = None,
) -> str:
    """Start Serve on the connected Ray cluster and deploy ``replicas`` copies; return the URL.

    Serve keeps running in the cluster after this returns; `shutdown` stops it.
    """
    from defectscope.detector.model_file import resolve_model_path
    from defectscope.distributed.cluster import cluster_cpus, first_line, require_ray

    if replicas < 1:
        raise DefectscopeError(f"--replicas must be at least 1, not {replicas}")
    model = Path(model)
    if model.suffix.lower() in (".onnx", ".xml"):
        if not model.exists():
            raise DefectscopeError(f"{model}: model file not found")
    else:
        resolve_model_path(model)  # fail here with one line, not in every replica
    ray = require_ray()
    if cpus_per_replica is None:
        # Replicas that ask for more CPUs than the cluster has wait forever: share what is there.
        cpus_per_replica = min(1.0, cluster_cpus(ray) / replicas)
    try:
        from ray import serve
    except ImportError:
        raise DefectscopeError(
            "Ray Serve is not installed: pip install 'defectscope[ray]'"
        ) from None

    @serve.deployment(
        name="DefectscopeAPI",
        num_replicas=replicas,
        ray_actor_options={
            "num_cpus": cpus_per_replica,
            "runtime_env": {"env_vars": replica_environment(model, runtime)},
        },
    )
    @serve.ingress(build_app)
    class DefectscopeAPI:
        pass

    serve.start(http_options={"host": host, "port": port})
    try:
        deployment: Any = DefectscopeAPI  # Serve's decorators hide .bind from type checkers
        serve.run(deployment.bind(), name=APP_NAME, route_prefix="/")
    except Exception as exc:  # a replica that cannot load the model fails the deployment
        raise DefectscopeError(f"Ray Serve deployment failed: {first_line(exc)}") from None
    return f"http://{host}:{port}"


def shutdown() -> None:
    """Stop the application and Serve's proxy and controller."""
    from ray import serve

    serve.shutdown()


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM end the blocking wait (and so shut Serve down).

    A process started with SIGINT ignored (a background job of a non-interactive shell, or a
    parent that ignores it) inherits that, and Python then never raises KeyboardInterrupt;
    containers and process managers stop services with SIGTERM. Both must stop Serve.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def serve_on_cluster(
    model: str | Path,
    *,
    address: str | None = None,
    replicas: int = 1,
    on_ready: Callable[[str], None] | None = None,
    **options: Any,
) -> None:
    """Deploy on the cluster at ``address`` (None: a local one) and block until Ctrl+C or
    SIGTERM, then shut Serve down."""
    from defectscope.distributed.cluster import ray_cluster

    stop_on_signals()
    with ray_cluster(address):
        # Ctrl+C may come while replicas still start: stop Serve then too, not only once up.
        try:
            url = deploy(model, replicas=replicas, **options)
            if on_ready is not None:
                on_ready(url)
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        finally:
            shutdown()
