"""Images: class and segmentation folders, the generated shapes dataset, SimCLR-style
augmentations (torchvision.transforms.v2), backbones and heads, and the self-supervised methods
built on the fused losses of :mod:`csrc_triton`. Import the submodules directly:
``modalities.image.data``, ``.synthetic``, ``.transforms``, ``.sampling``, ``.backbones``,
``.heads``, ``.momentum``, ``.methods``."""
