"""`tools/finetune.py` end to end on generated ImageFolder data, and the built-in set's objects as an ImageFolder."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from pretrain.data.synthetic import SHAPE_CATEGORIES
from workflows import cli
from workflows.object_folder import object_folder

TOOL = Path(__file__).parents[2] / "tools" / "finetune.py"


def _recipe(tmp_path: Path, data: Path) -> Path:
    """The CPU recipe with a 2-block ViT at 32 px for 2 epochs."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(Path(__file__).parents[2] / "configs" / "finetune" / "vit_tiny_cpu.yaml"),
        "model_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}, "input_size": 32,
        "batch_size": 8, "epochs": 2, "warmup_epochs": 0, "data_path": str(data)}))
    return recipe


def test_finetune_then_eval_prints_accuracy_beside_chance(tmp_path, colour_folder, tiny_checkpoint, capsys):
    ckpt = tiny_checkpoint(tmp_path / "mae.pth")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(TOOL), "--config", str(_recipe(tmp_path, colour_folder)), "--finetune",
                           str(ckpt), "--output_dir", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "chance: 1/4 classes 0.250" in done.stderr
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(0 <= r["test_acc1"] <= 100 for r in log)
    assert cli.finetune(["--eval", "--resume", str(out / "checkpoint-best.pth"), "--data_path", str(colour_folder),
                         "--model", "vit_tiny_patch16", "--config", str(_recipe(tmp_path, colour_folder))]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    best = max(r["test_acc1"] for r in log)
    assert line.startswith(f"* Acc@1 {best:.3f} Acc@5 100.000")
    assert "on 32 images (chance: 1/4 classes 0.250, majority class 'blue' 0.250)" in line


def test_data_without_val_and_a_bad_layer_decay_are_one_line_errors(tmp_path, colour_folder, one_error_line):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "train").symlink_to(colour_folder / "train")
    assert cli.finetune(["--config", str(_recipe(tmp_path, tmp_path / "only"))]) == 2
    one_error_line("has no val/ folder", "ImageNet layout")
    assert cli.finetune(["--config", str(_recipe(tmp_path, colour_folder)), "--layer_decay", "1.2"]) == 2
    one_error_line("--layer_decay must be in (0, 1]")


def test_object_folder_holds_every_object_once_under_its_class(probe_shapes, tmp_path):
    split = lambda name: (str(probe_shapes / "annotations" / f"{name}.json"), str(probe_shapes))  # noqa: E731
    root = object_folder(split("train"), split("val"), tmp_path / "objects")
    for name in ("train", "val"):
        coco = json.loads((probe_shapes / "annotations" / f"{name}.json").read_text())
        by_class = {c["name"]: sum(a["category_id"] == c["id"] for a in coco["annotations"])
                    for c in coco["categories"]}
        assert sorted(p.name for p in (root / name).iterdir()) == sorted(SHAPE_CATEGORIES)
        assert {c: len(list((root / name / c).glob("*.png"))) for c in by_class} == by_class
    stamp = (root / "DONE").stat().st_mtime_ns
    assert object_folder(split("train"), split("val"), tmp_path / "objects") == root
    assert (root / "DONE").stat().st_mtime_ns == stamp  # reused, not rewritten
