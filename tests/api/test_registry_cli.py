"""`defectscope registry ...`, `fit --register` and registry references in place of a model
path, as a user runs them; mistakes (unknown name, version or stage) are one line, exit 2."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
from _cli import FAST_OVERRIDES
from _cli import run_cli as _run_cli
from _images import png, texture_crops

run_cli = partial(_run_cli, columns=300, unset=("DEFECTSCOPE_DEBUG",))
FAST = FAST_OVERRIDES


def one_line_error(proc, *words: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_register_promote_rollback_and_use_a_reference(
    tmp_path: Path, texture_model_dir: Path
) -> None:
    registry = str(tmp_path / "registry")
    env = {"DEFECTSCOPE_REGISTRY": registry}
    report = tmp_path / "metrics.json"
    report.write_text(json.dumps({"metrics": {"image_auroc": 0.9}}))
    first = run_cli("registry", "register", "texture", str(texture_model_dir), env=env)
    assert first.returncode == 0 and "Registered texture@1" in first.stdout, first.stderr
    run_cli(
        "registry", "register", "texture", str(texture_model_dir), "--parent", "texture@1",
        "--report", str(report), "--stage", "staging", "--registry", registry, check=True,
    )  # fmt: skip
    run_cli("registry", "promote", "texture", "1", "--stage", "production", env=env, check=True)
    run_cli("registry", "promote", "texture", "2", env=env, check=True)  # default: production
    listing = run_cli("registry", "list", "texture", env=env, check=True).stdout
    assert "production, staging" in listing
    assert "production@2, staging@2" in run_cli("registry", "list", env=env, check=True).stdout

    shown = json.loads(run_cli("registry", "show", "texture@production", env=env).stdout)
    assert shown["version"] == 2 and shown["lineage"]["parent"] == "texture@1"
    assert shown["report"] == {"metrics": {"image_auroc": 0.9}}
    assert [e["version"] for e in shown["stage_history"]] == [2, 1, 2]

    back = run_cli("registry", "rollback", "texture", "--stage", "production", env=env)
    assert back.returncode == 0 and "version 1" in back.stdout, back.stderr
    inspected = json.loads(run_cli("inspect", "texture@production", env=env, check=True).stdout)
    assert inspected["training"]["fingerprint"] == shown["lineage"]["training_fingerprint"]

    image = tmp_path / "a.png"
    image.write_bytes(png(texture_crops(1, seed=8)[0]))
    out = tmp_path / "pred"
    predicted = run_cli("predict", "texture@1", str(image), "--out", str(out), env=env)
    assert predicted.returncode == 0, predicted.stderr
    assert (out / "results.jsonl").is_file()

    # Mistakes: one line each, exit status 2.
    one_line_error(run_cli("registry", "show", "texture@9", env=env), "texture@9")
    one_line_error(run_cli("registry", "show", "nothing", env=env), "no model named")
    one_line_error(run_cli("registry", "promote", "texture", "7", env=env), "texture@7")
    one_line_error(run_cli("registry", "promote", "texture", "1", "--stage", "Bad Stage",
                           env=env), "bad stage")  # fmt: skip
    one_line_error(run_cli("registry", "rollback", "texture", "--stage", "staging", env=env),
                   "no earlier version")  # fmt: skip
    one_line_error(run_cli("registry", "register", "bad name", str(texture_model_dir), env=env),
                   "bad model name")  # fmt: skip
    one_line_error(run_cli("registry", "register", "x", str(tmp_path / "none"), env=env),
                   "not found")  # fmt: skip
    one_line_error(run_cli("predict", "texture@canary", str(image), env=env), "canary")
    (tmp_path / "registry" / "texture" / "stages.json").write_text("{broken")
    one_line_error(run_cli("registry", "list", "texture", env=env), "corrupt stage file")


@pytest.mark.parametrize("backend", ["mlflow"])
def test_registry_commands_on_mlflow(tmp_path: Path, texture_model_dir: Path, backend) -> None:
    pytest.importorskip("mlflow")
    uri = f"mlflow:sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"DEFECTSCOPE_CACHE_DIR": str(tmp_path / "cache")}
    for args in (
        ("register", "texture", str(texture_model_dir)),
        ("register", "texture", str(texture_model_dir), "--stage", "production"),
        ("rollback", "texture"),
    ):
        proc = run_cli("registry", *args, "--registry", uri, cwd=tmp_path, env=env)
        if args[0] == "rollback":
            one_line_error(proc, "no earlier version")
        else:
            assert proc.returncode == 0, proc.stderr
    shown = run_cli("registry", "show", "texture@production", "--registry", uri, cwd=tmp_path,
                    env=env, check=True)  # fmt: skip
    record = json.loads(shown.stdout)
    assert record["version"] == 2 and Path(record["model_file"]).is_file()


def test_fit_register(tmp_path: Path) -> None:
    data = tmp_path / "good"
    data.mkdir()
    for i, image in enumerate(texture_crops(6, seed=9)):
        (data / f"{i}.png").write_bytes(png(image))
    registry = tmp_path / "registry"
    one_line_error(
        run_cli("fit", str(data), "--out", str(tmp_path / "m0"), "--register", "bad/name",
                "--registry", str(registry), *FAST),
        "bad model name",
    )  # fmt: skip
    assert not (tmp_path / "m0").exists()  # refused before the fit
    proc = run_cli("fit", str(data), "--out", str(tmp_path / "m"), "--register", "tiles",
                   "--registry", str(registry), "--no-auto", *FAST)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Registered tiles@1" in " ".join(proc.stdout.split())
    version = json.loads((registry / "tiles" / "versions" / "1" / "version.json").read_text())
    assert version["lineage"]["data"] == str(data)
    assert len(version["lineage"]["training_fingerprint"]) > 8
