"""Multimodal: image towers, the contrastive text/image dual encoder (CLIP / SigLIP on the fused
losses of :mod:`csrc_triton`), its save/load (a ``transformers.VisionTextDualEncoderModel`` where
the towers allow), and image-caption data."""
from .hf import exportable, load_dual_encoder, save_dual_encoder  # noqa: F401
from .model import DUAL_ENCODER_LOSSES, DualEncoder  # noqa: F401
from .towers import IMAGE_TOWERS, VIT_SIZES, ImageTower, build_image_tower, vit_patch_size  # noqa: F401
from .data import CaptionPairs, decode_resize, load_pairs  # noqa: F401
from .scenes import SCENES_VERSION, SceneInfo, ensure_scenes, generate_scenes, load_zeroshot  # noqa: F401
