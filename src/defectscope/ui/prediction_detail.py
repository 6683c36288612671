"""One logged prediction opened: its image, heatmap overlay, decision and review.

Shared by the History and Review pages; the pictures come from
``/v1/predictions/{id}/{image,overlay}.png`` (the log keeps them when the server does).
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui.api import UiSettings, friendly
from defectscope.ui.formatting import HEATMAP_LEGEND, fmt_score, fmt_time

VERDICTS = {
    "correct": "correct",
    "false_alarm": "false alarm",
    "missed_defect": "missed defect",
}


@st.cache_data(show_spinner=False, max_entries=256)
def picture(_client: DefectscopeClient, api_url: str, prediction_id: Any, kind: str) -> bytes:
    # A logged picture never changes: cached per API and id (the client is not hashed).
    return _client.prediction_picture(prediction_id, kind)


def describe(row: dict[str, Any]) -> str:
    """The decision line: verdict, score against the threshold in force, model version."""
    anomalous = bool(row.get("is_anomalous"))
    badge = ":red-background[**anomalous**]" if anomalous else ":green-background[**good**]"
    where = " · ".join(
        f"{key} {row[key]}" for key in ("part_id", "line", "station") if row.get(key)
    )
    parts = [
        f"{badge} · score **{fmt_score(row.get('score'))}** "
        f"{'≥' if anomalous else '<'} threshold {fmt_score(row.get('threshold'))}",
        fmt_time(row.get("created_at")) + " UTC",
    ]
    if where:
        parts.append(where)
    if row.get("model_version") is not None:
        parts.append(f"model version {row['model_version']}")
    return " · ".join(parts)


def review_text(review: dict[str, Any] | None) -> str:
    if not review:
        return "Not reviewed yet."
    text = f"Reviewed: **{VERDICTS.get(review['verdict'], review['verdict'])}**"
    if review.get("reviewer"):
        text += f" by {review['reviewer']}"
    if review.get("reviewed_at"):
        text += f" ({fmt_time(review['reviewed_at'])} UTC)"
    if review.get("note"):
        text += f" — “{review['note']}”"
    return text


def show_pictures(
    client: DefectscopeClient, settings: UiSettings, row: dict[str, Any], width: int | str
) -> None:
    """The image and its heatmap overlay side by side, or why they are missing."""
    if not row.get("has_pictures", True):
        st.info("The server did not keep pictures for this prediction.", icon=":material/info:")
        return
    try:
        image = picture(client, settings.api_url, row["id"], "image")
        overlay = picture(client, settings.api_url, row["id"], "overlay")
    except ClientError as exc:
        st.warning(friendly(exc, settings, "loading the pictures"), icon=":material/image:")
        return
    left, right = st.columns(2)
    left.image(image, caption="image", width=width)  # type: ignore[arg-type]
    right.image(overlay, caption="heatmap overlay", width=width)  # type: ignore[arg-type]
    st.markdown(HEATMAP_LEGEND, unsafe_allow_html=True)


def show_prediction(client: DefectscopeClient, settings: UiSettings, row: dict[str, Any]) -> None:
    """A prediction of the log, opened: decision line, pictures, review."""
    st.markdown(f"**Prediction {row['id']}** — {describe(row)}")
    tags = row.get("tags")
    if tags:
        st.caption("Tags: " + (tags if isinstance(tags, str) else ", ".join(map(str, tags))))
    show_pictures(client, settings, row, "stretch")
    st.markdown(review_text(row.get("review")))
