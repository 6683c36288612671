"""Inspect page: score uploaded or sample images, compare with the threshold, save a new one."""

from __future__ import annotations

import uuid

import pandas as pd
import streamlit as st

from defectscope.client import ClientError
from defectscope.ui import analysis
from defectscope.ui.api import friendly, sample_sets, score_images
from defectscope.ui.widgets import connect, model_or_stop, png, stop_with

settings, client = connect()
st.title("Inspect images")
model = model_or_stop(client, settings)
stored = float(model["calibration"]["threshold"])

# ------------------------------------------------------------------------------ input
sets = sample_sets(settings.samples)
source = st.radio("Images from", ["Upload", "Sample set"], horizontal=True) if sets else "Upload"
if source == "Upload":
    # No type filter: the API decides by content, and says why it refuses a file.
    uploads = st.file_uploader("Images to score", accept_multiple_files=True) or []
    chosen = [(u.name, u.getvalue()) for u in uploads]
else:
    name = st.selectbox("Sample set", list(sets), help=f"Folders under {settings.samples}")
    paths = sets[name]
    count = st.slider("Images", 1, len(paths), min(len(paths), 8)) if len(paths) > 1 else 1
    chosen = [(f"{name}/{p.name}", p.read_bytes()) for p in paths[:count]]

if st.button(f"Score {len(chosen)} image(s)", type="primary", disabled=not chosen):
    progress = st.progress(0.0, text="Scoring…")

    def show_progress(done: int, total: int) -> None:
        progress.progress(done / total, f"{done}/{total}")

    try:
        new_results = score_images(client, chosen, show_progress)
    except ClientError as exc:
        progress.empty()
        stop_with(exc, settings, "scoring")
    progress.empty()
    st.session_state["results"] = new_results
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
scores = [r["score"] for r in scored]
low, high = analysis.slider_range(scores, stored)
threshold = st.slider(
    "Image threshold (score ≥ threshold → anomalous)",
    min_value=low,
    max_value=high,
    value=min(max(stored, low), high),
    step=(high - low) / 500,
    format="%.4f",
    key=f"threshold-{st.session_state['results_id']}",
)
change = analysis.reclassify(scores, stored, threshold)
left, middle, right = st.columns(3)
left.metric("Anomalous at this threshold", f"{change.n_anomalous} / {change.n_images}")
middle.metric(
    "Stored threshold", f"{stored:.4f}", help=model["calibration"].get("threshold_source")
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
if st.button(f"Save threshold {threshold:.4f} to the model", disabled=threshold == stored):
    try:
        client.set_thresholds(image=threshold)
    except ClientError as exc:
        st.error(friendly(exc, settings, "saving the threshold"), icon=":material/error:")
    else:
        st.toast(f"Threshold {threshold:.4f} saved to the model")
        st.rerun()

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
st.dataframe(table, hide_index=True, width="stretch")

for r in shown:
    anomalous = analysis.is_anomalous(r["score"], threshold)
    with st.container(border=True):
        verdict = ":red[**anomalous**]" if anomalous else ":green[**good**]"
        st.markdown(
            f"**{r['name']}** — {verdict} · score **{r['score']:.4f}** "
            f"{'≥' if anomalous else '<'} threshold {threshold:.4f}"
        )
        original, overlay, mask = st.columns(3)
        original.image(r["image"], caption="original", width="stretch")
        overlay.image(png(r["overlay_png"]), caption="heatmap overlay", width="stretch")
        mask.image(
            png(r["mask_png"]),
            caption=f"defect mask ({100 * r['defect_area_fraction']:.2f}% of pixels)",
            width="stretch",
        )
