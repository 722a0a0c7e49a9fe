"""Images in: pretraining datasets (an ImageNet-layout folder, a folder of images, or the built-in procedural
images), the analysis tools' image sources, transforms and fixed masks (`images`), and the procedural shapes
renderer shared with the detection set (`synthetic`); webdataset tar shards of an ImageFolder, the converter and the
pretraining stream over them (`shards`). Imports `errors` and `files` only."""
