"""MAE and CrossMAE models on one shared ViT encoder (`encoder`, with its sin-cos position embedding `pos_embed`),
the two decoders (`mae`, `crossmae`), and the registry that names them and builds them from a config (`registry`).
Imports nothing of the project."""
from .crossmae import CrossMAE
from .encoder import MaskedOutput, MaskedViTEncoder
from .mae import MAE
from .registry import (FAMILIES, VIT_SIZES, ModelInfo, build_model, create_model, list_models, model_info, model_use_fm,
                       register_model, size_of_width)

__all__ = ["CrossMAE", "MAE", "MaskedOutput", "MaskedViTEncoder", "FAMILIES", "VIT_SIZES", "ModelInfo", "build_model",
           "create_model", "list_models", "model_use_fm", "model_info", "register_model", "size_of_width"]
