"""A small Python client for the defectscope REST API (``defectscope serve``).

    from defectscope.client import DefectscopeClient

    with DefectscopeClient("http://127.0.0.1:8000", api_key="...") as client:
        result = client.predict("part.png", heatmap=True)
        print(result["score"], result["is_anomalous"])

Every failure is a `ClientError` carrying the server's message and HTTP status (or status
``None`` when the server could not be reached), so callers handle one exception type.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from defectscope.errors import DefectscopeError

# A path, the encoded file's bytes, or (file name, bytes) to keep the name in batch answers.
ImageArg = str | Path | bytes | tuple[str, bytes]


class ClientError(DefectscopeError):
    """A request failed; ``status`` is the HTTP status, or None when no answer came back
    (``timed_out`` then tells a slow server from an unreachable one)."""

    def __init__(
        self, message: str, status: int | None = None, detail: Any = None, timed_out: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.timed_out = timed_out


def decode_png(value: str) -> bytes:
    """A base64 PNG field of a prediction (``heatmap_png``...) -> the PNG file's bytes."""
    return base64.b64decode(value)


class DefectscopeClient:
    """Synchronous client over httpx; use it as a context manager or call `close`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        model: str | None = None,
    ) -> None:
        """``model``: the named model (``/v1/models/NAME``) that predict and thresholds use
        unless a call names another; None is the server's default model."""
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> DefectscopeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -------------------------------------------------------------------------- routes
    def predict(
        self,
        image: ImageArg,
        threshold: float | None = None,
        heatmap: bool = False,
        overlay: bool = False,
        mask: bool = False,
        *,
        part_id: str | None = None,
        line: str | None = None,
        station: str | None = None,
        tags: Sequence[str] | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Score one image (a path or the encoded file's bytes); the part fields are logged with
        the prediction (``part_id`` defaults to the file name); the answer has its
        ``prediction_id``. ``model`` names the model to score with (see the constructor)."""
        name, data = _read(image)
        params = _flags(threshold, heatmap, overlay, mask)
        return self._request(
            "POST",
            self._model_path(model) + "/predict",
            params=params,
            files={"file": (name, data)},
            data=_part_fields(part_id, line, station, tags),
        )

    def predict_batch(
        self,
        images: Iterable[ImageArg],
        threshold: float | None = None,
        heatmap: bool = False,
        overlay: bool = False,
        mask: bool = False,
        *,
        part_id: str | None = None,
        line: str | None = None,
        station: str | None = None,
        tags: Sequence[str] | None = None,
        model: str | None = None,
    ) -> list[dict[str, Any]]:
        """Score several images in one request; each item has ``result`` or ``error``. The part
        fields apply to every image."""
        files = [("files", _read(image)) for image in images]
        if not files:
            return []
        params = _flags(threshold, heatmap, overlay, mask)
        data = _part_fields(part_id, line, station, tags)
        path = self._model_path(model) + "/predict/batch"
        body = self._request("POST", path, params=params, files=files, data=data)
        return body["items"]

    def model_info(self) -> dict[str, Any]:
        return self._request("GET", "/v1/model")

    def models(self) -> dict[str, Any]:
        """The models the server serves (GET /v1/models): names, loaded, memory, sharing."""
        return self._request("GET", "/v1/models")

    def model_thresholds(self, model: str | None = None) -> dict[str, Any]:
        """A named model's thresholds (GET /v1/models/NAME/thresholds)."""
        return self._request("GET", f"/v1/models/{self._model_name(model)}/thresholds")

    def reload_model(self, model: str | None = None) -> dict[str, Any]:
        """Load a named model again (its registry reference: the version named now)."""
        return self._request("POST", f"/v1/models/{self._model_name(model)}/reload")

    def _model_name(self, model: str | None) -> str:
        name = model or self.model
        if not name:
            raise ValueError("name the model: model= here or in the constructor")
        return quote(name, safe="")

    def _model_path(self, model: str | None) -> str:
        """``/v1`` for the default model, ``/v1/models/NAME`` for a named one."""
        return f"/v1/models/{self._model_name(model)}" if (model or self.model) else "/v1"

    def set_thresholds(
        self,
        image: float | None = None,
        pixel: float | None = None,
        *,
        reset: bool = False,
        reason: str | None = None,
        reviewer: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Store new thresholds in the served model (saved to its file, audited); ``reset``
        restores the calibrated ones. Returns /v1/model (for a named ``model``, its
        /v1/models/NAME/thresholds)."""
        body: dict[str, Any] = {"image": image, "pixel": pixel}
        if reset:
            body = {"reset": True}
        body.update({k: v for k, v in (("reason", reason), ("reviewer", reviewer)) if v})
        if model or self.model:
            path = f"/v1/models/{self._model_name(model)}/thresholds"
            return self._request("PUT", path, json=body)
        return self._request("PUT", "/v1/model/thresholds", json=body)

    def calibration(self, threshold: float | None = None) -> dict[str, Any]:
        """The good calibration scores and the expected false-alarm rate at ``threshold``."""
        return self._request(
            "GET", "/v1/model/calibration", params=_query({"threshold": threshold})
        )

    # --------------------------------------------------------------------- review loop
    def prediction(self, prediction_id: int) -> dict[str, Any]:
        """One logged prediction, with its review and picture URLs."""
        return self._request("GET", f"/v1/predictions/{int(prediction_id)}")

    def prediction_picture(self, prediction_id: int, kind: str = "thumbnail") -> bytes:
        """A stored picture (PNG bytes): 'thumbnail', 'overlay' or 'image'."""
        return self._request_bytes("GET", f"/v1/predictions/{int(prediction_id)}/{kind}.png")

    def review(
        self,
        prediction_id: int,
        verdict: str,
        note: str | None = None,
        reviewer: str | None = None,
    ) -> dict[str, Any]:
        """Store a verdict ('correct', 'false_alarm', 'missed_defect'); replaces an earlier one."""
        body = {"verdict": verdict, "note": note, "reviewer": reviewer}
        path = f"/v1/predictions/{int(prediction_id)}/review"
        return self._request("POST", path, json={k: v for k, v in body.items() if v is not None})

    def review_queue(self, scope: str = "flagged", **window: Any) -> dict[str, Any]:
        """What to review: 'flagged' or 'audit'; since, until, limit, seed."""
        return self._request("GET", "/v1/reviews/queue", params=_query({"scope": scope, **window}))

    def reviews_csv(self, **filters: Any) -> bytes:
        """Reviewed predictions as CSV (the list's filters apply)."""
        return self._request_bytes("GET", "/v1/reviews.csv", params=_query(filters))

    def reviews_zip(self, since: Any = None, until: Any = None) -> bytes:
        """Reviewed images, overlays and labels.csv as a ZIP that ``evaluate`` reads."""
        window = _query({"since": since, "until": until})
        return self._request_bytes("GET", "/v1/reviews.zip", params=window)

    def teach_preview(
        self,
        prediction_ids: Sequence[int] | None = None,
        since: Any = None,
        flagged_since: Any = None,
    ) -> dict[str, Any]:
        """What teaching the reviewed false alarms would clear, without changing the model."""
        body = _teach_body(prediction_ids, since, None, flagged_since)
        return self._request("POST", "/v1/model/teach/preview", json=body)

    def teach(
        self,
        prediction_ids: Sequence[int] | None = None,
        since: Any = None,
        reviewer: str | None = None,
    ) -> dict[str, Any]:
        """Teach the reviewed false alarms: a new model version, served at once."""
        body = _teach_body(prediction_ids, since, reviewer, None)
        return self._request("POST", "/v1/model/teach", json=body)

    def versions(self) -> dict[str, Any]:
        return self._request("GET", "/v1/model/versions")

    def activate(self, version: str | int) -> dict[str, Any]:
        """Serve another model version (undo a teach: activate its parent)."""
        return self._request("POST", f"/v1/model/versions/{version}/activate")

    def model_report(self) -> dict[str, Any] | None:
        """The model's evaluation report (``{"source", "report"}``), or None when it has none."""
        try:
            return self._request("GET", "/v1/model/report")
        except ClientError as exc:
            if exc.status == 404 and "no evaluation report" in str(exc.detail):
                return None
            raise

    def drift(self, **window: Any) -> dict[str, Any]:
        """Score drift over logged predictions: since, until (datetime or ISO text), limit."""
        return self._request("GET", "/v1/drift", params=_query(window))

    def drift_images(self, images: Iterable[ImageArg]) -> dict[str, Any]:
        """Drift of a window of images, with the feature test (MMD); they are not logged."""
        files = [("files", _read(image)) for image in images]
        return self._request("POST", "/v1/drift/images", files=files)

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def ready(self) -> bool:
        """True when the model is loaded; False on the server's 503 (still loading, or failed)."""
        try:
            self._request("GET", "/readyz")
        except ClientError as exc:
            if exc.status == 503:
                return False
            raise
        return True

    def predictions(self, **filters: Any) -> dict[str, Any]:
        """The prediction log: limit, offset, since, until (datetime or ISO text), is_anomalous."""
        return self._request("GET", "/v1/predictions", params=_query(filters))

    def all_predictions(self, max_rows: int = 10_000, **filters: Any) -> list[dict[str, Any]]:
        """Up to ``max_rows`` log entries, newest first, fetched page by page."""
        rows: list[dict[str, Any]] = []
        while len(rows) < max_rows:
            limit = min(1000, max_rows - len(rows))
            page = self.predictions(**filters, limit=limit, offset=len(rows))
            rows.extend(page["items"])
            if len(page["items"]) < limit or len(rows) >= page["total"]:
                break
        return rows

    # ------------------------------------------------------------------------- plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"{method} {path}: the server sent a non-JSON answer", response.status_code
            ) from None

    def _request_bytes(self, method: str, path: str, **kwargs: Any) -> bytes:
        return self._send(method, path, **kwargs).content

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ClientError(
                f"the server at {self.url} did not answer within {self.timeout:g} s",
                timed_out=True,
            ) from None
        except httpx.TransportError as exc:
            raise ClientError(f"the server at {self.url} is unreachable ({exc})") from None
        if response.is_success:
            return response
        detail = _error_detail(response)
        raise ClientError(
            f"{method} {path} failed with HTTP {response.status_code}: {_describe(detail)}",
            response.status_code,
            detail,
        )


def _read(image: ImageArg) -> tuple[str, bytes]:
    if isinstance(image, (bytes, bytearray)):
        return "image", bytes(image)
    if isinstance(image, tuple):
        name, data = image
        return name, bytes(data)
    path = Path(image)
    try:
        return path.name, path.read_bytes()
    except OSError as exc:
        raise ClientError(f"{path}: cannot read the image file ({exc.strerror or exc})") from None


def _part_fields(
    part_id: str | None, line: str | None, station: str | None, tags: Sequence[str] | None
) -> dict[str, str]:
    fields = {"part_id": part_id, "line": line, "station": station}
    data = {k: v for k, v in fields.items() if v is not None}
    if tags:
        data["tags"] = ",".join(tags)
    return data


def _teach_body(
    prediction_ids: Sequence[int] | None, since: Any, reviewer: str | None, flagged_since: Any
) -> dict[str, Any]:
    body = {
        "prediction_ids": list(prediction_ids) if prediction_ids is not None else None,
        "reviewer": reviewer,
        **_query({"since": since, "flagged_since": flagged_since}),
    }
    return {k: v for k, v in body.items() if v is not None}


def _query(values: dict[str, Any]) -> dict[str, Any]:
    """Query parameters: None dropped, datetimes as ISO text, booleans as true/false."""
    params = {
        k: (v.isoformat() if hasattr(v, "isoformat") else v)
        for k, v in values.items()
        if v is not None
    }
    return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}


def _flags(threshold: float | None, heatmap: bool, overlay: bool, mask: bool) -> dict[str, str]:
    flags = {"heatmap": heatmap, "overlay": overlay, "mask": mask}
    params = {k: "true" for k, on in flags.items() if on}
    if threshold is not None:
        params["threshold"] = repr(float(threshold))
    return params


def _error_detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    return body.get("detail", body) if isinstance(body, dict) else body


def _describe(detail: Any) -> str:
    """The server's ``detail``: a string, or FastAPI's validation list made readable."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "msg" in item:
                where = ".".join(str(p) for p in item.get("loc", ()))
                parts.append(f"{where}: {item['msg']}" if where else str(item["msg"]))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    return str(detail)
