"""Preemption under real torchrun (gloo, 2 CPU ranks): a signal to one rank stops both after the same step, one step
after it landed when the agreement overlaps the steps, at once at an epoch's end."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # a torchrun start

SCRIPT = """
import json, os, signal, sys, torch.distributed as dist
from model.train.cluster import Preemption

dist.init_process_group("gloo")
rank = dist.get_rank()
p = Preemption(dist.get_world_size())
stopped = []
for step in range(1, 7):  # after each step, overlapped
    if rank == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)  # lands during step 3
    stopped.append(p.agreed(overlapped=True) is not None)
p.signal = None  # a continued run: the next steps carry no signal, until one lands just before an epoch's end
after = [p.agreed(overlapped=True) is not None for _ in range(2)]
if rank == 1:
    os.kill(os.getpid(), signal.SIGTERM)
epoch_end = p.agreed()  # what was in flight, then agreed at once
p.close()
# A file per rank: two ranks printing at once can interleave their lines on torchrun's stdout.
result = {"rank": rank, "stopped": stopped, "after": after, "epoch_end": epoch_end and epoch_end.name}
open(os.path.join(sys.argv[1], f"rank-{rank}.json"), "w").write(json.dumps(result))
dist.destroy_process_group()
"""


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2))}
    # Rank 1's flag goes out with step 3's agreement, which every rank reads after step 4.
    assert ranks[0]["stopped"] == ranks[1]["stopped"] == [False, False, False, True, True, True]
    # The last step's agreement read a step late, then a clear one; a signal just before an epoch's end is agreed
    # there, not a step later.
    assert ranks[0]["after"] == ranks[1]["after"] == [True, False]
    assert ranks[0]["epoch_end"] == ranks[1]["epoch_end"] == "SIGTERM"
