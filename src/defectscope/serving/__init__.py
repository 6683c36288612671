"""REST serving: a FastAPI adapter over `Detector` (``pip install defectscope[serve]``).

``create_app(ServingSettings(...))`` builds the app; ``defectscope serve MODEL`` runs it with
uvicorn. Nothing here preprocesses or scores images itself: decoding is `load_image`,
inference is `Detector.predict`, colour maps are `defectscope.visualize`.
"""

from __future__ import annotations

from defectscope.serving.settings import ServingSettings

__all__ = ["ServingSettings", "create_app"]


def __getattr__(name: str):
    # Lazy so that importing the settings (e.g. from the CLI) does not import FastAPI.
    if name == "create_app":
        from defectscope.serving.app import create_app

        return create_app
    raise AttributeError(name)
