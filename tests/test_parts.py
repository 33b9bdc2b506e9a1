"""The per-part time and memory record of a round (mas3_edge.parts)."""
import json
import subprocess
import sys

import pytest



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-part peaks need /proc/self/clear_refs")
def test_each_part_reports_its_own_peak_not_the_one_before():
    # in a fresh process: the suite's own heap (earlier tests' frees and mallopt) must not decide it
    out = subprocess.run([sys.executable, "-c", _PEAKS], capture_output=True, text=True, check=True).stdout
    peak_is_per_part, big, small = json.loads(out)
    assert peak_is_per_part
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 150  # the first part's peak is not carried over
    assert small["seconds"] >= 0.01 and big["rss_after_mb"] < big["peak_rss_mb"] - 150


_PEAKS = """
import json, time, numpy as np
from mas3_edge.parts import Parts
parts = Parts()
with parts("big"):
    block = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    del block
with parts("small"):
    time.sleep(0.01)
print(json.dumps([parts.peak_is_per_part, parts.rows["big"], parts.rows["small"]]))
"""


_HEAP = """
import sys, numpy as np
from mas3_edge.parts import _status_mb, tame_heap
if sys.argv[1] == "tame":
    assert tame_heap()
np.ones(2 * 2**20)  # one 16 MB block freed: glibc raises its mmap threshold past the blocks below
before, keep = _status_mb("VmRSS"), []
blocks = []
for _ in range(100):  # 200 MB in 2 MB blocks (the size of an activation), each followed by a small block that stays
    blocks.append(np.ones(2**18))
    keep.append(np.ones(1000))
del blocks
print(_status_mb("VmRSS") - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_tamed_heap_returns_freed_blocks_at_once():
    grown = {how: float(subprocess.run([sys.executable, "-c", _HEAP, how], capture_output=True, text=True,
                                       check=True).stdout) for how in ("plain", "tame")}
    assert grown["plain"] > 150  # what a round's parts left resident for the next one
    assert grown["tame"] < 30
