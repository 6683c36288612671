"""Streamlit web UI over the REST API (``defectscope ui --api URL``).

It talks to the server only through `defectscope.client.DefectscopeClient` (`api.py`); the
page scripts live in `views/`, and everything worth testing without a browser (re-classifying
at a new threshold, sorting and filtering, anomaly rates over time, friendly error text) is in
plain functions in `analysis.py` and `api.py`.
"""
