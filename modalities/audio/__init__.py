"""Audio building blocks: file I/O and resampling, frame features, utterance sources, and the
generated speech corpus the CPC recipe trains on when no data folder is given.

Framing convention shared by everything here: audio at `SAMPLE_RATE` (16 kHz), one frame and one
frame-level label per `FRAME_HOP` (160) samples, i.e. per 10 ms; a waveform of T samples has
T // 160 frames.
"""
from .corpus import (CORPUS_VERSION, PHONES, Phone, SpeakerVoice, corpus_cache_dir, corpus_key,
                     corpus_version, generate_corpus, read_phone_set, speaker_voice, synthesize_utterance)
from .features import frame_hop, log_mel, mfcc
from .librishaped import N_LABELS, make_librispeech_tree
from .io import FRAME_HOP, SAMPLE_RATE, AudioReadError, load_audio, resample
from .sources import (SPLITS, LabelRangeError, Utterance, holdout_split, read_alignments, read_id_list, read_manifest,
                      scan_librispeech)

__all__ = [
    "SAMPLE_RATE", "FRAME_HOP", "AudioReadError", "load_audio", "resample",
    "mfcc", "log_mel", "frame_hop",
    "Utterance", "SPLITS", "scan_librispeech", "read_manifest", "read_alignments", "LabelRangeError", "read_id_list",
    "holdout_split",
    "generate_corpus", "read_phone_set", "CORPUS_VERSION", "corpus_version", "corpus_key",
    "corpus_cache_dir", "PHONES", "Phone", "SpeakerVoice",
    "speaker_voice", "synthesize_utterance", "make_librispeech_tree", "N_LABELS",
]
