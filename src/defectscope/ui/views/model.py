"""Model page: what the API serves (metadata, thresholds) and its evaluation report, if any."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from defectscope.client import ClientError
from defectscope.ui.formatting import fmt_score
from defectscope.ui.threshold_panel import threshold_panel
from defectscope.ui.widgets import connect, default_model_note, model_or_stop, stop_with

REPORT_METRICS = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO",
    "f1_max": "F1 max",
    "accuracy": "Accuracy at stored threshold",
    "precision": "Precision",
    "recall": "Recall",
    "false_alarm_rate": "False-alarm rate",
}

settings, client = connect()
st.title("Model")
default_model_note()
model = model_or_stop(client, settings)
calibration = model.get("calibration", {})
backbone = model.get("backbone", {})
preprocessing = model.get("preprocessing", {})

a, b, c = st.columns(3)
a.metric("Image threshold", fmt_score(calibration.get("threshold")))
b.metric("Pixel threshold", fmt_score(calibration.get("pixel_threshold")))
c.metric("Threshold source", str(calibration.get("threshold_source", "?")))

facts = {
    "fingerprint": model.get("model_fingerprint"),
    "runtime": model.get("runtime", "torch"),
    "backbone": backbone.get("name"),
    "layers": backbone.get("layers"),
    "weights": backbone.get("weights"),
    "input size": preprocessing.get("input_size"),
    "resize": preprocessing.get("aspect"),
    # Files from before the padding option padded with the mean colour.
    "padding": (
        preprocessing.get("padding", "mean") if preprocessing.get("aspect") == "pad" else "none"
    ),
    "calibration": calibration.get("method"),
    "calibrated false-alarm rate": calibration.get("false_alarm_rate"),
    # Files from before the tail spread used the plain quantile.
    "threshold tail spread": calibration.get("tail_spread", 1.0),
    "created": model.get("created_at"),
    "defectscope version": model.get("defectscope_version"),
}
training = model.get("training", {})
if "n_images" in training:
    facts["training images"] = training["n_images"]
st.dataframe(
    pd.DataFrame({"property": list(facts), "value": [str(v) for v in facts.values()]}),
    hide_index=True,
    width="stretch",
    height=35 * (len(facts) + 1) + 3,  # every row visible, no inner scrolling
)
with st.expander("Full metadata (GET /v1/model)"):
    st.json(model, expanded=False)

threshold_panel(client, settings, model)

st.subheader("Evaluation report")
try:
    found = client.model_report()
except ClientError as exc:
    stop_with(exc, settings, "reading the evaluation report")
if found is None:
    st.info(
        "This model has no evaluation report. Write one next to it with "
        "`defectscope evaluate MODEL DATA --report MODEL/report`, or start the server with "
        "`defectscope serve MODEL --report DIR`."
    )
    st.stop()
report = found["report"]
st.caption(f"From {found['source']}")
metrics = report.get("metrics", {})
cols = st.columns(4)
for i, (key, label) in enumerate(
    k for k in REPORT_METRICS.items() if metrics.get(k[0]) is not None
):
    cols[i % 4].metric(label, f"{metrics[key]:.3f}")
if "confusion" in report:
    confusion = report["confusion"]
    st.write("Confusion at the stored threshold")
    st.dataframe(
        pd.DataFrame(
            {
                "": ["defective", "good"],
                "flagged anomalous": [confusion.get("tp"), confusion.get("fp")],
                "passed as good": [confusion.get("fn"), confusion.get("tn")],
            }
        ),
        hide_index=True,
    )
if report.get("per_defect"):
    st.dataframe(pd.DataFrame(report["per_defect"].values()), hide_index=True, width="stretch")
