"""Screenshots for the README, taken in headless Chromium from the executed notebooks.

    .venv/bin/python scripts/render_screenshots.py       (needs Chromium: apt-get install chromium)

For each (notebook, cell tag) in SHOTS: nbconvert exports the executed notebook to HTML with its lab
template (which marks each cell with its tags as ``celltag_<tag>`` classes), a style added to the
page hides every cell but the tagged one, headless Chromium loads the page with every network name
refused (nothing is fetched) and writes a screenshot, and Pillow trims the blank margin. The PNGs
go to docs/. Run scripts/run_notebooks.py first when a notebook changed: this script renders the
outputs saved in the notebooks, it executes nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from PIL import Image, ImageChops

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SHOTS = {  # PNG name -> (notebook, tag of the cell to show)
    "compare_grid.png": ("01_quickstart.ipynb", "screenshot-compare"),
    "sweep_plot.png": ("02_mixing.ipynb", "screenshot-sweep"),
}
WIDTH, SCALE, MARGIN = 1000, 2, 12  # CSS pixels, device pixels per CSS pixel, CSS pixels kept around
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND",
    f"--force-device-scale-factor={SCALE}", "--virtual-time-budget=5000",
]


def page_with_one_cell(notebook: Path, tag: str) -> str:
    nb = nbformat.read(notebook, as_version=4)
    if not any(tag in cell.metadata.get("tags", []) for cell in nb.cells):
        raise SystemExit(f"{notebook.name} has no cell tagged {tag!r}")
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    only = (f"<style>.jp-Cell:not(.celltag_{tag}) {{ display: none !important; }}"
            "body { margin: 0 !important; padding: 8px !important; }</style>")
    return body.replace("</head>", only + "</head>", 1)


def screenshot(html: str, out: Path, browser: str, height: int = 1400) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html)
        shot = Path(tmp) / "shot.png"
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={WIDTH},{height}",
                        f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
        image = Image.open(shot).convert("RGB")
    blank = Image.new("RGB", image.size, image.getpixel((0, 0)))
    box = ImageChops.difference(image, blank).getbbox()
    if box is None:
        raise SystemExit(f"{out.name}: the page rendered blank")
    if box[3] >= image.height - 1:  # the cell runs past the window: take a taller one
        return screenshot(html, out, browser, height * 2)
    pad = MARGIN * SCALE
    image.crop((max(box[0] - pad, 0), max(box[1] - pad, 0), min(box[2] + pad, image.width),
                min(box[3] + pad, image.height))).save(out, optimize=True)


def main() -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("Chromium not found; on Debian: apt-get install chromium")
    DOCS.mkdir(exist_ok=True)
    for name, (notebook, tag) in SHOTS.items():
        screenshot(page_with_one_cell(ROOT / "notebooks" / notebook, tag), DOCS / name, browser)
        print(f"docs/{name} from notebooks/{notebook} [{tag}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
