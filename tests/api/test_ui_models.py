"""The web UI's model picker, run by Streamlit's AppTest against a real `defectscope serve`
process serving two models (and a one-model server, which shows no picker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("streamlit")

from _images import png, texture_crops
from _models import copy_model
from _server import AUTH, KEY, running_server, served
from streamlit.testing.v1 import AppTest

from defectscope.detector.detector import Detector
from defectscope.serving.settings import ServingSettings
from defectscope.ui.formatting import fmt_score
from defectscope.ui.widgets import DEFAULT_MODEL, MODEL

UI = Path(__file__).parents[2] / "src" / "defectscope" / "ui"
RUN_TIMEOUT = 90  # the first request to the second model loads it


@pytest.fixture(scope="module")
def two_models(texture_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``defectscope serve --models DIR`` with alpha (the default) and beta, beta's image
    threshold three times alpha's so the pages show which one scored."""
    root = tmp_path_factory.mktemp("models")
    copy_model(texture_model_dir, root / "alpha")
    copy_model(texture_model_dir, root / "beta")
    log = tmp_path_factory.mktemp("log") / "predictions.db"
    env = {
        "DEFECTSCOPE_BATCH_MAX_WAIT_MS": "2",
        "DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{log}",
    }
    args = ["--models", str(root), "--default-model", "alpha"]
    with (
        served(args, env) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client,
    ):
        alpha = client.get("/v1/models/alpha/thresholds").json()["threshold"]
        saved = client.put("/v1/models/beta/thresholds", json={"image": alpha * 3, "reviewer": "t"})
        assert saved.status_code == 200, saved.text
        yield server.url


def env_for(monkeypatch: pytest.MonkeyPatch, url: str, key: str) -> None:
    monkeypatch.setenv("DEFECTSCOPE_API_URL", url)
    monkeypatch.setenv("DEFECTSCOPE_API_KEY", key)
    monkeypatch.setenv("DEFECTSCOPE_UI_TIMEOUT", "60")
    monkeypatch.delenv("DEFECTSCOPE_UI_SAMPLES", raising=False)


def texts(at: AppTest) -> str:
    parts = [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.success]
    return "\n".join(str(p.value) for p in parts)


def pickers(at: AppTest) -> list:
    return [box for box in at.selectbox if box.label == "Model"]


def page(name: str, chosen: str | None = None) -> AppTest:
    """A page as the app runs it after the sidebar's picker chose ``chosen``."""
    at = AppTest.from_file(str(UI / "views" / f"{name}.py"), default_timeout=RUN_TIMEOUT)
    if chosen is not None:
        at.session_state[MODEL] = chosen
        at.session_state[DEFAULT_MODEL] = "alpha"
    return at


def test_the_picker_lists_the_models_with_the_default_chosen(two_models, monkeypatch) -> None:
    env_for(monkeypatch, two_models, KEY)
    at = AppTest.from_file(str(UI / "app.py"), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception
    [picker] = pickers(at)
    assert picker.options == ["alpha (default)", "beta"]
    assert picker.value == "alpha"
    assert at.session_state[MODEL] == "alpha"
    picker.set_value("beta").run()
    assert not at.exception
    assert at.session_state[MODEL] == "beta"


def test_inspect_and_history_use_the_chosen_model(two_models, monkeypatch) -> None:
    env_for(monkeypatch, two_models, KEY)
    with httpx.Client(base_url=two_models, headers=AUTH, timeout=60) as client:
        beta = client.get("/v1/models/beta/thresholds").json()
        before = client.get("/v1/predictions", params={"model_name": "beta"}).json()["total"]

    at = page("inspect_images", "beta").run()
    assert not at.exception
    crops = texture_crops(2, seed=41)
    at.file_uploader[0].set_value(
        [(f"crop_{i}.png", png(crop), "image/png") for i, crop in enumerate(crops)]
    ).run()
    score = next(b for b in at.button if b.label.startswith("Score 2 image(s)"))
    assert "with model beta" in score.label
    score.click().run()
    assert not at.exception, at.exception
    shown = texts(at)
    version = beta["served_version"] or "unversioned"
    assert f"scored by model beta, version {version}." in shown
    assert fmt_score(beta["threshold"]) in [m.value for m in at.metric]
    save = next(b for b in at.button if b.label.startswith("Review and save"))
    assert save.disabled  # the Model page saves the default model's threshold only

    with httpx.Client(base_url=two_models, headers=AUTH, timeout=60) as client:
        logged = client.get("/v1/predictions", params={"model_name": "beta"}).json()
        every = client.get("/v1/predictions").json()["total"]
    assert logged["total"] == before + 2
    assert {item["model_name"] for item in logged["items"]} == {"beta"}

    history = page("history", "beta").run()
    assert not history.exception
    assert "Predictions of model **beta** only." in texts(history)
    assert history.metric[0].value == str(logged["total"])
    # The default model's history is the whole log, as with one model.
    whole = page("history", "alpha").run()
    assert not whole.exception
    assert "only." not in texts(whole)
    assert whole.metric[0].value == str(every)


def test_default_model_pages_say_so_when_another_is_chosen(two_models, monkeypatch) -> None:
    env_for(monkeypatch, two_models, KEY)
    for name in ("model", "drift", "review"):
        other = page(name, "beta").run()
        assert not other.exception
        assert "applies to the default model, **alpha**" in texts(other), name
        default = page(name, "alpha").run()
        assert not default.exception
        assert "applies to the default model" not in texts(default)


def test_one_model_shows_no_picker(texture_model_dir, tmp_path, monkeypatch) -> None:
    settings = ServingSettings(
        model_path=texture_model_dir, prediction_log_url="none", api_key="ui-key"
    )
    with running_server(settings, Detector.load(texture_model_dir)) as (url, _):
        env_for(monkeypatch, url, "ui-key")
        at = AppTest.from_file(str(UI / "app.py"), default_timeout=RUN_TIMEOUT).run()
        assert not at.exception
        assert not pickers(at)
        assert MODEL not in at.session_state
