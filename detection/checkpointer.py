"""detectron2's checkpointer, made safe: every weights path that reaches detectron2 (init, resume, eval) goes
through the project's loader, and a load that leaves the backbone unset fails instead of training on random
weights.

- `.pth` / `.bin` / `.safetensors`: `pretrain.files.read_checkpoint`, i.e. `torch.load(weights_only=True)` or
  safetensors: no code from the file runs. A released-weights name (`mae_vit_base`, ...) is downloaded into the
  cache first (`pretrain.weights.releases`).
- Weights that are no detectron2 checkpoint (a pretraining, encoder, timm, transformers or mmpretrain file) are
  converted for this model's ViT on the fly by `detection.convert.to_vitdet`, as `tools/convert_pretrain_to_d2.py`
  would, and the conversion report is logged.
- `.pkl` (detectron2's model zoo, Caffe2 conversions): unpickling runs code, so it is refused unless the user
  passes `--trust-pickle` (then detectron2's own loader reads it).
- After loading: every `backbone.net.*` weight except the relative-position tables (new in ViTDet, zero-init)
  must have been set with the right shape; `strict=True` (evaluation) requires every weight of the model.
  `allow_partial=True` (`--allow-partial-init`) keeps detectron2's warn-and-continue behaviour.
"""
from __future__ import annotations

from typing import Any

from detectron2.checkpoint import DetectionCheckpointer

from pretrain.errors import CheckpointError
from pretrain.files import read_checkpoint
from pretrain.weights.fit import slots_grid
from pretrain.weights.formats import import_state_dict
from pretrain.weights.releases import resolve_weights

from .convert import target_from_vit, to_detectron2_checkpoint, to_vitdet

__all__ = ["SafeCheckpointer"]


def _grid_or_none(slots: int) -> tuple[int, int]:
    """`slots_grid`, or (0, 0) for a count that is no grid."""
    try:
        return slots_grid(slots)
    except CheckpointError:
        return 0, 0


class SafeCheckpointer(DetectionCheckpointer):
    """`DetectionCheckpointer` that never unpickles code unless trusted and refuses partial loads.

    Args:
        model, save_dir, checkpointables: as `DetectionCheckpointer`.
        trust_pickle: allow `.pkl` files and pickled Python objects in `.pth` files.
        allow_partial: let a load leave backbone (or, with `strict`, any) weights unset, with detectron2's warning.
        strict: every weight of the model must be in the file (for evaluating a trained model).
    """

    def __init__(self, model: Any, save_dir: str = "", *, trust_pickle: bool = False, allow_partial: bool = False,
                 strict: bool = False, **checkpointables: Any) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.trust_pickle, self.allow_partial, self.strict = trust_pickle, allow_partial, strict
        self._source = ""

    def load(self, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return super().load(str(resolve_weights(path)) if path else path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict[str, Any]:
        self._source = filename
        if filename.endswith(".pkl"):
            if not self.trust_pickle:
                raise CheckpointError(f"{filename} is a pickle (.pkl): loading it runs code from the file; pass "
                                      "--trust-pickle only if you trust its source (e.g. detectron2's model zoo)")
            return super()._load_file(filename)
        loaded = read_checkpoint(filename, trust_pickle=self.trust_pickle)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{filename} holds a {type(loaded).__name__}, not a checkpoint dict; give a "
                                  "detectron2 checkpoint (e.g. from tools/convert_pretrain_to_d2.py)")
        return self._converted(loaded, filename) or (loaded if "model" in loaded else {"model": loaded})

    def _converted(self, loaded: dict[str, Any], filename: str) -> dict[str, Any] | None:
        """A pretraining-side file (ViT encoder keys, any layout) converted for this model's ViT; None otherwise."""
        if "model" in loaded and isinstance(loaded["model"], dict) and "iteration" in loaded:
            return None  # a detectron2 training checkpoint (resume, model_final)
        sd, layout = import_state_dict(loaded, filename)
        model = getattr(self.model, "module", self.model)
        net = getattr(getattr(model, "backbone", None), "net", None)
        if layout.name == "detectron2" or net is None or "patch_embed.proj.weight" not in sd:
            return None
        new_sd, report = to_vitdet(sd, **target_from_vit(net.state_dict()), source=filename, layout=layout.name)
        for line in report.lines():
            self.logger.info("[SafeCheckpointer] converted for ViTDet: %s", line.strip())
        return to_detectron2_checkpoint(new_sd, source=filename)

    def _load_model(self, checkpoint: Any) -> Any:
        incompatible = super()._load_model(checkpoint)
        if self.allow_partial or incompatible is None:
            return incompatible
        wrong_shape = [k for k, *_ in incompatible.incorrect_shapes]
        unset = [k for k in incompatible.missing_keys + wrong_shape
                 if self.strict or (k.startswith("backbone.net.") and ".rel_pos_" not in k)]
        pos = [shape for k, shape, _ in incompatible.incorrect_shapes if k == "backbone.net.pos_embed"]
        cls_slot, side = _grid_or_none(pos[0][1]) if pos else (0, 0)
        if cls_slot == 1:
            # the commonest mismatch: an encoder pretrained at another resolution (e.g. CrossMAE's ViT-B/448)
            size = side * self.model.backbone.net.patch_embed.proj.kernel_size[0]
            raise CheckpointError(f"{self._source} holds a pos_embed for {size} px pretraining, the config one for "
                                  f"another size; add model.backbone.net.pretrain_img_size={size} to the command")
        if unset:
            what = "weights of the model" if self.strict else "backbone weights"
            raise CheckpointError(
                f"{self._source} leaves {len(unset)} {what} unset ({', '.join(sorted(unset)[:3])}"
                f"{', ...' if len(unset) > 3 else ''}"
                + (f"; {len(wrong_shape)} of another shape" if wrong_shape else "")
                + "): it is no converted checkpoint of this ViT; convert it with tools/convert_pretrain_to_d2.py "
                "--config CONFIG, or pass --allow-partial-init to go on from what loads")
        return incompatible
