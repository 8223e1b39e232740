"""scripts/profile_step.py's accounting, on made-up kernel lists (the script itself needs a GPU)."""
from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import profile_step  # noqa: E402


def test_beyond_the_top_sums_what_the_list_leaves_out_by_part():
    kernels = [  # (ms a step, part, name, launches a step), costliest first, as kernel_breakdown returns them
        (50.0, "attention", "flash_bwd", 17),
        (20.0, "matmul", "nvjet_a", 34),
        (3.0, "norms/elementwise", "triton_poi_fused_add_1", 102),
        (2.5, "matmul", "nvjet_b", 17),
        (1.5, "norms/elementwise", "triton_per_fused_rms_2", 51),
    ]
    lines = profile_step.beyond_the_top(kernels, 2, kernel_ms=77.0)
    assert lines == [
        "  the other 3 kernels: 7.0 ms (9.1%), 170 launches a step, the costliest 3.00 ms",
        "    norms/elementwise:     4.5 ms in 2 kernels, 153 launches",
        "               matmul:     2.5 ms in 1 kernels, 17 launches",
    ]
    assert profile_step.beyond_the_top(kernels, 0, 77.0) == [] and profile_step.beyond_the_top(kernels, 5, 77.0) == []
