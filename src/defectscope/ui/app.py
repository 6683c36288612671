"""Entry script of ``defectscope ui``: page setup, navigation and the API connection status."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import streamlit as st
from PIL import Image, ImageDraw

from defectscope.ui.widgets import connect, model_picker, show_connection

VIEWS = Path(__file__).parent / "views"


@cache
def favicon() -> Image.Image:
    # Drawn here and served by Streamlit itself: an emoji or material icon would make the
    # browser fetch the favicon from a font CDN, which a plant network may not reach.
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((6, 6, 42, 42), outline=(198, 40, 40, 255), width=7)
    draw.line((38, 38, 58, 58), fill=(198, 40, 40, 255), width=9)
    return image


st.set_page_config(page_title="defectscope", page_icon=favicon(), layout="wide")

settings, client = connect()
show_connection(client, settings)
model_picker(client)

page = st.navigation(
    [
        st.Page(
            VIEWS / "inspect_images.py", title="Inspect", icon=":material/search:", default=True
        ),
        st.Page(VIEWS / "review.py", title="Review", icon=":material/fact_check:"),
        st.Page(VIEWS / "history.py", title="History", icon=":material/timeline:"),
        st.Page(VIEWS / "drift.py", title="Drift", icon=":material/waves:"),
        st.Page(VIEWS / "model.py", title="Model", icon=":material/memory:"),
    ]
)
page.run()
