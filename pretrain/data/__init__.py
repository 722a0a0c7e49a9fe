"""Images in: pretraining datasets (an ImageNet-layout folder, a folder of images, or the built-in procedural
images), the analysis tools' image sources, transforms and fixed masks (`images`), and the procedural shapes
renderer shared with the detection set (`synthetic`). Imports `errors` only."""
