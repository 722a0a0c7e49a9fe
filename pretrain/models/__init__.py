"""MAE and CrossMAE models on one shared ViT encoder, and the registry that names them."""
from .crossmae import CrossMAE
from .encoder import MaskedOutput, MaskedViTEncoder
from .mae import MAE
from .registry import (FAMILIES, VIT_SIZES, ModelInfo, build_model, list_models, model_info, register_model,
                       size_of_width)

__all__ = ["CrossMAE", "MAE", "MaskedOutput", "MaskedViTEncoder", "FAMILIES", "VIT_SIZES", "ModelInfo", "build_model",
           "list_models", "model_info", "register_model", "size_of_width"]
