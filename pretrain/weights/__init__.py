"""Weights files: every MAE-family layout into this project's keys (`formats`), released weights by name with
checksums and the download cache (`releases`), fitting an encoder to a target's grid and patch and loading with an
exact report (`fit`), and reading any file into an encoder or a whole model (`loading`).
Imports `models`, `errors` and `files`."""
