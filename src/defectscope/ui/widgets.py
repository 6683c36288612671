"""Streamlit pieces shared by the pages: the cached client and error display."""

from __future__ import annotations

import base64
from typing import Any, NoReturn

import streamlit as st

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui.api import UiSettings, friendly


@st.cache_resource(show_spinner=False)
def _client(settings: UiSettings) -> DefectscopeClient:
    # One HTTP connection pool per API address and key, shared by every session and rerun.
    return settings.client()


def connect() -> tuple[UiSettings, DefectscopeClient]:
    settings = UiSettings.from_env()
    return settings, _client(settings)


def stop_with(error: ClientError, settings: UiSettings, subject: str | None = None) -> NoReturn:
    """Show the friendly text of ``error`` and end this page's run."""
    st.error(friendly(error, settings, subject), icon=":material/error:")
    st.stop()


def model_or_stop(client: DefectscopeClient, settings: UiSettings) -> dict[str, Any]:
    try:
        return client.model_info()
    except ClientError as exc:
        stop_with(exc, settings)


def png(value: str) -> bytes:
    return base64.b64decode(value)
