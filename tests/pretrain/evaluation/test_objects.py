"""Object crops (`pretrain.evaluation.objects`): every ground-truth box of a COCO-format set, with its category."""
import json

from pretrain.evaluation.objects import ObjectCrops


def test_object_crops_are_every_box_with_its_category(probe_shapes):
    coco = json.loads((probe_shapes / "annotations" / "val.json").read_text())
    crops = ObjectCrops(probe_shapes / "annotations" / "val.json", probe_shapes, input_size=32)
    assert len(crops) == len(coco["annotations"]) and crops.classes == ["circle", "square", "triangle", "star"]
    img, label = crops[0]
    assert img.shape == (3, 32, 32) and label == coco["annotations"][0]["category_id"] - 1
    assert crops.labels.tolist() == [a["category_id"] - 1 for a in coco["annotations"]]
