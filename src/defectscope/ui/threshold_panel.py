"""The Model page's safe threshold change: what a value would do before it is saved.

Shows the good training scores (``GET /v1/model/calibration``) and a recent batch of scores
against the chosen value, the expected false-alarm rate, a warning below the lowest good
training score, and saves only after a confirmation, with who and why (the audit trail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui import analysis
from defectscope.ui.api import UiSettings, friendly
from defectscope.ui.formatting import fmt_rate, fmt_score, fmt_time

PENDING = "threshold_pending"
# The last saved change: shown on the page (a toast before st.rerun can be lost) while the
# stored threshold is still the one saved.
SAVED = "threshold_saved"
# A value chosen on the Inspect page, handed to this panel to be checked and saved.
PROPOSED = "threshold_proposed"
MODEL_PAGE = Path(__file__).parent / "views" / "model.py"


def batch_scores(client: DefectscopeClient) -> tuple[list[float], str]:
    """The scores to compare with: this session's Inspect results, else the newest 500 logged."""
    results = st.session_state.get("results") or []
    scored = [r["score"] for r in results if r.get("error") is None]
    if scored:
        return scored, f"the {len(scored)} images scored on Inspect"
    try:
        rows = client.predictions(limit=500)["items"]
    except ClientError:
        return [], "no recent predictions"
    return [r["score"] for r in rows], f"the newest {len(rows)} logged predictions"


def histogram(
    good: list[float], batch: list[float], batch_label: str, chosen: float, current: float
) -> alt.LayerChart | alt.FacetChart:
    """Both sets over the same bins, each as its share of images: 200 training scores would
    otherwise flatten a batch of 4 to nothing."""
    values = np.asarray([*good, *batch, chosen, current], dtype=float)
    edges = np.histogram_bin_edges(values, bins=40)
    frames = []
    for label, scores in (("good training images", good), (batch_label, batch)):
        if scores:
            counts, _ = np.histogram(scores, bins=edges)
            frames.append(
                pd.DataFrame(
                    {"start": edges[:-1], "end": edges[1:], "share": counts / len(scores)}
                ).assign(set=label)
            )
    bars = (
        alt.Chart(pd.concat(frames, ignore_index=True))
        .mark_bar(opacity=0.55)
        .encode(
            x=alt.X("start:Q", title="anomaly score", scale=alt.Scale(zero=False)),
            x2="end:Q",
            y=alt.Y("share:Q", stack=None, title="share of the set", axis=alt.Axis(format="%")),
            y2=alt.datum(0),
            color=alt.Color("set:N", legend=alt.Legend(orient="bottom", title=None)),
            tooltip=["set:N", alt.Tooltip("share:Q", format=".1%")],
        )
    )
    marks = pd.DataFrame(
        {"score": [current, chosen], "which": ["stored threshold", "chosen threshold"]}
    )
    rules = (
        alt.Chart(marks)
        .mark_rule(strokeWidth=2)
        .encode(
            x="score:Q",
            strokeDash=alt.StrokeDash("which:N", legend=alt.Legend(orient="bottom", title=None)),
            tooltip=["which:N", alt.Tooltip("score:Q", format=".4g")],
        )
    )
    return alt.layer(bars, rules)


def audit_table(model: dict[str, Any]) -> None:
    trail = model.get("threshold_audit") or []
    st.subheader("Threshold changes")
    if not trail:
        st.caption("No threshold has been changed through the API yet.")
        return
    rows = [
        {
            "when (UTC)": fmt_time(entry.get("when")),
            "who": entry.get("who") or "—",
            "field": entry.get("field", "image"),
            "old": fmt_score(entry.get("old")),
            "new": fmt_score(entry.get("new")),
            "reason": entry.get("reason") or "",
        }
        for entry in reversed(trail)
    ]
    # A plain table: a handful of rows, readable (and searchable) as page text.
    st.table(pd.DataFrame(rows).set_index("when (UTC)"))


def save(
    client: DefectscopeClient, settings: UiSettings, change: dict[str, Any], current: float
) -> None:
    try:
        model = client.set_thresholds(**change)
    except ClientError as exc:
        st.error(friendly(exc, settings, "saving the threshold"), icon=":material/error:")
        return
    st.session_state.pop(PENDING, None)
    stored = (model.get("calibration") or {}).get("threshold")
    st.session_state[SAVED] = {"old": current, "new": stored}
    st.rerun()


def saved_notice(current: float) -> None:
    saved = st.session_state.get(SAVED)
    if saved and saved.get("new") is not None and float(saved["new"]) == current:
        st.success(
            f"Threshold saved to the model: {fmt_score(saved['old'])} → {fmt_score(current)}. "
            "Every prediction from now on uses it.",
            icon=":material/check_circle:",
        )


def threshold_panel(client: DefectscopeClient, settings: UiSettings, model: dict[str, Any]) -> None:
    st.subheader("Change the image threshold")
    current = float(model["calibration"]["threshold"])
    saved_notice(current)
    try:
        calibration = client.calibration()
    except ClientError as exc:
        st.warning(friendly(exc, settings, "reading the calibration"), icon=":material/error:")
        calibration = {}
    good = [float(s) for s in calibration.get("good_scores") or []]
    lowest = calibration.get("lowest_good_score")
    calibrated = calibration.get("calibrated_threshold", model.get("calibrated_threshold"))

    key = f"new-threshold-{current!r}"  # a save starts again from the stored value
    proposed = st.session_state.pop(PROPOSED, None)
    if proposed is not None:
        st.session_state[key] = float(proposed)
    elif key not in st.session_state:
        st.session_state[key] = current
    chosen = float(
        st.number_input(
            "New image threshold (score ≥ threshold → anomalous)",
            min_value=0.0,
            step=max(current / 100, 1e-4),
            format="%.4g",
            key=key,
        )
    )
    batch, batch_label = batch_scores(client)
    if good or batch:
        st.altair_chart(histogram(good, batch, batch_label, chosen, current), width="stretch")
    rate = analysis.false_alarm_rate(good, chosen)
    first, second, third = st.columns(3)
    first.metric("Stored threshold", fmt_score(current))
    second.metric("Calibrated threshold", fmt_score(calibrated))
    third.metric(
        "Expected false-alarm rate",
        fmt_rate(rate),
        help="Share of the good training images this threshold would flag.",
    )
    if batch:
        change = analysis.reclassify(batch, current, chosen)
        st.caption(
            f"On {batch_label}: {change.n_anomalous} of {change.n_images} flagged at "
            f"{fmt_score(chosen)}; {change.to_anomalous} more flagged, {change.to_good} fewer."
        )
    if lowest is not None and chosen < float(lowest):
        st.warning(
            f"{fmt_score(chosen)} is below the lowest good training score "
            f"({fmt_score(lowest)}): even images like the training ones would be flagged.",
            icon=":material/warning:",
        )
    who = st.columns(2)
    reviewer = who[0].text_input("Your name", key="threshold-reviewer")
    reason = who[1].text_input("Why (kept in the audit trail)", key="threshold-reason")
    buttons = st.columns(2)
    if buttons[0].button("Save threshold…", disabled=chosen == current, key="threshold-save"):
        st.session_state[PENDING] = {"image": chosen}
    if buttons[1].button(
        f"Reset to calibrated ({fmt_score(calibrated)})…",
        disabled=calibrated is None or float(calibrated) == current,
        key="threshold-reset",
    ):
        st.session_state[PENDING] = {"reset": True}

    pending = st.session_state.get(PENDING)
    if pending:
        target = fmt_score(calibrated) if pending.get("reset") else fmt_score(pending["image"])
        with st.container(border=True):
            st.markdown(
                f"Change the stored threshold from **{fmt_score(current)}** to **{target}**? "
                "Every prediction from now on uses it."
            )
            confirm, cancel = st.columns(2)
            if confirm.button("Confirm", type="primary", key="threshold-confirm"):
                save(
                    client,
                    settings,
                    {**pending, "reason": reason or None, "reviewer": reviewer or None},
                    current,
                )
            if cancel.button("Cancel", key="threshold-cancel"):
                st.session_state.pop(PENDING, None)
                st.rerun()
    audit_table(model)
