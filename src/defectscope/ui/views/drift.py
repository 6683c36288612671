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
from defectscope.ui.api import UiSettings, drift_skipping_bad, friendly, upload_limit_mb
from defectscope.ui.formatting import fmt_p, unique_names
from defectscope.ui.widgets import connect, default_model_note, scoring_client

PERIODS = {
    "any time": None,
    "last hour": timedelta(hours=1),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
}
SHOW_VERDICT = {"ok": st.success, "warning": st.warning, "drift": st.error}
MEANING = {
    "ok": "The recent scores look like the training images' scores: nothing has shifted.",
    "warning": "The recent scores start to differ from training: keep an eye on the line.",
    "drift": "The recent scores differ from training. Higher scores mean either more defects "
    "or a process change (camera, light, new batch of material): look at some images before "
    "trusting the decisions.",
}
TEST_NAMES = {
    "score_ks": "Scores: Kolmogorov-Smirnov",
    "score_psi": "Scores: population stability index",
    "alarm_rate": "Alarm rate vs calibrated false-alarm rate",
    "feature_mmd": "Features: MMD (pooled patch embeddings)",
}


def explain(
    error: ClientError, settings: UiSettings, subject: str, window: str, scoring: bool = False
) -> None:
    """The drift-specific refusals as advice; anything else as a friendly error."""
    if error.status == 409:
        st.info(f"Drift cannot be tested here: {error.detail}", icon=":material/info:")
    elif error.status == 422 and "too small" in str(error.detail):
        st.info(
            f"Not enough {window} yet: {error.detail}. Add more images or widen the window.",
            icon=":material/hourglass_top:",
        )
    else:
        st.error(friendly(error, settings, subject, scoring), icon=":material/error:")


def show_report(report: dict[str, Any], window: str) -> None:
    verdict = report["verdict"]
    SHOW_VERDICT.get(verdict, st.info)(
        f"Verdict: **{verdict}** over {window}. {MEANING.get(verdict, '')}"
    )
    rows = []
    for name, test in report["tests"].items():
        rows.append(
            {
                "test": TEST_NAMES.get(name, name),
                "statistic": test["statistic"],
                "p-value": fmt_p(test["p_value"]),
                "adjusted p": fmt_p(test["adjusted_p"]),
                "verdict": test["verdict"] or "reported, does not vote",
                **{f"effect: {k}": v for k, v in test.get("effect", {}).items()},
            }
        )
    with st.expander("The statistics behind the verdict"):
        st.dataframe(
            pd.DataFrame(rows),
            hide_index=True,
            width="stretch",
            column_config={
                "test": st.column_config.TextColumn(width="large"),
                "statistic": st.column_config.NumberColumn(format="%.4g"),
            },
        )
        limits = report.get("thresholds", {})
        st.caption(
            "p-values are Bonferroni-adjusted over the voting tests; warning below "
            f"{fmt_p(limits.get('warning_p', 0.01))}, drift below "
            f"{fmt_p(limits.get('drift_p', 0.001))}."
        )
        for note in report.get("notes", []):
            st.caption(f"• {note}")


settings, client = connect()
st.title("Drift")
default_model_note()
st.caption(
    "Compares recent inputs with the good training images' statistics stored in the model: a "
    "changed camera, light or product shows here before it shows in accuracy."
)

st.subheader("Logged predictions (score tests)")
st.caption(
    "Only predictions made with the model as it is now count: the log keys drift by the model's "
    "fingerprint, and saving a threshold or teaching the model changes it, so predictions from "
    "before the last save are left out of this window."
)
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
window = st.file_uploader(
    "Recent images",
    accept_multiple_files=True,
    key="drift_images",
    max_upload_size=upload_limit_mb(),
)
if st.button(f"Test {len(window or [])} image(s) for drift", disabled=not window):
    names = unique_names([f.name for f in window])
    with st.spinner("Embedding and testing…"):
        try:
            uploaded, skipped = drift_skipping_bad(
                scoring_client(settings),
                [(n, f.getvalue()) for n, f in zip(names, window, strict=True)],
            )
        except ClientError as exc:
            explain(exc, settings, "testing the images", "images", scoring=True)
        else:
            for error in skipped:
                st.warning(f"Skipped {error}", icon=":material/block:")
            show_report(uploaded, f"{uploaded['n_window']} uploaded images")
