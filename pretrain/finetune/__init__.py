"""End-to-end fine-tuning of a pretrained encoder for image classification, with MAE's recipe (`main_finetune.py`).

`config` (flags, recipes, checks), `model` (timm's ViT classifier and loading a pretrained encoder into it), `data`
(ImageFolder splits, timm's augmentation, Mixup / CutMix and the loss), `engine` (one epoch, evaluation), `trainer`
(the run). It may import the rest of `pretrain` (models, weights, training machinery), never `detection` or
`workflows`.
"""
