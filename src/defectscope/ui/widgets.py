"""Streamlit pieces shared by the pages: the cached clients, connection state, errors."""

from __future__ import annotations

import base64
from typing import Any, NoReturn

import streamlit as st

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui.api import UiSettings, connection_state, friendly, model_choices

ICONS = {"ok": ":material/check_circle:", "loading": ":material/hourglass_top:"}
# Session keys: the model picked in the sidebar, and the server's default model.
MODEL = "model"
DEFAULT_MODEL = "default_model"


@st.cache_resource(show_spinner=False)
def _client(settings: UiSettings, quick: bool) -> DefectscopeClient:
    # One HTTP connection pool per API address, key and timeout, shared by every session.
    return settings.client(quick=quick)


def connect() -> tuple[UiSettings, DefectscopeClient]:
    """The settings and the quick client (short timeout): health, metadata, log, reviews."""
    settings = UiSettings.from_env()
    return settings, _client(settings, True)


def scoring_client(settings: UiSettings) -> DefectscopeClient:
    """The client with the long timeout, only for requests that send or embed images."""
    return _client(settings, False)


def show_connection(client: DefectscopeClient, settings: UiSettings) -> str:
    """The connection and key state in the sidebar; returns its level (ok, loading, error)."""
    level, text = connection_state(client, settings)
    with st.sidebar:
        st.caption(f"API: {settings.api_url}")
        if level == "ok":
            st.success(text, icon=ICONS["ok"])
        elif level == "loading":
            st.warning(text, icon=ICONS["loading"])
        else:
            st.error(text, icon=":material/power_off:")
    return level


def model_picker(client: DefectscopeClient) -> None:
    """The sidebar's "Model" choice, shown only when the API serves several models."""
    names, default = model_choices(client)
    if not names:
        st.session_state.pop(MODEL, None)
        st.session_state.pop(DEFAULT_MODEL, None)
        return
    st.session_state[DEFAULT_MODEL] = default
    if st.session_state.get(MODEL) not in names:
        st.session_state[MODEL] = default
    st.sidebar.selectbox(
        "Model",
        names,
        key=MODEL,
        format_func=lambda name: f"{name} (default)" if name == default else name,
        help="Inspect scores and History lists with this model; the other pages always work "
        "on the server's default model.",
    )


def other_model() -> str | None:
    """The model picked in the sidebar when it is not the server's default, else None."""
    chosen = st.session_state.get(MODEL)
    return chosen if chosen and chosen != st.session_state.get(DEFAULT_MODEL) else None


def default_model_note() -> None:
    """One line on pages that only act on the default model, when another one is picked."""
    if other_model() is not None:
        st.info(
            f"This page applies to the default model, "
            f"**{st.session_state.get(DEFAULT_MODEL)}**, not to {other_model()}.",
            icon=":material/info:",
        )


def stop_with(
    error: ClientError, settings: UiSettings, subject: str | None = None, scoring: bool = False
) -> NoReturn:
    """Show the friendly text of ``error`` and end this page's run."""
    st.error(friendly(error, settings, subject, scoring), icon=":material/error:")
    st.stop()


def model_or_stop(client: DefectscopeClient, settings: UiSettings) -> dict[str, Any]:
    try:
        return client.model_info()
    except ClientError as exc:
        stop_with(exc, settings)


def model_or_last(client: DefectscopeClient, settings: UiSettings) -> tuple[dict[str, Any], bool]:
    """``(GET /v1/model, online)``, or the last answer this session got when the API is away
    now (online False), so a page keeps showing its results instead of only an error."""
    try:
        model = client.model_info()
    except ClientError as exc:
        last = st.session_state.get("last_model")
        if last is None:
            stop_with(exc, settings)
        st.warning(
            f"{friendly(exc, settings)} Showing the last results; saving is off until the API "
            "answers again.",
            icon=":material/cloud_off:",
        )
        return last, False
    st.session_state["last_model"] = model
    return model, True


def png(value: str) -> bytes:
    return base64.b64decode(value)
