"""Connect to a Ray cluster, or start a local one, with errors a user can act on.

``address`` follows ``ray.init``: ``None`` starts a private local cluster on this machine,
``"auto"`` joins the cluster started here with ``ray start --head``, ``"host:6379"`` joins a
cluster's GCS from a node of it, and ``"ray://host:10001"`` connects through Ray Client.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from defectscope.errors import DefectscopeError

RAY_EXTRA_HINT = "pip install 'defectscope[ray]'"
# A probe, not the connection: long enough for a remote head, short enough to fail fast.
PROBE_TIMEOUT_S = 5.0
# How long a finished Ray Data run may take to let its driver threads end (see `join_threads`).
SETTLE_TIMEOUT_S = 10.0


class RayUnavailableError(DefectscopeError):
    """Ray is not installed, or the cluster cannot be reached."""


def require_ray() -> ModuleType:
    """The ``ray`` module, or an error that names the extra to install."""
    # Before Ray Data first runs: its usage collection polls from a driver thread that never
    # ends, and an inspection line's tool sends no usage data unless the user turns it on.
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(
            f"the Ray engine needs Ray: {RAY_EXTRA_HINT} (installs ray[data,serve])"
        ) from None
    return ray


def started_by_ray(thread: threading.Thread) -> bool:
    """Whether ``thread`` runs Ray's code (its target, or its class for a Thread subclass)."""
    target = getattr(thread, "_target", None)
    module = getattr(target, "__module__", None) or type(thread).__module__
    return module == "ray" or module.startswith("ray.")


def join_threads(
    before: Collection[threading.Thread],
    timeout_s: float = SETTLE_TIMEOUT_S,
    select: Callable[[threading.Thread], bool] = started_by_ray,
) -> list[str]:
    """Wait, at most ``timeout_s`` in all, for the threads started since ``before`` that
    ``select`` picks (by default Ray's: the caller's own may rightly outlive the run).

    Ray Data's prefetch and batching threads can still be winding down when the last batch
    arrives; one that reaches the core worker after ``ray.shutdown()`` makes Ray end the whole
    process with exit 1. Returns the names of those still running at the deadline.
    """
    deadline = time.monotonic() + timeout_s
    known = set(before) | {threading.current_thread()}
    waited = [t for t in threading.enumerate() if t not in known and select(t)]
    for thread in waited:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in waited if t.is_alive()]


def split_host_port(address: str) -> tuple[str, int] | None:
    """``ray://host:port`` or ``host:port`` -> (host, port); None for other forms."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def probe_address(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail in seconds with one clear line when nothing listens at ``address``.

    ``ray.init`` itself retries an unreachable GCS for a minute or more before failing with a
    long traceback; a TCP connect says the same thing at once.
    """
    target = split_host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster at {address}: {exc.strerror or exc} "
            "(start one with 'ray start --head', or check --ray-address)"
        ) from None


@contextmanager
def ray_cluster(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    **init_kwargs: Any,
) -> Iterator[ModuleType]:
    """Yield ``ray`` connected to ``address``; disconnect on exit only if we connected.

    An already initialised Ray (a test fixture, a notebook) is reused as it is, whatever
    ``address`` says, so library calls compose with a session the caller owns.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None and address != "auto":
        probe_address(address)
    kwargs: dict[str, Any] = {
        "address": address,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
        **init_kwargs,
    }
    if address is None:
        # A private cluster on this machine: size it here; a real cluster sizes itself.
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        if object_store_memory is not None:
            kwargs["object_store_memory"] = object_store_memory
    elif address.startswith("ray://"):
        # Ray Client accepts only a subset of the options.
        kwargs.pop("include_dashboard")
        kwargs.pop("configure_logging")
    try:
        ray.init(**kwargs)
    except (ConnectionError, TimeoutError) as exc:
        raise RayUnavailableError(
            f"cannot connect to the Ray cluster at {address}: {first_line(exc)}"
        ) from None
    except RuntimeError as exc:
        if address is None:
            raise
        raise RayUnavailableError(
            f"cannot connect to the Ray cluster at {address}: {first_line(exc)}"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cluster_cpus(ray: ModuleType) -> int:
    """CPUs the connected cluster offers (whole CPUs, at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


ENGINES = ("local", "ray")


def check_engine(engine: str, address: str | None = None) -> str:
    """Validate ``--engine``; for ray, fail now (before any work) if Ray is missing or
    ``address`` is unreachable."""
    if engine not in ENGINES:
        raise DefectscopeError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "ray":
        require_ray()
        if address is not None and address != "auto":
            probe_address(address)
    return engine
