"""``attnlab bench linear`` runs every path on every precision and reports consistent figures."""

import json
import shutil

from attnlab.bench import linear as bench
from attnlab.layers import cpu_kernels


def test_quick_run_reports_every_path(tmp_path, capsys):
    out = tmp_path / "linear.json"
    against = ["--against", "HEAD"] if cpu_kernels.available() and shutil.which("git") else []
    assert bench.main(["--rows", "1", "3", "--layers", "1", "--repeats", "1", "--json", str(out), *against]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert "| precision | rows | path |" in capsys.readouterr().out
    want = {"pytorch"} | ({"kernel"} if cpu_kernels.available() else set()) | {f"kernel@{r}" for r in against[1:]}
    for precision in ("fp32", "bf16", "int8"):
        for n in (1, 3):
            got = {r["path"]: r for r in rows if r["precision"] == precision and r["rows"] == n}
            assert want <= set(got)
            assert got["pytorch"]["vs_pytorch"] == 1.0
            for r in got.values():  # GB/s is bytes over time: consistent with ms and the weight size
                nbytes = sum(f * c for f, c in bench.SMOLLM2_SHAPES) * {"fp32": 4, "bf16": 2, "int8": 1}[precision]
                assert abs(r["GBps"] - nbytes / (r["ms"] / 1e3) / 1e9) < 1e-6 * r["GBps"]
