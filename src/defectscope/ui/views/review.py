"""Review page: go through a queue of logged predictions one image at a time, large, and say
whether each decision was right; then teach the model the false alarms (and undo that)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import streamlit as st

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui import review_keys
from defectscope.ui.api import UiSettings, friendly
from defectscope.ui.formatting import HEATMAP_LEGEND
from defectscope.ui.prediction_detail import describe, picture, review_text
from defectscope.ui.review_logic import QUEUES, crop, left, next_unreviewed, queue_query
from defectscope.ui.teach_panel import teach_panel
from defectscope.ui.widgets import connect, stop_with

VERDICT_BUTTONS = (
    ("correct", "Correct (A)", "The decision was right."),
    ("false_alarm", "False alarm (F)", "Flagged, but the part is good."),
    ("missed_defect", "Missed defect (M)", "Passed, but the part is defective."),
)


def load_queue(client: DefectscopeClient, query: dict[str, Any]) -> None:
    answer = client.review_queue(**query)
    st.session_state["queue"] = {"key": repr(query), "items": answer["items"], "index": 0}
    st.session_state["queue"]["total"] = answer.get("total", len(answer["items"]))


def move(step: int) -> None:
    queue = st.session_state["queue"]
    queue["index"] = (queue["index"] + step) % len(queue["items"])


def record(client: DefectscopeClient, settings: UiSettings, verdict: str, note_key: str) -> None:
    """A verdict button's callback: send the review, keep it locally, go to the next one."""
    queue = st.session_state["queue"]
    item = queue["items"][queue["index"]]
    note = (st.session_state.get(note_key) or "").strip() or None
    reviewer = (st.session_state.get("reviewer") or "").strip() or None
    try:
        client.review(item["id"], verdict, note=note, reviewer=reviewer)
    except ClientError as exc:
        st.session_state["review-error"] = friendly(exc, settings, "saving the review")
        return
    item["review"] = {"verdict": verdict, "note": note, "reviewer": reviewer}
    st.session_state.setdefault("reviewed-here", {})[item["id"]] = verdict
    queue["index"] = next_unreviewed(queue["items"], queue["index"])


def show_item(client: DefectscopeClient, settings: UiSettings, item: dict[str, Any]) -> None:
    st.markdown(f"**Prediction {item['id']}** — {describe(item)}")
    controls = st.columns([2, 1, 1])
    zoom = controls[0].select_slider(
        "Zoom", options=[1.0, 1.5, 2.0, 3.0, 4.0], value=1.0, format_func=lambda z: f"{z:g}×"
    )
    x = controls[1].slider("Left ↔ right", 0, 100, 50, disabled=zoom == 1.0) / 100
    y = controls[2].slider("Top ↕ bottom", 0, 100, 50, disabled=zoom == 1.0) / 100
    if not item.get("has_pictures", True):
        st.info("The server did not keep pictures for this prediction.", icon=":material/info:")
    else:
        try:
            pictures = [
                picture(client, settings.api_url, item["id"], k) for k in ("image", "overlay")
            ]
        except ClientError as exc:
            st.warning(friendly(exc, settings, "loading the pictures"), icon=":material/image:")
        else:
            image, overlay = (crop(p, zoom, x, y) for p in pictures)
            left_col, right_col = st.columns(2)
            left_col.image(image, caption="image", width="stretch")
            right_col.image(overlay, caption="heatmap overlay", width="stretch")
            st.markdown(HEATMAP_LEGEND, unsafe_allow_html=True)
    st.markdown(review_text(item.get("review")))


settings, client = connect()
st.title("Review")
st.caption(
    "Check the line's decisions one image at a time. Flagged parts: was the alarm right? An "
    "audit sample of passed parts: did a defect slip through? False alarms can then be taught "
    "to the model as good."
)
top = st.columns([2, 1])
choice = top[0].radio("Queue", list(QUEUES), horizontal=True, key="queue-choice")
top[1].text_input("Your name (kept with each review)", key="reviewer")
today = datetime.now(UTC).date()
period, custom_scope = None, "flagged"
if QUEUES[choice] is None:
    custom = st.columns(2)
    period = custom[0].date_input("Period (UTC)", (today - timedelta(days=7), today))
    custom_scope = custom[1].radio("Which", ["flagged", "audit"], horizontal=True)
seed = st.session_state.setdefault("audit-seed", random.randrange(1_000_000))
query = queue_query(choice, today, period, custom_scope, seed)  # type: ignore[arg-type]

reload = st.button("Reload the queue", help="Fetch it again: new flags, others' reviews.")
queue = st.session_state.get("queue")
if reload or queue is None or queue["key"] != repr(query):
    try:
        load_queue(client, query)
    except ClientError as exc:
        stop_with(exc, settings, "reading the review queue")
    queue = st.session_state["queue"]

items = queue["items"]
if not items:
    st.info("Nothing to review in this queue.", icon=":material/done_all:")
else:
    remaining = left(items)
    done = len(items) - remaining
    st.progress(
        done / len(items), text=f"{remaining} left of {len(items)} · image {queue['index'] + 1}"
    )
    if queue.get("total", len(items)) > len(items):
        st.caption(f"The queue holds {queue['total']}; showing the first {len(items)}.")
    review_keys.install()
    st.caption(review_keys.HELP)
    error = st.session_state.pop("review-error", None)
    if error:
        st.error(error, icon=":material/error:")
    item = items[queue["index"]]
    note_key = f"review-note-{item['id']}"
    buttons = st.columns(5)
    buttons[0].button("← Previous", key="review-prev", on_click=move, args=(-1,))
    for column, (verdict, label, help_text) in zip(buttons[1:4], VERDICT_BUTTONS, strict=True):
        column.button(
            label,
            key=f"review-{verdict}",
            help=help_text,
            type="primary" if verdict != "correct" else "secondary",
            on_click=record,
            args=(client, settings, verdict, note_key),
        )
    buttons[4].button("Next →", key="review-next", on_click=move, args=(1,))
    st.text_input("Note (optional, sent with the verdict)", key=note_key)
    with st.container(border=True):
        show_item(client, settings, item)
    if remaining == 0:
        st.success("Every image in this queue is reviewed.", icon=":material/done_all:")

st.divider()
teach_panel(client, settings, query["since"])
