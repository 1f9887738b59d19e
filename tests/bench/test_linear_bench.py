"""``attnlab bench linear`` runs every path on every precision and reports consistent figures."""

import json
import shutil

import pytest
import torch

from attnlab.bench import linear as bench
from attnlab.layers import cpu_kernels
from attnlab.layers import cpu_kernels as K
from attnlab.layers.quant import quantize_int8


def test_quick_run_reports_every_path(tmp_path, capsys):
    out = tmp_path / "linear.json"
    against = ["--against", "HEAD"] if cpu_kernels.available() and shutil.which("git") else []
    assert bench.main(["--rows", "1", "3", "--layers", "1", "--repeats", "1", "--json", str(out), *against]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert "| precision | rows | path |" in capsys.readouterr().out
    want = {"pytorch"} | ({"kernel"} if cpu_kernels.available() else set()) | {f"kernel@{r}" for r in against[1:]}
    per_weight = {"fp32": 4, "bf16": 2, "int8": 1, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                  "q4_k": (144 / 256 * 1536 * 576 + 20 / 32 * (960 + 576 + 3072) * 576) / (576 * 6144)}
    for precision in bench.PRECISIONS:
        for n in (1, 3):
            got = {r["path"]: r for r in rows if r["precision"] == precision and r["rows"] == n}
            assert want - {f"kernel@{r}" for r in against[1:]} <= set(got)
            if precision in bench.BLOCK_FORMATS:
                assert "fallback" in got
            assert got["pytorch"]["vs_pytorch"] == 1.0
            for r in got.values():  # GB/s is bytes over time: consistent with ms and the weight size
                assert abs(r["bytes_per_weight"] - per_weight[precision]) < 1e-9
                nbytes = sum(f * c for f, c in bench.SMOLLM2_SHAPES) * per_weight[precision]
                assert abs(r["GBps"] - nbytes / (r["ms"] / 1e3) / 1e9) < 1e-6 * r["GBps"]


needs_kernel = pytest.mark.skipif(not K.available(), reason=f"kernel unavailable: {K.unavailable_reason()}")


needs_git = pytest.mark.skipif(shutil.which("git") is None or not (K.SOURCE.parents[4] / ".git").exists(),
                               reason="--against reads the kernel from a git checkout")


@needs_kernel
@needs_git
def test_a_past_revision_loads_beside_the_current_kernel():
    """``load_revision`` builds the kernel of a git revision under its own op name; at HEAD it computes
    exactly what the working tree's does (every kernel change so far kept the results bit for bit)."""
    old = bench.load_revision("HEAD")
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, "int8"):
        w, s = torch.randn(100, 77, generator=g), None
        w, s = quantize_int8(w) if dtype == "int8" else (w.to(dtype), None)
        x = torch.randn(5, 77, generator=g)
        assert torch.equal(old(x, w, s, None), K.rows_matmul(x, w, s))
    with pytest.raises(ValueError, match="cannot read the kernel at revision 'no-such-rev'"):
        bench.load_revision("no-such-rev")
