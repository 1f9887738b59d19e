"""The tour's HTML report in a real browser: headless Chromium loads it and decodes every image.

Needs Debian's chromium (`apt-get install chromium`); skipped where it is absent. Manual equivalent:
    chromium --headless --no-sandbox --disable-gpu --screenshot=shot.png --window-size=1200,3000 \\
        file://$PWD/tour-out/report.html
"""

import re
import shutil
import subprocess

import pytest

from attnlab.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=5000"]

# appended to a copy of the report: after load, mark each image with whether it decoded
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-decoded', imgs.filter(i => i.complete && i.naturalWidth > 0).length);
});
window.addEventListener('error', e => document.body.setAttribute('data-error', String(e.message)));
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_report_opens_in_chromium_with_its_images(tmp_path):
    out = tmp_path / "tour"
    assert main(["tour", "--tiny", "--out", str(out), "--only", "gqa", "flash"]) == 0
    page = (out / "report.html").read_text()
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    run = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", run.stdout)
    assert body, run.stdout[:500]
    attrs = dict(re.findall(r'(data-[a-z]+)="([^"]*)"', body.group(1)))
    assert "data-error" not in attrs, attrs
    assert int(attrs["data-images"]) == 2
    assert attrs["data-decoded"] == attrs["data-images"]
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1200,2000", (out / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
