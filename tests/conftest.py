"""Fixtures that tests in more than one package folder need: the session's dataset cache, a tiny pretraining config
and checkpoint, one-line error checks, hostile weights files, weights files written by other libraries, a small
shapes set, a labelled ImageFolder, objects of known class counts, and the smoke demo's output. Each folder's own
fixtures live in its conftest.py or test module."""
import os

# before torch is first imported (below, or by any test module): its CPU thread pool reads this once
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import pickle  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from timm.models import save_for_hf  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from detection.datasets import write_builtin_shapes  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from pretrain.training.config import DEFAULTS  # noqa: E402
from workflows.demo import pipeline  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def builtin_cache(tmp_path_factory):
    """Render the built-in shapes sets into one temporary cache for the session.

    Datasets register once per process and keep the cache root they saw then, so every test
    module must see the same root (and tests must not write into the user's ~/.cache).
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSMAE_VITDET_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


# ------------------------------------------------------------------------------------ tiny pretraining runs

TINY = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "decoder_embed_dim": 32,
        "decoder_num_heads": 2}


@pytest.fixture(scope="session")
def tiny_cfg():
    """`tiny_cfg(tmp_path, model=..., **overrides)`: a pretraining config of a 2-block, 32-wide ViT on 16 built-in
    32 px images, 2 epochs of 4 iterations on CPU, writing to tmp_path / "run"."""
    def make(tmp_path: Path, model: str = "crossmae_vit_tiny_patch16", **kw) -> dict:
        cfg = dict(DEFAULTS)
        cfg.update(model=model, model_kwargs=TINY, decoder_depth=2, input_size=32, batch_size=4, epochs=2,
                   warmup_epochs=1, blr=1e-2, builtin_size=16, num_workers=0, output_dir=str(tmp_path / "run"),
                   device="cpu", vis_every=1, save_every=1, seed=3)
        cfg.update(kw)
        return cfg
    return make


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """`tiny_checkpoint(path, name=...)`: a tiny pretraining checkpoint (decoder depth 1, 32 px, epoch 3) at path."""
    def save(path: Path, name: str = "mae_vit_tiny_patch16") -> Path:
        cfg = {**DEFAULTS, "model": name, "model_kwargs": TINY, "decoder_depth": 1, "input_size": 32}
        torch.manual_seed(0)
        torch.save({"model": create_model(cfg).state_dict(), "epoch": 3, "config": cfg}, path)
        return path
    return save


# ------------------------------------------------------------------------------------ errors a user sees

@pytest.fixture
def one_error_line(capsys):
    """`one_error_line(*needles)`: the one `error:` line on stderr (progress logs may precede it), with no traceback
    anywhere, holding every needle."""
    def check(*needles: str) -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
        assert len(lines) == 1 and "Traceback" not in err, err
        for needle in needles:
            assert needle in lines[0], lines[0]
        return lines[0]
    return check


class Payload:
    """Unpickling this runs a shell command that creates `marker`: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile_weights(tmp_path):
    """`hostile_weights(suffix)` -> (path, marker): a .pth (torch.save) or .pkl (pickle, as detectron2's zoo) file
    whose loading creates `marker` if anything unpickles it."""
    def write(suffix: str) -> tuple[Path, Path]:
        marker = tmp_path / "PWNED"
        path = tmp_path / f"evil{suffix}"
        if suffix == ".pkl":
            with open(path, "wb") as f:
                pickle.dump({"model": {"w": Payload(marker)}, "__author__": "x"}, f)
        else:
            torch.save({"model": {"blocks.0.w": Payload(marker)}, "epoch": 0}, path)
        return path, marker
    return write


# ------------------------------------------------------------------------------------ weights files of other libraries

D, HEADS, PATCH, IMG = 192, 3, 8, 32  # the ViT-Ti width, from which loaders tell the head count


def _jitter(model: nn.Module) -> nn.Module:
    """Move every tensor off its init (zero biases, unit norms) so that a swapped or dropped tensor shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def timm_files(tmp_path_factory):
    """(model, folder): a jittered 2-block ViT-Ti/8 at 32 px, saved as timm saves for the hub (safetensors and .bin)."""
    torch.manual_seed(0)
    model = _jitter(timm.create_model("vit_base_patch16_224.mae", pretrained=False, img_size=IMG, patch_size=PATCH,
                                      embed_dim=D, depth=2, num_heads=HEADS))
    folder = tmp_path_factory.mktemp("timm")
    save_for_hf(model, str(folder), safe_serialization="both")  # timm's hub layout: safetensors and .bin
    return model, folder


# transformers (and safetensors with it) is imported only where a transformers file is written: importing it takes
# about a second, which the tests that do not need it should not pay at collection


def _hf_config(**kw):
    from transformers import ViTMAEConfig

    # layer_norm_eps: MAE's 1e-6 (the facebook/vit-mae-* configs say 1e-12; the weights were trained with 1e-6)
    return ViTMAEConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=4 * D,
                        image_size=IMG, patch_size=PATCH, layer_norm_eps=1e-6, **kw)


def _hf_files(model, folder: Path) -> dict[str, Path]:
    """The model written as transformers does: save_pretrained (its original names, as 4.x and the hub files),
    save_pretrained with transformers 5's module names, and a pytorch_model.bin with the hub's names."""
    from safetensors.torch import load_file

    model.save_pretrained(folder / "original")
    model.save_pretrained(folder / "modules", save_original_format=False)
    hub = {k.replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): v
           for k, v in load_file(folder / "original" / "model.safetensors").items()}
    (folder / "hub").mkdir()
    torch.save(hub, folder / "hub" / "pytorch_model.bin")
    return {"original": folder / "original" / "model.safetensors",
            "modules": folder / "modules" / "model.safetensors", "hub": folder / "hub" / "pytorch_model.bin"}


@pytest.fixture(scope="module")
def hf_encoder(tmp_path_factory):
    """(model, files): a jittered transformers ViTMAEModel (mask ratio 0) in the three ways transformers writes it."""
    from transformers import ViTMAEModel

    torch.manual_seed(0)
    model = _jitter(ViTMAEModel(_hf_config(mask_ratio=0.0)))
    return model, _hf_files(model, tmp_path_factory.mktemp("hf_encoder"))


@pytest.fixture(scope="module")
def hf_pretraining(tmp_path_factory):
    """(model, files): a jittered transformers ViTMAEForPreTraining in the three ways transformers writes it."""
    from transformers import ViTMAEForPreTraining

    torch.manual_seed(0)
    cfg = _hf_config(mask_ratio=0.75, decoder_hidden_size=64, decoder_num_hidden_layers=2,
                     decoder_num_attention_heads=2, decoder_intermediate_size=256)
    model = _jitter(ViTMAEForPreTraining(cfg))
    return model, _hf_files(model, tmp_path_factory.mktemp("hf_pretraining"))


@pytest.fixture(scope="session")
def finetuned_crossmae():
    """`finetuned_crossmae(path)` -> vit: CrossMAE's *-finetune-*.pth written at path: MAE's models_vit (timm ViT,
    global pool: fc_norm instead of norm, a head), jittered, 32 px (a 4 x 4 grid), epoch 99."""
    def write(path: Path) -> nn.Module:
        torch.manual_seed(0)
        vit = _jitter(VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=2, num_heads=HEADS,
                                        num_classes=10, global_pool="avg", fc_norm=True,
                                        norm_layer=partial(nn.LayerNorm, eps=1e-6)))
        torch.save({"model": vit.state_dict(), "epoch": 99}, path)
        return vit
    return write


# ------------------------------------------------------------------------------------ data and the demo's output

@pytest.fixture(scope="module")
def probe_shapes(tmp_path_factory) -> Path:
    """A small built-in shapes set in COCO format (6 train, 3 val images of 64 px, seed 1) for the object probe."""
    folder = tmp_path_factory.mktemp("probe_shapes") / "set"
    write_builtin_shapes(folder, num_train=6, num_val=3, image_size=64, seed=1)
    return folder


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """An ImageFolder (`train/`, `val/`) of 4 classes told apart by colour (red, green, blue, yellow under strong
    noise), 16 train and 8 val images of 40 px per class: a tiny ViT learns it in a few epochs."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, count in (("train", 16), ("val", 8)):
        for name, colour in {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200),
                             "yellow": (200, 200, 40)}.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 50, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def counted_objects(tmp_path_factory) -> Path:
    """A COCO-format set of known class counts for the probe's chance levels: categories a, b, c, d (ids 1-4); train
    holds 3 a, 1 b, 1 c and val 2 a, 1 b, 2 d, each object a 16 px box on one 64 px noise image per split. Chance:
    1 / 4 classes = 0.25; always answering a (train's most frequent) scores 2 / 5 = 0.4 on val. Returns the folder
    holding train.json, val.json and the images."""
    folder = tmp_path_factory.mktemp("counted_objects")
    counts = {"train": [1, 1, 1, 2, 3], "val": [1, 1, 2, 4, 4]}  # category ids of the objects
    rng = np.random.default_rng(0)
    for split, ids in counts.items():
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{split}.png")
        anns = [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": [12 * i, 8 * (i % 3), 16, 16], "area": 256,
                 "iscrowd": 0, "segmentation": [[12 * i, 0, 12 * i + 16, 0, 12 * i + 16, 16]]}
                for i, c in enumerate(ids)]
        (folder / f"{split}.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": f"{split}.png", "width": 64, "height": 64}], "annotations": anns,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate("abcd")]}))
    return folder


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory):
    """The output folder of `make demo` in miniature (the smoke preset, seed 0), run once per session: the demo's
    tests and detection's comparison tool read it."""
    out = tmp_path_factory.mktemp("demo") / "out"
    pipeline.run(out, "smoke")
    return out


def pytest_collection_modifyitems(items):
    """A test that reads report_dir runs the smoke demo (about 40 s): it must be marked slow, so that the fast subset
    (`make test-fast`) never starts the demo."""
    unmarked = [item.nodeid for item in items
                if "report_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"mark these tests slow, they read report_dir: {', '.join(unmarked)}")
