"""Analysis of pretraining models: decoder attention statistics and CrossMAE's feature-map weights
(`attention`), reconstruction panels and the figure writer (`figures`), the reports of tools/visualize.py and
tools/analyze_attention.py (`report`). Imports `models`, `data`, `weights` and the shared modules."""
