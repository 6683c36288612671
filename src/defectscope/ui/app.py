"""Entry script of ``defectscope ui``: page setup, navigation and the API connection status."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from defectscope.client import ClientError
from defectscope.ui.api import friendly
from defectscope.ui.widgets import connect

VIEWS = Path(__file__).parent / "views"

st.set_page_config(page_title="defectscope", page_icon=":material/search:", layout="wide")

settings, client = connect()
with st.sidebar:
    st.caption(f"API: {settings.api_url}")
    try:
        ready = client.ready()
    except ClientError as exc:
        st.error(friendly(exc, settings), icon=":material/power_off:")
    else:
        if ready:
            st.success("Connected, model ready", icon=":material/check_circle:")
        else:
            st.warning(
                "Connected; the model is still loading (or failed to load).",
                icon=":material/hourglass_top:",
            )

page = st.navigation(
    [
        st.Page(
            VIEWS / "inspect_images.py", title="Inspect", icon=":material/search:", default=True
        ),
        st.Page(VIEWS / "history.py", title="History", icon=":material/timeline:"),
        st.Page(VIEWS / "drift.py", title="Drift", icon=":material/waves:"),
        st.Page(VIEWS / "model.py", title="Model", icon=":material/memory:"),
    ]
)
page.run()
