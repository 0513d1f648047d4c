"""Contrastive Predictive Coding (Oord et al. 2018) on speech: the model, its criterion (every
InfoNCE term through ``csrc_triton.info_nce``, or CPC_audio's sampled negatives), the int16
audio store training reads from, training windows and batch sampling, the probes, and export
to CPC_audio's checkpoint layout."""
from .criterion import NEGATIVE_MODES, CPCCriterion, CPCLossOutput, sample_negatives
from .export import export_cpc_audio, load_cpc_audio
from .model import CPCModel, CPCModelConfig, Encoder, receptive_field
from .store import AudioStore, prepare_store, shard_indices

__all__ = ["CPCModel", "CPCModelConfig", "Encoder", "receptive_field", "CPCCriterion",
           "CPCLossOutput", "NEGATIVE_MODES", "sample_negatives", "export_cpc_audio",
           "load_cpc_audio", "AudioStore", "prepare_store", "shard_indices"]
