"""Keyboard shortcuts for the Review page.

Streamlit has no key bindings, so a zero-height component injects one small script into the
page itself (the component's iframe is same-origin with the app, so ``window.parent.document``
is reachable). The script lives in the parent document, not in the iframe, so it keeps working
when Streamlit re-renders the component; on a key it clicks the button whose stable widget key
Streamlit exposes as the CSS class ``st-key-<key>``. Keys typed into a text field are left
alone, and so are arrows on a focused slider.
"""

from __future__ import annotations

import json

import streamlit.components.v1 as components

# Key (KeyboardEvent.key, lower-cased) -> widget key of the button it presses.
SHORTCUTS: dict[str, str] = {
    "arrowright": "review-next",
    "j": "review-next",
    "arrowleft": "review-prev",
    "k": "review-prev",
    "a": "review-correct",
    "f": "review-false_alarm",
    "m": "review-missed_defect",
}
HELP = (
    "Keys: → or J next · ← or K previous · A correct (accept the decision) · F false alarm · "
    "M missed defect. Typing in the note does not trigger them."
)

_SCRIPT = """
(function () {
  const doc = window.parent.document;
  const map = %s;
  doc.__defectscopeReviewKeys = map;
  if (doc.getElementById("defectscope-review-keys")) return;
  const script = doc.createElement("script");
  script.id = "defectscope-review-keys";
  script.textContent = `
    document.addEventListener("keydown", function (event) {
      if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
      const target = event.target;
      if (target && (target.isContentEditable ||
          ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName) ||
          target.getAttribute("role") === "slider")) return;
      const key = (document.__defectscopeReviewKeys || {})[event.key.toLowerCase()];
      if (!key) return;
      const button = document.querySelector(".st-key-" + key + " button");
      if (!button || button.disabled) return;
      event.preventDefault();
      button.click();
    });`;
  doc.head.appendChild(script);
})();
"""


def script() -> str:
    return "<script>" + _SCRIPT % json.dumps(SHORTCUTS) + "</script>"


def install() -> None:
    """Put the shortcuts on the page (idempotent: one listener however often it reruns)."""
    components.html(script(), height=0)
