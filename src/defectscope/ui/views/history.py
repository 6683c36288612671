"""History page: the prediction log as a table, scores over time, anomaly rate per hour or day."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

import altair as alt
import streamlit as st

from defectscope.client import ClientError
from defectscope.ui import analysis
from defectscope.ui.widgets import connect, stop_with

PERIODS = {
    "last hour": timedelta(hours=1),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
    "last 30 days": timedelta(days=30),
    "all time": None,
}
DECISIONS = {"all": None, "anomalous": True, "good": False}

settings, client = connect()
st.title("Prediction history")
st.caption("Every image the API scored, from its prediction log (times in UTC).")

controls = st.columns(3)
period = controls[0].selectbox("Period", list(PERIODS), index=2)
decision = controls[1].selectbox("Decision", list(DECISIONS))
max_rows = controls[2].number_input("Most rows", 100, 100_000, 5000, step=1000)
span = PERIODS[period]
since = datetime.now(UTC) - span if span else None

try:
    rows = client.all_predictions(int(max_rows), since=since, is_anomalous=DECISIONS[decision])
except ClientError as exc:
    stop_with(exc, settings, "reading the prediction log")
frame = analysis.log_frame(rows)
if frame.empty:
    st.info(f"No predictions logged ({period}, {decision}). Score some images first.")
    st.stop()

anomalous = int(frame["is_anomalous"].sum())
a, b, c = st.columns(3)
a.metric("Predictions", len(frame))
b.metric("Anomalous", anomalous)
c.metric("Anomaly rate", f"{anomalous / len(frame):.1%}")
if len(rows) >= max_rows:
    st.caption(f"Showing the newest {max_rows:,} rows; raise 'Most rows' to see more.")

st.subheader("Score over time")
frame["decision"] = frame["is_anomalous"].map({True: "anomalous", False: "good"})
points = (
    alt.Chart(frame)
    .mark_circle(size=40)
    .encode(
        x=alt.X("created_at:T", title="time (UTC)", axis=alt.Axis(format="%b %d %H:%M")),
        y=alt.Y("score:Q", title="anomaly score"),
        color=alt.Color(
            "decision:N",
            scale=alt.Scale(domain=["good", "anomalous"], range=["#2e7d32", "#c62828"]),
        ),
        tooltip=["created_at:T", "score:Q", "decision:N", "threshold:Q"],
    )
)
# The threshold in force at each prediction (it changes when one is saved).
threshold_line = (
    alt.Chart(frame)
    .mark_line(strokeDash=[6, 4], color="#555")
    .encode(x="created_at:T", y="threshold:Q")
)
st.altair_chart(points + threshold_line, width="stretch")

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
st.dataframe(rates, hide_index=True, width="stretch")

st.subheader("Log")
columns = ["created_at", "score", "normalized_score", "decision", "threshold", "width", "height"]
columns += ["latency_ms", "route", "model_fingerprint", "image_sha256"]
table = frame[[c for c in columns if c in frame]].iloc[::-1]
st.dataframe(table, hide_index=True, width="stretch")
st.download_button("Download CSV", table.to_csv(index=False), "predictions.csv", mime="text/csv")
