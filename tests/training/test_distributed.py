"""``torchrun --nproc-per-node 2`` on CPU (gloo): identical weights on both ranks, merged validation equal to
a single-process evaluation of the saved model, one set of files written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from conftest import make_tiny_set  # noqa: E402
from test_train import HP  # noqa: E402

from detforge.training import checkpoint, engine  # noqa: E402
from detforge.training.dataset import ManifestDataset, collate, load_split  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_on_cpu(tmp_path):
    torch.set_num_threads(1)
    train_manifest = make_tiny_set(tmp_path / "train", 8, 1)
    val_manifest = make_tiny_set(tmp_path / "val", 5, 2)  # odd: shards of 3 and 2 images
    out, report = tmp_path / "run", tmp_path / "ranks"
    report.mkdir()
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(f"""
        import hashlib, os
        import torch
        torch.set_num_threads(1)
        from detforge.training.train import TrainConfig, train
        result = train(TrainConfig(train={str(train_manifest)!r}, validation={str(val_manifest)!r},
                                   out={str(out)!r}, progress=False,
                                   hyperparameters={HP!r} | {{"epochs": "2"}}))
        digest = hashlib.sha256()
        for name, tensor in sorted(result.model.state_dict().items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        rank = os.environ["RANK"]
        line = digest.hexdigest() + " " + str(result.last["validation:mAP"])
        open(os.path.join({str(report)!r}, rank), "w").write(line)
    """)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard: two processes on a loaded 2-core machine took over 300 s
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = {name: (report / name).read_text().split() for name in os.listdir(report)}
    assert sorted(ranks) == ["0", "1"]
    assert ranks["0"] == ranks["1"]  # same weights and buffers, same merged mAP on both ranks
    assert sorted(p.name for p in out.iterdir()) == [
        "best.json",
        "best.safetensors",
        "checkpoints",
        "classes.json",
        "hyperparams.json",
        "inputs.json",
        "metrics.csv",
        "metrics.jsonl",
        "metrics.png",
        "model.json",
        "model.safetensors",
        "train.log",
    ]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["validation_images"] == 5 for r in rows)
    log = (out / "train.log").read_text()
    assert "on cpu x2" in log and log.count("epoch 2: validation:mAP=") == 1

    model, info = checkpoint.load_run_model(out)
    samples, names = load_split(val_manifest)
    loader = torch.utils.data.DataLoader(
        ManifestDataset(samples, image_size=64), batch_size=2, collate_fn=collate
    )
    single = engine.validate(model, loader, device=torch.device("cpu"), class_names=names, iou_threshold=0.5)
    assert single["validation:mAP"] == rows[-1]["validation:mAP"]
    assert single["all_point_map"] == rows[-1]["all_point_map"]
    # pycocotools breaks score ties by image order, which sharding changes: equal up to that
    assert single["coco_AP"] == pytest.approx(rows[-1]["coco_AP"], rel=1e-2)
    assert float(ranks["0"][1]) == rows[-1]["validation:mAP"]


def test_mini_batch_size_is_per_machine_as_in_sagemaker():
    """SageMaker: each of a machine's GPUs takes mini_batch_size / GPUs; with N machines a step sees
    mini_batch_size x N images. torchrun's LOCAL_WORLD_SIZE is the processes of one machine."""
    from detforge.errors import ConfigError
    from detforge.training.distributed import Dist
    from detforge.training.train import batch_per_process

    one_machine = Dist(rank=0, world_size=4, local_rank=0, local_world_size=4)
    two_machines = Dist(rank=5, world_size=8, local_rank=1, local_world_size=4)
    assert batch_per_process(32, Dist()) == 32
    assert batch_per_process(32, one_machine) == 8 and one_machine.machines == 1
    assert batch_per_process(32, two_machines) == 8 and two_machines.machines == 2  # 64 per step
    with pytest.raises(ConfigError, match="does not split evenly over the 4 processes of a machine"):
        batch_per_process(30, two_machines)
    with pytest.raises(ConfigError, match="BatchNorm needs at least 2") as info:
        batch_per_process(4, two_machines)
    assert info.value.hint == "use mini_batch_size >= 8"
