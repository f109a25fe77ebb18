"""The index benchmark runs end to end on a small made tree: a second start reads the run folder's
copy of the index (torchvision's way lists again), and the workers' memory is reported for both.
(No speed or memory figure is asserted: they belong in the benchmark's output.)"""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_index_benchmark_on_a_made_tree(tmp_path):
    out, tree = tmp_path / "index.json", tmp_path / "tree"
    run = subprocess.run([sys.executable, "-m", "densenet.bench", "index", "--make-tree", "6", "--classes", "5",
                          "--val-images", "10", "--root", str(tree), "--processes", "2", "--workers", "1", "--batch", "4",
                          "--epoch-batch", "4", "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert len(list((tree / "train").iterdir())) == 5 and len(list((tree / "val").iterdir())) == 10
    rows = json.loads(out.read_text())["rows"]
    first_batch = {(r["side"], r["start"]): r for r in rows if r["measure"] == "first batch"}
    assert set(first_batch) == {("ours", "first"), ("ours", "second"), ("torchvision", "first"),
                                ("torchvision", "second")}
    assert [first_batch["ours", s]["cached"] for s in ("first", "second")] == [False, True]
    assert not first_batch["torchvision", "second"]["cached"]
    assert all(r["train_images"] == 30 and r["first_batch_s"] > 0 for r in first_batch.values())
    memory = {r["side"]: r for r in rows if r["measure"] == "worker memory"}
    assert set(memory) == {"ours", "torchvision"}
    assert all(len(m["first_mib"]) == len(m["last_mib"]) == 1 and m["last_mib"][0] > 0 for m in memory.values())
    assert memory["ours"]["batches"] == 7 and memory["torchvision"]["batches"] == 8  # 30 // 4 full; 30 / 4 with the last
