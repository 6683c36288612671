"""Drift page: is a window of recent inputs still distributed like the training images?

Two windows: the newest predictions in the API's log (score tests only: the log keeps scores,
not embeddings) and a set of uploaded images (score tests and the feature test, MMD).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from defectscope.client import ClientError
from defectscope.ui.api import UiSettings, friendly
from defectscope.ui.widgets import connect

PERIODS = {
    "any time": None,
    "last hour": timedelta(hours=1),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
}
SHOW_VERDICT = {"ok": st.success, "warning": st.warning, "drift": st.error}
TEST_NAMES = {
    "score_ks": "Scores: Kolmogorov-Smirnov",
    "score_psi": "Scores: population stability index",
    "alarm_rate": "Alarm rate vs calibrated false-alarm rate",
    "feature_mmd": "Features: MMD (pooled patch embeddings)",
}


def explain(error: ClientError, settings: UiSettings, subject: str, window: str) -> None:
    """The drift-specific refusals as advice; anything else as a friendly error."""
    if error.status == 409:
        st.info(f"Drift cannot be tested here: {error.detail}", icon=":material/info:")
    elif error.status == 422 and "too small" in str(error.detail):
        st.info(
            f"Not enough {window} yet: {error.detail}. Add more images or widen the window.",
            icon=":material/hourglass_top:",
        )
    else:
        st.error(friendly(error, settings, subject), icon=":material/error:")


def show_report(report: dict[str, Any], window: str) -> None:
    verdict = report["verdict"]
    SHOW_VERDICT.get(verdict, st.info)(f"Verdict: **{verdict}** over {window}")
    rows = []
    for name, test in report["tests"].items():
        rows.append(
            {
                "test": TEST_NAMES.get(name, name),
                "statistic": test["statistic"],
                "p-value": test["p_value"],
                "adjusted p": test["adjusted_p"],
                "verdict": test["verdict"] or "reported, does not vote",
                **{f"effect: {k}": v for k, v in test.get("effect", {}).items()},
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    limits = report.get("thresholds", {})
    st.caption(
        "p-values are Bonferroni-adjusted over the voting tests; warning below "
        f"{limits.get('warning_p', 0.01)}, drift below {limits.get('drift_p', 0.001)}."
    )
    for note in report.get("notes", []):
        st.caption(f"• {note}")


settings, client = connect()
st.title("Drift")
st.caption(
    "Compares recent inputs with the good training images' statistics stored in the model: a "
    "changed camera, light or product shows here before it shows in accuracy."
)

st.subheader("Logged predictions (score tests)")
controls = st.columns(2)
limit = controls[0].number_input("Newest predictions in the window", 2, 5000, 500, step=50)
period = controls[1].selectbox("Only predictions from", list(PERIODS))
span = PERIODS[period]
try:
    logged = client.drift(limit=int(limit), since=datetime.now(UTC) - span if span else None)
except ClientError as exc:
    explain(exc, settings, "checking drift", "predictions in this window")
else:
    first, last = (
        datetime.fromisoformat(logged["window"][end]).strftime("%Y-%m-%d %H:%M:%S")
        for end in ("first", "last")
    )
    show_report(logged, f"{logged['n_window']} predictions ({first} … {last} UTC)")

st.subheader("Feature test (MMD)")
st.write(
    "The log keeps scores, not image features. Upload a window of recent images (at least 10) "
    "to test their pooled patch embeddings too; they are not logged as predictions."
)
window = st.file_uploader("Recent images", accept_multiple_files=True, key="drift_images")
if st.button(f"Test {len(window or [])} image(s) for drift", disabled=not window):
    with st.spinner("Embedding and testing…"):
        try:
            uploaded = client.drift_images([(f.name, f.getvalue()) for f in window])
        except ClientError as exc:
            explain(exc, settings, "testing the images", "images")
        else:
            show_report(uploaded, f"{uploaded['n_window']} uploaded images")
