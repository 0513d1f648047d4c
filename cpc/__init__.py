"""Contrastive Predictive Coding (Oord et al. 2018) on speech: the model, its criterion (every
InfoNCE term through ``csrc_triton.info_nce``), training windows and batch sampling, and
export to CPC_audio's checkpoint layout."""
from .criterion import NEGATIVE_MODES, CPCCriterion, CPCLossOutput
from .model import CPCModel, CPCModelConfig, Encoder, receptive_field

__all__ = ["CPCModel", "CPCModelConfig", "Encoder", "receptive_field", "CPCCriterion",
           "CPCLossOutput", "NEGATIVE_MODES"]
