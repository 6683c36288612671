"""The Inspect page's results: a paged grid of thumbnails coloured by decision, one opened
large with its heatmap overlay and mask (a long batch no longer makes a page of 11,000 px)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

from defectscope.ui import analysis
from defectscope.ui.formatting import HEATMAP_LEGEND, display_name, fmt_score
from defectscope.ui.widgets import png

PER_PAGE = 12
COLUMNS = 4


def verdict_badge(anomalous: bool) -> str:
    return ":red-background[**anomalous**]" if anomalous else ":green-background[**good**]"


def show_detail(item: dict[str, Any], threshold: float) -> None:
    """One image large: the decision line, the original, the heatmap overlay and the mask."""
    anomalous = analysis.is_anomalous(item["score"], threshold)
    st.markdown(
        f"**{display_name(item['name'])}** — {verdict_badge(anomalous)} · score "
        f"**{fmt_score(item['score'])}** {'≥' if anomalous else '<'} threshold "
        f"{fmt_score(threshold)} · normalised {fmt_score(item['score'] / threshold)}"
    )
    original, overlay, mask = st.columns(3)
    original.image(item["image"], caption="original", width="stretch")
    overlay.image(png(item["overlay_png"]), caption="heatmap overlay", width="stretch")
    mask.image(
        png(item["mask_png"]),
        caption=f"defect mask ({100 * item['defect_area_fraction']:.2f}% of pixels)",
        width="stretch",
    )
    st.markdown(HEATMAP_LEGEND, unsafe_allow_html=True)


def show_gallery(shown: Sequence[dict[str, Any]], threshold: float, results_id: str) -> None:
    """Thumbnails of ``shown``, PER_PAGE at a time; "Open" puts one in the detail view."""
    if not shown:
        return
    page_key = f"gallery-page-{results_id}"
    open_key = f"gallery-open-{results_id}"
    items, n_pages = analysis.page_of(shown, st.session_state.get(page_key, 0), PER_PAGE)
    names = [r["name"] for r in shown]
    if st.session_state.get(open_key) not in names:
        st.session_state[open_key] = names[0]
    with st.container(border=True):
        show_detail(shown[names.index(st.session_state[open_key])], threshold)

    if n_pages > 1:
        st.number_input(
            f"Page (of {n_pages}, {PER_PAGE} images each)",
            min_value=1,
            max_value=n_pages,
            value=min(st.session_state.get(page_key, 0), n_pages - 1) + 1,
            key=f"{page_key}-input",
            on_change=_set_page,
            args=(page_key, f"{page_key}-input"),
        )
    columns = st.columns(COLUMNS)
    for i, item in enumerate(items):
        anomalous = analysis.is_anomalous(item["score"], threshold)
        with columns[i % COLUMNS].container(border=True):
            st.image(item["image"], width="stretch")
            st.markdown(
                f"{verdict_badge(anomalous)} {fmt_score(item['score'])}  \n"
                f"`{display_name(item['name'])}`"
            )
            st.button(
                "Open",
                key=f"open-{results_id}-{item['name']}",
                on_click=st.session_state.__setitem__,
                args=(open_key, item["name"]),
                disabled=item["name"] == st.session_state[open_key],
            )


def _set_page(page_key: str, input_key: str) -> None:
    st.session_state[page_key] = int(st.session_state[input_key]) - 1
