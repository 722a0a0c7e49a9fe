"""The pretraining optimizer (`pretrain.training.optim`): the official weight-decay groups, and the fused AdamW the
trainer uses on CPU making the default implementation's update."""
import pytest
import torch

from pretrain.models import MAE, CrossMAE
from pretrain.training.optim import build_optimizer, fused_by_default

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)


def _tiny(cls, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return cls(**{**TINY, **kw}).eval()


@pytest.mark.parametrize("cls", [MAE, CrossMAE])
def test_weight_decay_groups_follow_the_official_trainers(cls):
    # MAE's and CrossMAE's main_pretrain: timm 0.3.2's add_weight_decay(model, wd) with no skip list, i.e. no
    # decay exactly on 1-D parameters and biases; frozen parameters (the sin-cos embeddings) are left out
    model = _tiny(cls)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: {name_of[id(p)] for p in g["params"]} for g in build_optimizer(model, 1e-3, 0.05)
              .param_groups}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert groups[0.0] == {n for n, p in trainable if p.ndim == 1 or n.endswith(".bias")}
    assert groups[0.05] == {n for n, p in trainable if p.ndim > 1 and not n.endswith(".bias")}
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight"} <= groups[0.05]
    assert "pos_embed" not in groups[0.0] | groups[0.05] and "norm1.weight" not in str(groups[0.05])
    if cls is CrossMAE:
        assert "wfm.linear.weight" in groups[0.05]


def test_fused_adamw_the_trainer_uses_on_cpu_makes_the_default_update():
    # the trainer runs torch's fused AdamW on CPU too (pretrain.training.optim.fused_by_default): over the model's
    # weight-decay groups and a changing lr it must give the weights of the default implementation. The gradients
    # are given (the same random ones for both), not back-propagated: a loss leaves the key biases with gradients
    # of rounding noise only, which Adam scales up to +-lr steps of either sign in either implementation
    assert fused_by_default(torch.device("cpu"))
    models = [_tiny(CrossMAE), _tiny(CrossMAE)]
    opts = [build_optimizer(m, 1e-3, 0.05, fused=fused) for m, fused in zip(models, (False, True))]
    for step in range(3):
        for model, opt in zip(models, opts):
            for group in opt.param_groups:
                group["lr"] = 1e-3 * (step + 1) / 3
            gen = torch.Generator().manual_seed(step)
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = 0
    for (name, a), b, start in zip(models[0].named_parameters(), models[1].parameters(),
                                   _tiny(CrossMAE).parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(a, start))
    assert moved == sum(p.requires_grad for p in models[0].parameters())  # every trained weight took the steps
