"""Teach the model the reviewed false alarms, see what it would change first, and undo it.

Teaching adds the false alarms' patches to the memory bank of good parts as a new model
version (``POST /v1/model/teach``); every version is kept, so going back is activating the
previous one (``POST /v1/model/versions/{v}/activate``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd
import streamlit as st

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui.api import UiSettings, friendly
from defectscope.ui.formatting import fmt_score, fmt_time
from defectscope.ui.prediction_detail import picture
from defectscope.ui.widgets import default_model_note, scoring_client

PREVIEW = "teach-preview-answer"
TAUGHT = "teach-result"


def show_preview(preview: dict[str, Any]) -> None:
    flagged, clear = preview.get("flagged_total", 0), preview.get("would_clear", 0)
    st.markdown(
        f"Teaching **{preview['images']}** false-alarm image(s) adds "
        f"{preview['bank_rows_added']:,} patches to the model's memory of good parts. "
        f"**{clear} of {flagged}** of the period's flags would then pass."
    )
    if preview.get("new_threshold") is not None:
        st.caption(
            f"Threshold: {fmt_score(preview.get('current_threshold'))} now, "
            f"{fmt_score(preview['new_threshold'])} after teaching."
        )


def recheck(client: DefectscopeClient, settings: UiSettings) -> None:
    """Score this session's false alarms again, on the model now active."""
    ids = [i for i, v in st.session_state.get("reviewed-here", {}).items() if v == "false_alarm"]
    if not ids:
        st.caption("No false alarm was marked in this session.")
        return
    scorer = scoring_client(settings)
    for prediction_id in ids:
        try:
            image = picture(client, settings.api_url, prediction_id, "image")
            result = scorer.predict(image)
        except ClientError as exc:
            st.warning(friendly(exc, settings, f"re-scoring {prediction_id}", scoring=True))
            continue
        passes = not result["is_anomalous"]
        verdict = ":green[**passes now**]" if passes else ":red[**still flagged**]"
        st.markdown(
            f"Prediction {prediction_id}: {verdict} — score {fmt_score(result['score'])} "
            f"{'<' if passes else '≥'} threshold {fmt_score(result['threshold'])}"
        )


def versions_panel(client: DefectscopeClient, settings: UiSettings) -> None:
    st.subheader("Model versions")
    try:
        answer = client.versions()
    except ClientError as exc:
        st.warning(friendly(exc, settings, "reading the model versions"), icon=":material/error:")
        return
    active, versions = answer.get("active"), answer.get("versions", [])
    if not versions:
        st.caption("No versions yet: teaching creates the first.")
        return
    table = pd.DataFrame(
        {
            "version": [v["version"] for v in versions],
            "active": ["●" if v["version"] == active else "" for v in versions],
            "parent": [v.get("parent") for v in versions],
            "created (UTC)": [fmt_time(v.get("created_at")) for v in versions],
            "by": [v.get("created_by") or "" for v in versions],
            "images taught": [v.get("images_taught") for v in versions],
            "memory bank rows": [v.get("bank_rows") for v in versions],
        }
    )
    st.dataframe(table, hide_index=True, width="stretch")
    parent = next((v.get("parent") for v in versions if v["version"] == active), None)
    if parent is not None and st.button(
        f"Undo (go back to version {parent})", key="version-undo", type="primary"
    ):
        activate(client, settings, parent)
    others = [v["version"] for v in versions if v["version"] != active]
    if others:
        pick = st.columns([2, 1])
        chosen = pick[0].selectbox("Or activate another version", others, key="version-pick")
        if pick[1].button(f"Activate version {chosen}", key="version-activate"):
            activate(client, settings, chosen)


def activate(client: DefectscopeClient, settings: UiSettings, version: Any) -> None:
    try:
        scoring_client(settings).activate(version)
    except ClientError as exc:
        st.error(friendly(exc, settings, f"activating version {version}"), icon=":material/error:")
        return
    st.session_state.pop(PREVIEW, None)
    st.session_state[TAUGHT] = {"activated": version}
    st.rerun()


def teach_panel(client: DefectscopeClient, settings: UiSettings, since: datetime) -> None:
    st.subheader("Teach the model")
    default_model_note()
    st.caption(
        "Adds the images marked *false alarm* since "
        f"{since:%Y-%m-%d %H:%M} UTC to what the model knows as good, as a new version. "
        "Preview first; you can always go back to the previous version."
    )
    done = st.session_state.get(TAUGHT)
    if done and "activated" in done:
        st.success(f"Version {done['activated']} is active again.", icon=":material/undo:")
    elif done:
        st.success(
            f"Taught {done['images']} image(s): version **{done['version']}** is active "
            f"(from version {done.get('parent')}).",
            icon=":material/school:",
        )
        if st.button("Re-score this session's false alarms on it", key="teach-recheck"):
            recheck(client, settings)

    if st.button("Preview teaching", key="teach-preview"):
        try:
            st.session_state[PREVIEW] = scoring_client(settings).teach_preview(
                since=since, flagged_since=since
            )
        except ClientError as exc:
            st.error(friendly(exc, settings, "previewing", scoring=True), icon=":material/error:")
    preview = st.session_state.get(PREVIEW)
    if preview is not None:
        with st.container(border=True):
            show_preview(preview)
            if not preview.get("images"):
                st.info("No false alarm to teach in this period.", icon=":material/info:")
            elif st.button("Confirm: teach the model", key="teach-confirm", type="primary"):
                try:
                    reviewer = (st.session_state.get("reviewer") or "").strip() or None
                    taught = scoring_client(settings).teach(since=since, reviewer=reviewer)
                except ClientError as exc:
                    st.error(
                        friendly(exc, settings, "teaching", scoring=True), icon=":material/error:"
                    )
                else:
                    st.session_state.pop(PREVIEW, None)
                    st.session_state[TAUGHT] = taught
                    st.rerun()
    versions_panel(client, settings)
