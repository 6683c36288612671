"""Page scripts of the web UI, run by Streamlit (``st.navigation`` in ``ui/app.py``)."""
