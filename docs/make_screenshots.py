"""Screenshots of the web UI for the docs (docs/images/ui-*.png), from real processes.

    python docs/make_screenshots.py MODEL DATA     # e.g. /tmp/bottle_model ../shared/.../bottle

Starts `defectscope serve MODEL` and `defectscope ui`, scores some of DATA's test images through
the API (so History and Drift have something to show), then drives Debian's chromium through
Playwright over the five pages. Uses the end-to-end test's helpers (tests/_browser.py).
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from _browser import api_and_ui, chromium_page, upload_and_score

from defectscope.client import DefectscopeClient

OUT = Path(__file__).parent / "images"


def save(page, name: str) -> None:
    """Viewport screenshot, reduced to a 256-colour palette (UI colours survive; ~5x smaller)."""
    time.sleep(1.5)  # let charts finish their transitions
    shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    small = shot.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path = OUT / f"ui-{name}.png"
    small.save(path, optimize=True)
    print(f"{path}: {path.stat().st_size / 1000:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path, help="an MVTec AD category (uses its test/ split)")
    args = parser.parse_args()
    test = args.data / "test"
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        uploads = []
        for kind, index in (("good", 0), ("good", 1), ("broken_large", 0), ("contamination", 3)):
            uploads.append(work / f"{kind}_{index:03d}.png")
            shutil.copy(test / kind / f"{index:03d}.png", uploads[-1])
        with (
            api_and_ui(args.model, work, ("--samples", str(test))) as (api, ui),
            chromium_page(1400, 1500) as page,
        ):
            with DefectscopeClient(api) as client:
                good = sorted((test / "good").glob("*.png"))[2:20]
                bad = sorted((test / "broken_small").glob("*.png"))[:6]
                for chunk in (good[:9], good[9:], bad):
                    client.predict_batch(chunk)

            upload_and_score(page, ui, uploads)
            page.get_by_text("heatmap overlay").first.wait_for()
            # Raise the threshold step by step until the first decision changes (on bottle: a
            # good image flagged at the stored threshold passes).
            slider = page.get_by_role("slider").first
            changed = page.get_by_text(re.compile(r"change decision against"))
            for _ in range(100):
                for _ in range(3):
                    slider.press("ArrowRight")
                time.sleep(0.7)
                if changed.count():
                    break
            save(page, "inspect")

            for title, wait_for in (
                ("Review", "left of"),
                ("History", "Score over time"),
                ("Drift", "Feature test (MMD)"),
                ("Model", "Threshold changes"),
            ):
                page.get_by_role("link", name=title).click()
                page.get_by_text(wait_for).first.wait_for()
                save(page, title.lower())


if __name__ == "__main__":
    main()
