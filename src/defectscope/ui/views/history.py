"""History page: the prediction log filtered, scores over time against the threshold in force,
anomaly rate per hour or day, and any logged prediction opened with its pictures and review."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import altair as alt
import pandas as pd
import streamlit as st

from defectscope.client import ClientError
from defectscope.ui import analysis
from defectscope.ui.formatting import fmt_rate
from defectscope.ui.prediction_detail import VERDICTS, show_prediction
from defectscope.ui.widgets import connect, other_model, stop_with

PERIODS = {
    "last hour": timedelta(hours=1),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
    "last 30 days": timedelta(days=30),
    "all time": None,
}
DECISIONS = {"all": None, "anomalous": "anomalous", "good": "normal"}
REVIEWED = {"all": None, "reviewed": True, "not reviewed": False}


def filters() -> dict[str, Any]:
    """The filter controls, as query parameters of ``GET /v1/predictions``."""
    top = st.columns(4)
    period = top[0].selectbox("Period", list(PERIODS), index=2)
    decision = top[1].selectbox("Decision", list(DECISIONS))
    reviewed = top[2].selectbox("Reviewed", list(REVIEWED))
    max_rows = top[3].number_input("Most rows", 100, 100_000, 5000, step=1000)
    where = st.columns(3)
    tag = where[0].text_input("Tag", placeholder="any")
    line = where[1].text_input("Line", placeholder="any")
    station = where[2].text_input("Station", placeholder="any")
    span = PERIODS[period]
    return {
        "max_rows": int(max_rows),
        "since": datetime.now(UTC) - span if span else None,
        "decision": DECISIONS[decision],
        "reviewed": REVIEWED[reviewed],
        "tag": tag.strip() or None,
        "line": line.strip() or None,
        "station": station.strip() or None,
    }


def score_chart(frame: pd.DataFrame) -> alt.LayerChart | alt.FacetChart:
    """Points coloured by decision, clickable, over the threshold drawn as a step."""
    pick = alt.selection_point(name="pick", fields=["id"], on="click")
    points = (
        alt.Chart(frame)
        .mark_circle(size=50)
        .encode(
            x=alt.X("created_at:T", title="time (UTC)", axis=alt.Axis(format="%b %d %H:%M")),
            y=alt.Y("score:Q", title="anomaly score"),
            color=alt.Color(
                "decision:N",
                scale=alt.Scale(domain=["good", "anomalous"], range=["#2e7d32", "#c62828"]),
            ),
            tooltip=[
                "id:N",
                "created_at:T",
                alt.Tooltip("score:Q", format=".4g"),
                "decision:N",
                alt.Tooltip("threshold:Q", format=".4g"),
            ],
        )
        .add_params(pick)
    )
    # The threshold only changes when one is saved: flat until then, then a jump.
    steps = analysis.threshold_steps(frame)
    line = (
        alt.Chart(steps)
        .mark_line(interpolate="step-after", strokeDash=[6, 4], color="#555")
        .encode(x="created_at:T", y=alt.Y("threshold:Q", title="anomaly score"))
    )
    return alt.layer(line, points)


settings, client = connect()
st.title("Prediction history")
st.caption("Every image the API scored, from its prediction log (times in UTC).")
query = filters()
# The log of the model picked in the sidebar; the default model shows every model's log.
if other_model() is not None:
    query["model_name"] = other_model()
    st.caption(f"Predictions of model **{other_model()}** only.")
max_rows = query.pop("max_rows")
try:
    rows = client.all_predictions(max_rows, **query)
except ClientError as exc:
    stop_with(exc, settings, "reading the prediction log")
frame = analysis.log_frame(rows)
if frame.empty:
    st.info("No predictions logged with these filters. Score some images first.")
    st.stop()

anomalous = int(frame["is_anomalous"].sum())
a, b, c = st.columns(3)
a.metric("Predictions", len(frame))
b.metric("Anomalous", anomalous)
c.metric("Anomaly rate", fmt_rate(anomalous / len(frame)))
if len(rows) >= max_rows:
    st.caption(f"Showing the newest {max_rows:,} rows; raise 'Most rows' to see more.")

st.subheader("Score over time")
frame["decision"] = frame["is_anomalous"].map({True: "anomalous", False: "good"})
chart = st.altair_chart(score_chart(frame), width="stretch", on_select="rerun", key="scores")
st.caption("Dashed: the threshold in force. Click a point, or a row of the log, to open it.")

st.subheader("Anomaly rate")
periods: list[Literal["hour", "day"]] = ["hour", "day"]
per = st.radio("Per", periods, horizontal=True)
rates = analysis.anomaly_rate(frame, per)
bars = (
    alt.Chart(rates)
    .mark_bar()
    .encode(
        x=alt.X("period:T", title=f"{per} (UTC)"),
        y=alt.Y("rate:Q", title="anomaly rate", axis=alt.Axis(format="%")),
        tooltip=["period:T", "images:Q", "anomalies:Q", alt.Tooltip("rate:Q", format=".1%")],
    )
)
st.altair_chart(bars, width="stretch")
st.dataframe(
    rates,
    hide_index=True,
    width="stretch",
    column_config={"rate": st.column_config.NumberColumn(format="percent")},
)

st.subheader("Log")
if "review" in frame:
    frame["review"] = frame["review"].map(
        lambda r: VERDICTS.get(r["verdict"], r["verdict"]) if isinstance(r, dict) else ""
    )
columns = ["id", "created_at", "part_id", "line", "station", "score", "normalized_score"]
columns += ["decision", "review", "threshold", "model_version", "width", "height", "latency_ms"]
columns += ["route", "model_fingerprint", "image_sha256"]
table = frame[[c for c in columns if c in frame]].iloc[::-1].reset_index(drop=True)
number = st.column_config.NumberColumn(format="%.4g")
selected = st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    on_select="rerun",
    selection_mode="single-row",
    key="log",
    column_config={"score": number, "normalized_score": number, "threshold": number},
)
st.download_button("Download CSV", table.to_csv(index=False), "predictions.csv", mime="text/csv")

picked = analysis.picked_id(chart, selected, table)
if picked is not None:
    st.subheader("Opened prediction")
    row = next((r for r in rows if r.get("id") == picked), None)
    if row is not None:
        with st.container(border=True):
            show_prediction(client, settings, row)
