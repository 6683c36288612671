"""Serving commands: serve (REST), ui (Streamlit), bento (BentoML) and the client group."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from defectscope.cli.console import console, out
from defectscope.cli.line import RegistryOpt
from defectscope.cli.options import EngineOpt, ModelArg, RayAddressOpt, RuntimeOpt

# The Streamlit entry script of the ui package, a sibling of this one.
UI_SCRIPT = Path(__file__).resolve().parents[1] / "ui" / "app.py"


def model_environment(model: Path, runtime: str) -> dict[str, str]:
    """The settings a server's worker processes read from the environment to load ``model``."""
    return {"DEFECTSCOPE_MODEL_PATH": str(model.resolve()), "DEFECTSCOPE_RUNTIME": runtime}


def named_models(
    models_dir: Path | None, specs: list[str], registry: str | None
) -> tuple[Path | None, dict[str, str]]:
    """``--models DIR`` and ``--model NAME=PATH_OR_REF`` -> (a lone ``--model PATH``, the named
    models' sources); every path must hold a model and every reference resolve."""
    from defectscope.detector.model_file import resolve_model_path
    from defectscope.errors import DefectscopeError
    from defectscope.registry import resolve_model_ref
    from defectscope.registry.base import check_name

    named: dict[str, str] = {}

    def add(name: str, source: str) -> None:
        check_name(name)
        if name in named:
            raise DefectscopeError(f"two models named {name!r}: give each model its own name")
        path, resolved = resolve_model_ref(source, registry)
        if resolved is None:
            resolve_model_path(path)  # a missing or wrong path fails here, not in a worker
            source = str(Path(path).resolve())
        named[name] = source

    if models_dir is not None:
        if not models_dir.is_dir():
            raise DefectscopeError(f"--models {models_dir}: not a folder")
        folders = sorted(p for p in models_dir.iterdir() if p.is_dir())
        if not folders:
            raise DefectscopeError(f"--models {models_dir}: no model folders in it")
        for folder in folders:
            add(folder.name, str(folder))
    single = None
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep:
            if single is not None:
                raise DefectscopeError("give each --model as NAME=PATH_OR_REF")
            single = Path(spec)
            continue
        if not source:
            raise DefectscopeError(f"--model {spec}: give NAME=PATH_OR_REF")
        add(name, source)
    return single, named


def watch_environment(
    folder: Path | None, results: Path | None, sort_to: Path | None
) -> dict[str, str]:
    """``serve --watch``'s settings for the workers, checked here (one-line errors)."""
    from defectscope.errors import DefectscopeError

    if folder is None:
        if results is not None or sort_to is not None:
            raise DefectscopeError("--watch-results and --watch-sort-to need --watch DIR")
        return {}
    if not folder.is_dir():
        raise DefectscopeError(f"--watch {folder}: not a folder")
    env = {"DEFECTSCOPE_WATCH_DIR": str(folder.resolve())}
    if results is not None:
        from defectscope.line.results import FORMATS

        if results.suffix.lower() not in FORMATS:
            raise DefectscopeError(f"--watch-results {results}: name a .jsonl or .csv file")
        env["DEFECTSCOPE_WATCH_RESULTS"] = str(results.resolve())
    if sort_to is not None:
        if sort_to.exists() and not sort_to.is_dir():
            raise DefectscopeError(f"--watch-sort-to {sort_to}: a file, not a folder")
        env["DEFECTSCOPE_WATCH_SORT_TO"] = str(sort_to.resolve())
    return env


def models_environment(
    models: dict[str, str], default: str | None, registry: str | None, budget: float | None
) -> dict[str, str]:
    """The settings of the named models, for the worker processes."""
    env = {"DEFECTSCOPE_MODELS": json.dumps(models)}
    if default:
        env["DEFECTSCOPE_DEFAULT_MODEL"] = default
    if registry:
        env["DEFECTSCOPE_REGISTRY"] = registry
    if budget is not None:
        env["DEFECTSCOPE_MEMORY_BUDGET_MB"] = str(budget)
    return env


def serve(
    model: Annotated[
        Path | None, typer.Argument(help="Model folder or file (the default model).")
    ] = None,
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models", help="A folder of model folders, each served under its folder's name."
        ),
    ] = None,
    named: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="NAME=PATH_OR_REF (repeatable): a model served under /v1/models/NAME; a "
            "reference such as bottle@production is looked up in --registry.",
        ),
    ] = None,
    default_model: Annotated[
        str | None,
        typer.Option(help="The named model /v1/predict serves [default: MODEL, or the only one]."),
    ] = None,
    registry: RegistryOpt = None,
    memory_budget_mb: Annotated[
        float | None,
        typer.Option(help="Unload least recently used named models beyond this estimate."),
    ] = None,
    follow_registry: Annotated[
        float,
        typer.Option(
            help="Seconds between registry checks of NAME@STAGE models (on requests): a moved "
            "stage is loaded and swapped in; 0 waits for POST /v1/models/NAME/reload."
        ),
    ] = 0.0,
    watch: Annotated[
        Path | None,
        typer.Option(
            help="Also score new images landing in this folder (as `defectscope watch`, with "
            "the served model and its prediction log)."
        ),
    ] = None,
    watch_results: Annotated[
        Path | None,
        typer.Option(help="JSONL or CSV results of --watch [default: in the folder's state]."),
    ] = None,
    watch_sort_to: Annotated[
        Path | None, typer.Option(help="Move each --watch file to ok/, ng/ or error/ here.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (each loads the model).")] = 1,
    runtime: RuntimeOpt = "auto",
    report: Annotated[
        Path | None,
        typer.Option(help="Evaluation report folder for /v1/model/report [default: MODEL/report]."),
    ] = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: Annotated[
        int, typer.Option(help="With --engine ray: Ray Serve replicas (each loads the model).")
    ] = 1,
) -> None:
    """Serve MODEL over HTTP (REST API, /docs, /metrics); needs the "serve" extra.

    Other settings come from DEFECTSCOPE_* environment variables (see serving/settings.py).
    """
    import shutil
    import tempfile

    from defectscope.detector.model_file import resolve_model_path
    from defectscope.distributed.cluster import check_engine
    from defectscope.errors import DefectscopeError
    from defectscope.export.runtimes import localize_model
    from defectscope.registry import resolve_model_ref

    check_engine(engine, ray_address)
    single, models = named_models(models_dir, named or [], registry)
    if single is not None:
        if model is not None:
            raise DefectscopeError("give the default model once: MODEL or --model PATH")
        model = single
    if memory_budget_mb is not None and memory_budget_mb <= 0:
        raise DefectscopeError("--memory-budget-mb must be positive")
    if follow_registry < 0:
        raise DefectscopeError("--follow-registry must be 0 or more seconds")
    if follow_registry:
        os.environ["DEFECTSCOPE_REGISTRY_POLL_S"] = str(follow_registry)
    model_ref = None
    if model is None:
        if not models:
            raise DefectscopeError("give a MODEL, --model NAME=PATH_OR_REF or --models DIR")
        if default_model is None and len(models) > 1:
            raise DefectscopeError("several models: name the default one with --default-model")
        default_model = default_model or next(iter(models))
        if default_model not in models:
            names = ", ".join(sorted(models))
            raise DefectscopeError(f"--default-model {default_model}: not one of {names}")
        source = models.pop(default_model)
        if not Path(source).exists():
            model_ref = source
        model = Path(resolve_model_ref(source, registry)[0])
    elif default_model is not None and default_model in models:
        raise DefectscopeError(f"--default-model {default_model}: MODEL is the default model")
    if (models or model_ref) and engine == "ray":
        raise DefectscopeError("named models are served by the local engine (--engine local)")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise DefectscopeError(
            "serving needs extra packages: pip install 'defectscope[serve]'"
        ) from None
    # A remote model is fetched once here into the local cache; the workers load that copy.
    model = localize_model(model, runtime)
    resolve_model_path(model)  # a missing or wrong path fails here, not in every worker
    # Workers are separate processes: they get the settings through the environment and build
    # the app with the factory.
    os.environ.update(model_environment(model, runtime))
    os.environ.update(models_environment(models, default_model, registry, memory_budget_mb))
    if model_ref:
        os.environ["DEFECTSCOPE_MODEL_REF"] = model_ref
    os.environ.update(watch_environment(watch, watch_results, watch_sort_to))
    if report is not None:
        if not (report / "metrics.json").is_file():
            raise DefectscopeError(f"{report}: no metrics.json (write it with evaluate --report)")
        os.environ["DEFECTSCOPE_REPORT_DIR"] = str(report.resolve())
    if engine == "ray":
        from defectscope.distributed.serve import serve_on_cluster

        # Replicas on other nodes load this same path: it must be on a disk they all share.
        serve_on_cluster(
            model,
            address=ray_address,
            replicas=replicas,
            runtime=runtime,
            host=host,
            port=port,
            on_ready=lambda url: console.print(
                f"Serving {model} on {url} ({replicas} Ray Serve replica(s)); Ctrl+C stops it"
            ),
        )
        return
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Without a shared folder each worker would report only its own counts on /metrics.
        metrics_dir = tempfile.mkdtemp(prefix="defectscope-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    more = f" and {len(models)} named model(s)" if models else ""
    console.print(f"Serving {model}{more} on http://{host}:{port} ({workers} worker(s))")
    try:
        uvicorn.run(
            "defectscope.serving.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            # Closes connections whose request headers stall (DEFECTSCOPE_READ_TIMEOUT_S).
            http="defectscope.serving.protocol:HeaderTimeoutProtocol",
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def ui(
    api: Annotated[str, typer.Option(help="URL of the REST API (defectscope serve).")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str | None,
        typer.Option(help="API key, if the server wants one.", envvar="DEFECTSCOPE_API_KEY"),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8501,
    samples: Annotated[
        Path | None, typer.Option(help="Folder of sample images to pick from (e.g. a dataset).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an API answer.")] = 60.0,
) -> None:
    """Web UI over the REST API (Streamlit): inspect, threshold, history, drift, model."""
    import importlib.util
    import subprocess

    from defectscope.errors import DefectscopeError

    if importlib.util.find_spec("streamlit") is None:
        raise DefectscopeError("the web UI needs: pip install 'defectscope[ui]'")
    if not api.startswith(("http://", "https://")):
        raise DefectscopeError(f"--api must be an http:// or https:// URL, not {api!r}")
    if samples is not None and not samples.is_dir():
        raise DefectscopeError(f"--samples {samples}: not a folder")
    if timeout <= 0:
        raise DefectscopeError("--timeout must be positive")
    # The page scripts read these: Streamlit re-runs them in its own process.
    env = {**os.environ, "DEFECTSCOPE_API_URL": api, "DEFECTSCOPE_UI_TIMEOUT": str(timeout)}
    if api_key:
        env["DEFECTSCOPE_API_KEY"] = api_key
    if samples is not None:
        env["DEFECTSCOPE_UI_SAMPLES"] = str(samples.resolve())
    command = [sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT)]
    command += ["--server.address", host, "--server.port", str(port), "--server.headless", "true"]
    command += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    console.print(f"defectscope UI on http://{host}:{port} (API {api})")
    sys.stdout.flush()
    if os.name == "posix":
        # Become the Streamlit process: a supervisor's SIGTERM then stops the UI itself, not a
        # launcher that would leave it running.
        os.execve(sys.executable, command, env)
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


def bento(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    runtime: RuntimeOpt = "auto",
) -> None:
    """Serve MODEL with BentoML (adaptive batching); needs the "bentoml" extra.

    Routes: POST /v1/predict (multipart field 'images'), /v1/model, /v1/health.
    """
    import importlib.util
    import subprocess

    from defectscope.detector.model_file import resolve_model_path
    from defectscope.errors import DefectscopeError
    from defectscope.export.runtimes import resolve_runtime

    if importlib.util.find_spec("bentoml") is None:
        raise DefectscopeError("BentoML serving needs: pip install 'defectscope[bentoml]'")
    if resolve_runtime(model, runtime) == "torch":
        resolve_model_path(model)  # fail here with a clear message, not inside a worker
    elif not model.exists():
        raise DefectscopeError(f"{model}: model file not found")
    # BentoML workers are separate processes: they read the model through the environment.
    env = {**os.environ, **model_environment(model, runtime)}
    command = [sys.executable, "-m", "bentoml", "serve"]
    command += ["defectscope.serving.bento_service:DefectscopeService"]
    command += ["--host", host, "--port", str(port)]
    console.print(f"Serving {model} with BentoML on http://{host}:{port}")
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 130
    if code:
        raise typer.Exit(code)


client_app = typer.Typer(
    help="Call a running defectscope REST server (defectscope serve).", no_args_is_help=True
)


@client_app.command("predict")
def client_predict(
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")],
    url: Annotated[
        str, typer.Option(envvar="DEFECTSCOPE_URL", help="Server URL.")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="DEFECTSCOPE_API_KEY", help="X-API-Key header.")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write heatmap and overlay PNGs and results.jsonl here."),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Override the image threshold.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 60.0,
    model_name: Annotated[
        str | None,
        typer.Option(help="Score with this named model (/v1/models/NAME) [default: the default]."),
    ] = None,
) -> None:
    """Score images on a server; print a table and optionally save the returned PNGs."""
    from defectscope.client import ClientError, DefectscopeClient, decode_png
    from defectscope.data.io import expand_image_paths
    from defectscope.errors import DefectscopeError
    from defectscope.prediction_writer import unique_output_names

    paths = expand_image_paths(inputs)
    if not paths:
        raise DefectscopeError("no images found in " + ", ".join(str(i) for i in inputs))
    names = unique_output_names(paths)
    if out_dir is not None:
        from defectscope import storage

        storage.check_output_folder(out_dir, "--out")
        out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"{url}: {len(paths)} images")
    for column in ("image", "score", "normalized", "decision", "defect area"):
        table.add_column(column, justify="left" if column in ("image", "decision") else "right")
    rows: list[dict[str, Any]] = []
    failures = 0
    with DefectscopeClient(url, api_key=api_key, timeout=timeout, model=model_name) as client:
        for path, name in zip(paths, names, strict=True):
            try:
                result = client.predict(
                    path,
                    threshold=threshold,
                    heatmap=out_dir is not None,
                    overlay=out_dir is not None,
                )
            except ClientError as exc:
                # A bad image is that image's problem; no server, a wrong key or a server error
                # would fail every image, so they stop the command.
                # So would an unknown --model-name (404).
                if exc.status is None or exc.status in (401, 404) or exc.status >= 500:
                    raise
                failures += 1
                table.add_row(str(path), "-", "-", f"[red]error {exc.status}[/]", "-")
                rows.append({"source": str(path), "error": str(exc)})
                continue
            if out_dir is not None:
                for key in ("heatmap", "overlay"):
                    (out_dir / f"{name}_{key}.png").write_bytes(decode_png(result[f"{key}_png"]))
            summary = {k: v for k, v in result.items() if not k.endswith("_png")}
            rows.append({"source": str(path), "output_name": name, **summary})
            table.add_row(
                str(path),
                f"{result['score']:.4f}",
                f"{result['normalized_score']:.3f}",
                result["label"],
                f"{100 * result['defect_area_fraction']:.2f}%",
            )
    out.print(table)
    if out_dir is not None:
        jsonl = out_dir / "results.jsonl"
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out.print(f"Heatmaps, overlays and {jsonl.name}: {out_dir}")
    if failures:
        console.print(f"{failures} of {len(paths)} images failed")
        raise typer.Exit(1)
