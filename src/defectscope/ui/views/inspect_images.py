"""Inspect page: score uploaded or sample images, compare with the threshold, save a new one."""

from __future__ import annotations

import uuid

import pandas as pd
import streamlit as st

from defectscope.client import ClientError
from defectscope.ui import analysis
from defectscope.ui.api import sample_sets, score_images, upload_limit_mb
from defectscope.ui.formatting import SCORES_EXPLAINED, fmt_score, unique_names
from defectscope.ui.gallery import show_gallery
from defectscope.ui.threshold_panel import MODEL_PAGE, PROPOSED
from defectscope.ui.widgets import (
    DEFAULT_MODEL,
    connect,
    model_or_last,
    other_model,
    scoring_client,
    stop_with,
)


def forget_results() -> None:
    """Another source or set: the old results would be read as this one's."""
    for key in ("results", "results_id", "results_from", "results_model"):
        st.session_state.pop(key, None)


settings, client = connect()
st.title("Inspect images")
model, online = model_or_last(client, settings)
stored = float(model["calibration"]["threshold"])
# A model picked in the sidebar other than the default: its own threshold, and results scored
# by another model would be read as its own.
chosen = other_model()
if chosen is not None:
    try:
        stored = float(client.model_thresholds(chosen)["threshold"])
    except ClientError as exc:
        stop_with(exc, settings, f"model {chosen}")
if st.session_state.get("results") and st.session_state.get("results_model") != chosen:
    forget_results()

# ------------------------------------------------------------------------------ input
sets = sample_sets(settings.samples)
source = (
    st.radio("Images from", ["Upload", "Sample set"], horizontal=True, on_change=forget_results)
    if sets
    else "Upload"
)
if source == "Upload":
    folder = st.toggle("Upload a whole folder (keeps sub-folder names)", on_change=forget_results)
    # No type filter: the API decides by content, and says why it refuses a file.
    uploads = (
        st.file_uploader(
            "Images to score",
            accept_multiple_files="directory" if folder else True,
            max_upload_size=upload_limit_mb(),
        )
        or []
    )
    names = unique_names([u.name for u in uploads])
    images = [(name, u.getvalue()) for name, u in zip(names, uploads, strict=True)]
    label = "uploads"
else:
    name = st.selectbox(
        "Sample set", list(sets), help=f"Folders under {settings.samples}", on_change=forget_results
    )
    paths = sets[name]
    count = st.slider("Images", 1, len(paths), min(len(paths), 8)) if len(paths) > 1 else 1
    images = [(f"{name}/{p.name}", p.read_bytes()) for p in paths[:count]]
    label = f"sample set {name}"

scored_by = f" with model {chosen}" if chosen else ""
if st.button(
    f"Score {len(images)} image(s){scored_by}", type="primary", disabled=not images or not online
):
    progress = st.progress(0.0, text="Scoring…")

    def show_progress(done: int, total: int) -> None:
        progress.progress(done / total, f"{done}/{total}")

    try:
        new_results = score_images(scoring_client(settings), images, show_progress, chosen)
    except ClientError as exc:
        progress.empty()
        stop_with(exc, settings, "scoring", scoring=True)
    progress.empty()
    st.session_state["results"] = new_results
    st.session_state["results_from"] = label
    st.session_state["results_model"] = chosen
    # A new slider per result set: an old position may lie outside the new range.
    st.session_state["results_id"] = uuid.uuid4().hex

results = st.session_state.get("results")
if not results:
    st.info("Upload images or pick a sample set, then press **Score**.")
    st.stop()

# --------------------------------------------------------------------------- threshold
scored = [r for r in results if r["error"] is None]
for failed in (r for r in results if r["error"] is not None):
    st.warning(f"{failed['name']}: rejected by the API: {failed['error']}", icon=":material/block:")
if not scored:
    st.stop()
versions = ", ".join(sorted({r.get("served_version") or "unversioned" for r in scored}))
scorer = chosen or st.session_state.get(DEFAULT_MODEL)
st.caption(
    f"Results of {len(results)} image(s) from {st.session_state['results_from']}, scored by "
    + (f"model {scorer}, version {versions}." if scorer else f"model version {versions}.")
)
scores = [r["score"] for r in scored]
low, high = analysis.slider_range(scores, stored)
options = analysis.threshold_options(low, high, stored)
threshold = st.select_slider(
    "Image threshold (score ≥ threshold → anomalous)",
    options=options,
    value=stored,
    format_func=fmt_score,
    key=f"threshold-{st.session_state['results_id']}-{stored!r}",
)
change = analysis.reclassify(scores, stored, threshold)
left, middle, right = st.columns(3)
left.metric("Anomalous at this threshold", f"{change.n_anomalous} / {change.n_images}")
middle.metric(
    "Stored threshold", fmt_score(stored), help=model["calibration"].get("threshold_source")
)
right.metric(
    "Decisions changed",
    change.n_changed,
    help=f"{change.to_anomalous} good → anomalous, {change.to_good} anomalous → good",
)
if change.n_changed:
    st.caption(
        f"{change.n_changed} image(s) change decision against the stored threshold: "
        f"{change.to_anomalous} good → anomalous, {change.to_good} anomalous → good."
    )
st.caption(SCORES_EXPLAINED + " The **Model** page saves thresholds with a safety check.")
# Saving goes through the Model page: false-alarm estimate, confirmation and audit trail.
if st.button(
    f"Review and save {fmt_score(threshold)} on the Model page…",
    disabled=threshold == stored or not online or chosen is not None,
    help="The Model page saves the default model's threshold."
    if chosen is not None
    else "Nothing to save: this is the stored threshold."
    if threshold == stored
    else None,
):
    st.session_state[PROPOSED] = float(threshold)
    st.switch_page(MODEL_PAGE)

# ----------------------------------------------------------------------------- results
filters = st.columns(2)
decisions: list[analysis.DecisionFilter] = ["all", "anomalous", "good"]
decision = filters[0].selectbox("Show", decisions)
sort = filters[1].selectbox("Sort by", analysis.SORT_KEYS)
shown = [
    r
    for r in analysis.select_results(results, threshold, decision, sort=sort)
    if r["error"] is None
]
table = pd.DataFrame(
    {
        "image": [r["name"] for r in shown],
        "score": [r["score"] for r in shown],
        "decision": [
            "anomalous" if analysis.is_anomalous(r["score"], threshold) else "good" for r in shown
        ],
        "defect area %": [100 * r["defect_area_fraction"] for r in shown],
    }
)
st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    column_config={
        "score": st.column_config.NumberColumn(format="%.4g"),
        "defect area %": st.column_config.NumberColumn(format="%.2f"),
    },
)
show_gallery(shown, threshold, st.session_state["results_id"])
