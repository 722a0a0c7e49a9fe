"""Our MAE and CrossMAE against the official code: same weights and same noise give the same loss.

The golden files were written by the official `models_mae.py` / `models_cross.py` (see
tests/data/README.md); the official code itself is not part of this repository.
"""
from pathlib import Path

import pytest
import torch

from pretrain.models import MAE, CrossMAE

DATA = Path(__file__).resolve().parents[2] / "data"  # tests/data
CASES = ["mae_reference", "crossmae_reference", "crossmae_selfattn_reference"]


def _load(name: str) -> tuple[dict, torch.nn.Module]:
    golden = torch.load(DATA / f"{name}.pt", weights_only=True)
    cls = MAE if golden["kind"] == "mae" else CrossMAE
    return golden, cls(**golden["model_kwargs"])


@pytest.mark.parametrize("name", CASES)
def test_fresh_position_embeddings_match_official(name):
    golden, model = _load(name)
    for key in ("pos_embed", "decoder_pos_embed"):
        torch.testing.assert_close(model.state_dict()[key], golden["state_dict"][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CASES)
def test_same_weights_and_noise_give_official_loss(name):
    golden, model = _load(name)
    model.load_state_dict(golden["state_dict"], strict=True)
    with torch.no_grad():
        out = model(golden["imgs"], noise=golden["noise"])
    assert torch.equal(out.mask, golden["mask"])
    torch.testing.assert_close(out.loss, golden["loss"], rtol=0, atol=1e-6)
    pred = out.pred if golden["kind"] == "mae" else out.pred[out.mask.bool()].reshape(golden["pred"].shape)
    torch.testing.assert_close(pred, golden["pred"], rtol=0, atol=1e-5)

    model.norm_pix_loss = False
    with torch.no_grad():
        loss = model(golden["imgs"], noise=golden["noise"]).loss
    torch.testing.assert_close(loss, golden["loss_no_norm_pix"], rtol=0, atol=1e-6)


def test_crossmae_golden_exercises_official_rounding():
    # 25 patches, mask .75, prediction .25: official predicts 25 - 6 - int(12.5) = 7, not int(6.25) = 6
    golden, model = _load("crossmae_reference")
    assert model.num_patches == 25
    assert golden["mask"].sum(1).tolist() == [7.0, 7.0]
    assert model.num_predicted() == 7
