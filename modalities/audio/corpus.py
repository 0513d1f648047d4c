"""A generated speech-like corpus: a deterministic test bed for CPC and its probes.

Synthetic speakers utter random syllables built from synthetic phones. Synthesis is
source-filter, done frame by frame in the STFT domain (so it is vectorised and fast):

    Y(frame, f) = V(frame, f) * S(f) * T(frame, f)      voiced: glottal pulse train V through the
                                                         glottal/radiation/tilt spectrum S and the
                                                         vocal tract T (cascade of resonators)
                + H(frame, f) * T(frame, f)              aspiration noise through the tract
                + N(frame, f) * B(frame, f)              frication noise through a band B

Time-domain gains (voicing, frication, aspiration) are applied to the sources per sample,
so closures, bursts and onsets keep sharp edges; formant targets are smoothed across phone
boundaries (coarticulated transitions, undershoot in short phones).

Speakers differ in mean F0 and its range, jitter, shimmer, formant scaling (vocal-tract length),
speaking rate, spectral tilt, breathiness and small per-phone "accent" offsets; so speaker
identity is carried by pitch and formant scaling, and phone identity by the short-time
spectrum, blurred by speaker variation, token variation, coarticulation and background noise.

Files written by `generate_corpus(out_dir)`:

    out_dir/wav/<id>.wav      16 kHz mono, 16-bit PCM
    out_dir/manifest.csv      id,path,speaker,split,gender   (path relative to out_dir)
    out_dir/phones.txt        "<id> <label> <label> ..."  one label per 10 ms frame,
                              frames = n_samples // 160; label i is the phone at the frame's
                              centre sample 160 * i + 80
    out_dir/phone_set.txt     one phone name per line; line k (from 0) is label k; "sil" is 0
    out_dir/corpus.json       the parameters, the corpus version and cache key, the speakers'
                              parameters

Versioning: `corpus_version()` (and `CORPUS_VERSION`, its value at import) is a content hash of
everything the synthesis depends on besides the call's arguments (the phone inventory, the STFT
constants, the source of every synthesis function); `corpus_key(...)` hashes it with the
arguments, and `corpus_cache_dir(root, ...)` names a cache folder by that key. A corpus on disk
whose recorded version differs from the running code's is regenerated, never reused.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import json
import shutil
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from .io import FRAME_HOP, SAMPLE_RATE

__all__ = [
    "CORPUS_VERSION", "Phone", "PHONES", "SpeakerVoice", "corpus_cache_dir", "corpus_key",
    "corpus_version", "generate_corpus", "read_phone_set", "speaker_voice", "synthesize_utterance",
]

_REVISION = 2  # bump for a change of the synthesis that the hash in corpus_version() cannot see

_N_FFT = 512  # 32 ms synthesis frames
_HOP = 128  # 8 ms control rate for the spectral envelopes
_BINS = np.arange(_N_FFT // 2 + 1) * SAMPLE_RATE / _N_FFT  # (257,) Hz
_COS_W = np.cos(2 * np.pi * _BINS / SAMPLE_RATE)
_SIN_W = np.sin(2 * np.pi * _BINS / SAMPLE_RATE)
_WINDOW = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_N_FFT) / _N_FFT)  # periodic Hann


@dataclass(frozen=True)
class Phone:
    """A synthetic phone.

    kind: "sil", "vowel", "glide", "nasal", "fricative" or "stop".
    formants: (F1, F2, F3) targets in Hz for an average speaker (consonants: place loci).
    voiced: whether the glottis vibrates (stops: a weak voice bar in the closure).
    gain: voicing amplitude relative to a vowel.
    noise: (centre Hz, bandwidth Hz, amplitude) of frication or burst noise; None if none.
    zero: anti-resonance in Hz (nasals), 0 if none.
    duration: (min, max) duration in seconds at speaking rate 1.
    """

    name: str
    kind: str
    formants: tuple[float, float, float] = (500.0, 1500.0, 2500.0)
    voiced: bool = True
    gain: float = 1.0
    noise: tuple[float, float, float] | None = None
    zero: float = 0.0
    duration: tuple[float, float] = (0.08, 0.15)


_V = (0.08, 0.15)  # vowel durations
_C = (0.05, 0.10)  # consonant durations
_F = (0.07, 0.13)  # fricative durations

# Phone inventory, ordered so that any prefix mixes the classes; `n_phones` takes a prefix.
# Vowel formants after Peterson & Barney (1952), adult average.
PHONES: tuple[Phone, ...] = (
    Phone("sil", "sil", voiced=False, gain=0.0, duration=(0.10, 0.25)),
    Phone("aa", "vowel", (730, 1090, 2440), duration=_V),
    Phone("iy", "vowel", (270, 2290, 3010), gain=0.8, duration=_V),
    Phone("uw", "vowel", (300, 870, 2240), gain=0.8, duration=_V),
    Phone("s", "fricative", (350, 1700, 2700), voiced=False, gain=0.0, noise=(5500, 2500, 0.45), duration=_F),
    Phone("m", "nasal", (280, 1000, 2200), gain=0.5, zero=900, duration=_C),
    Phone("t", "stop", (350, 1700, 2700), voiced=False, gain=0.0, noise=(4200, 3000, 0.6), duration=_C),
    Phone("eh", "vowel", (530, 1840, 2480), duration=_V),
    Phone("n", "nasal", (280, 1500, 2500), gain=0.5, zero=1600, duration=_C),
    Phone("k", "stop", (350, 1900, 2400), voiced=False, gain=0.0, noise=(2200, 900, 0.6), duration=_C),
    Phone("sh", "fricative", (350, 1900, 2400), voiced=False, gain=0.0, noise=(3000, 1400, 0.5), duration=_F),
    Phone("ae", "vowel", (660, 1720, 2410), duration=_V),
    Phone("l", "glide", (360, 1300, 2800), gain=0.6, duration=_C),
    Phone("b", "stop", (300, 900, 2200), gain=0.7, noise=(1000, 1600, 0.35), duration=_C),
    Phone("f", "fricative", (350, 900, 2200), voiced=False, gain=0.0, noise=(4500, 6000, 0.08), duration=_F),
    Phone("er", "vowel", (490, 1350, 1690), duration=_V),
    Phone("z", "fricative", (350, 1700, 2700), gain=0.35, noise=(5500, 2500, 0.3), duration=_F),
    Phone("d", "stop", (300, 1700, 2700), gain=0.7, noise=(4200, 3000, 0.35), duration=_C),
    Phone("ao", "vowel", (570, 840, 2410), duration=_V),
    Phone("r", "glide", (330, 1060, 1600), gain=0.6, duration=_C),
    Phone("p", "stop", (350, 900, 2200), voiced=False, gain=0.0, noise=(1000, 1600, 0.6), duration=_C),
    Phone("v", "fricative", (350, 900, 2200), gain=0.35, noise=(4500, 6000, 0.06), duration=_F),
    Phone("ih", "vowel", (390, 1990, 2550), duration=_V),
    Phone("g", "stop", (300, 1900, 2400), gain=0.7, noise=(2200, 900, 0.35), duration=_C),
    Phone("w", "glide", (300, 610, 2200), gain=0.6, duration=_C),
    Phone("ah", "vowel", (520, 1190, 2390), duration=_V),
    Phone("y", "glide", (260, 2070, 3020), gain=0.6, duration=_C),
    Phone("uh", "vowel", (440, 1020, 2240), duration=_V),
    Phone("ng", "nasal", (280, 2000, 2600), gain=0.5, zero=2800, duration=_C),
)


@dataclass(frozen=True)
class SpeakerVoice:
    """One synthetic speaker's voice parameters."""

    name: str
    gender: str  # "F" or "M"
    f0: float  # mean F0 in Hz
    f0_range: float  # intonation excursion in semitones
    jitter: float  # std of pulse timing, as a fraction of a period
    shimmer: float  # std of pulse amplitude, relative
    formant_scale: float  # all resonances times this (shorter vocal tract: larger)
    rate: float  # speaking rate; durations divided by it
    tilt: float  # extra spectral tilt of the voice source, dB per octave
    breathiness: float  # aspiration noise amplitude relative to voicing
    accent: tuple[tuple[float, float, float], ...]  # per-phone formant factors (len(PHONES), 3)


def speaker_voice(index: int, seed: int = 0) -> SpeakerVoice:
    """The voice of speaker `index` for corpus `seed` (independent of how many speakers there are)."""
    rng = np.random.default_rng([seed, 0, index])
    gender = "F" if index % 2 == 0 else "M"
    female = gender == "F"
    accent = np.exp(rng.normal(0.0, 0.07, size=(len(PHONES), 3)))
    return SpeakerVoice(
        name=f"spk{index:02d}",
        gender=gender,
        f0=float(rng.uniform(170, 260) if female else rng.uniform(85, 150)),
        f0_range=float(rng.uniform(1.5, 4.0)),
        jitter=float(rng.uniform(0.005, 0.025)),
        shimmer=float(rng.uniform(0.03, 0.12)),
        formant_scale=float(rng.uniform(1.05, 1.20) if female else rng.uniform(0.85, 1.0)),
        rate=float(rng.uniform(0.8, 1.25)),
        tilt=float(rng.uniform(-2.5, 2.5)),
        breathiness=float(rng.uniform(0.05, 0.2) if female else rng.uniform(0.02, 0.12)),
        accent=tuple(tuple(round(float(x), 6) for x in row) for row in accent),
    )


# ----------------------------------------------------------------------------- phone sequences


def _phone_sequence(rng: np.random.Generator, voice: SpeakerVoice, n_phones: int,
                    n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Random syllables (C)(C)V(C) with optional pauses, framed by silence.

    Returns (phone ids (P,), start samples (P + 1,) with starts[-1] == n_samples).
    """
    vowels = [i for i in range(1, n_phones) if PHONES[i].kind == "vowel"]
    consonants = [i for i in range(1, n_phones) if PHONES[i].kind not in ("vowel", "sil")]

    def duration(pid: int) -> int:
        lo, hi = PHONES[pid].duration
        seconds = rng.uniform(lo, hi) / (voice.rate if pid else 1.0)
        return int(round(max(seconds, 0.04) * SAMPLE_RATE))

    tail = duration(0)
    ids, lengths = [0], [duration(0)]
    while True:
        syllable = []
        if consonants:
            syllable += list(rng.choice(consonants, size=rng.choice(3, p=[0.25, 0.6, 0.15])))
        syllable.append(int(rng.choice(vowels)))
        if consonants and rng.random() < 0.5:
            syllable.append(int(rng.choice(consonants)))
        if rng.random() < 0.08:
            syllable.append(0)  # a pause
        syl_lengths = [duration(int(p)) for p in syllable]
        if sum(lengths) + sum(syl_lengths) + tail > n_samples:
            break
        ids += [int(p) for p in syllable]
        lengths += syl_lengths
    ids.append(0)
    lengths.append(n_samples - sum(lengths))  # the final silence takes the rest
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return np.asarray(ids, dtype=np.int64), starts.astype(np.int64)


# ----------------------------------------------------------------------------- signal helpers


def _smooth(x: np.ndarray, taps: int, axis: int = 0) -> np.ndarray:
    """Hann-weighted moving average along `axis`, edges extended (length preserved)."""
    if taps <= 1:
        return x
    kernel = np.hanning(taps + 2)[1:-1]
    kernel /= kernel.sum()
    x = np.moveaxis(x, axis, -1)
    pad = [(0, 0)] * (x.ndim - 1) + [(taps // 2, taps - 1 - taps // 2)]
    padded = np.pad(x, pad, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps, axis=-1)
    return np.moveaxis(windows @ kernel, -1, axis)


def _box(x: np.ndarray, taps: int) -> np.ndarray:
    """Moving average of a 1-D signal (length preserved), for gain ramps."""
    kernel = np.ones(taps) / taps
    return np.convolve(np.pad(x, (taps // 2, taps - 1 - taps // 2), mode="edge"), kernel, mode="valid")


def _stft(x: np.ndarray) -> np.ndarray:
    """(T,) with T % _HOP == 0 -> (T // _HOP + 1, bins) complex; frame i centred at sample i * _HOP."""
    padded = np.pad(x, (_N_FFT // 2, _N_FFT // 2))
    frames = np.lib.stride_tricks.sliding_window_view(padded, _N_FFT)[::_HOP]
    return np.fft.rfft(frames * _WINDOW, axis=-1)


def _istft(spec: np.ndarray, n_samples: int) -> np.ndarray:
    """Weighted overlap-add inverse of `_stft` (Hann analysis and synthesis windows)."""
    frames = np.fft.irfft(spec, n=_N_FFT, axis=-1) * _WINDOW  # (F, n_fft)
    n_frames, per = frames.shape[0], _N_FFT // _HOP
    out = np.zeros((n_frames + per - 1, _HOP))
    for j in range(per):
        out[j:j + n_frames] += frames[:, j * _HOP:(j + 1) * _HOP]
    win_sq = (_WINDOW ** 2).reshape(per, _HOP)
    norm = np.zeros((n_frames + per - 1, _HOP))
    for j in range(per):
        norm[j:j + n_frames] += win_sq[j]
    y = (out / np.maximum(norm, 1e-3)).reshape(-1)
    return y[_N_FFT // 2:_N_FFT // 2 + n_samples]


def _resonators(freqs: np.ndarray, bandwidths: np.ndarray) -> np.ndarray:
    """Magnitude response of a cascade of 2-pole resonators, unit gain at DC (Klatt 1980).

    freqs, bandwidths: (F, K) Hz -> (F, bins). Poles at r e^{+-j th}, r = exp(-pi B / sr),
    th = 2 pi F / sr; |H_k(w)|^2 = A^2 / ((1 - 2 r cos(w - th) + r^2) (1 - 2 r cos(w + th) + r^2))
    with A = 1 - 2 r cos(th) + r^2.
    """
    r = np.exp(-np.pi * bandwidths / SAMPLE_RATE)[..., None]  # (F, K, 1)
    th = (2 * np.pi * freqs / SAMPLE_RATE)[..., None]
    cos_th, sin_th = np.cos(th), np.sin(th)
    one_r2 = 1 + r * r
    # cos(w -+ th) = cos w cos th +- sin w sin th
    a, b = 2 * r * cos_th * _COS_W, 2 * r * sin_th * _SIN_W
    power = (one_r2 - a - b) * (one_r2 - a + b)
    gain2 = (one_r2 - 2 * r * cos_th) ** 2
    return np.sqrt(np.prod(gain2 / power, axis=1))


def _unit_power(env: np.ndarray) -> np.ndarray:
    """Scale each frame's magnitude response to mean power 1 over the bins: (F, bins)."""
    return env / np.sqrt(np.mean(env ** 2, axis=-1, keepdims=True) + 1e-12)


def _reverberate(wave: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add a small room: direct sound plus an exponentially decaying noise tail (RT60 0.1-0.4 s)."""
    rt60 = rng.uniform(0.1, 0.4)
    n_tail = int(rt60 * SAMPLE_RATE)
    tt = np.arange(n_tail) / SAMPLE_RATE
    tail = rng.standard_normal(n_tail) * np.exp(-6.91 * tt / rt60) * (tt > 0.004)
    direct_to_reverb_db = rng.uniform(6.0, 16.0)
    tail *= 10 ** (-direct_to_reverb_db / 20) / (np.sqrt(np.sum(tail ** 2)) + 1e-12)
    n = len(wave) + n_tail
    size = 1 << (n - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(wave, size) * np.fft.rfft(tail, size), size)[:len(wave)]
    return wave + wet


# ----------------------------------------------------------------------------- synthesis


def synthesize_utterance(voice: SpeakerVoice, n_phones: int, seconds: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthesize one utterance of random syllables spoken by `voice`.

    Args:
        voice: the speaker (see `speaker_voice`).
        n_phones: labels available, silence included: phones are drawn from PHONES[1:n_phones].
        seconds: duration; the utterance starts and ends with silence.
        rng: the only source of randomness (same state, same output).

    Returns:
        wave: (T,) float32 in [-1, 1], T = round(seconds * 16000) samples.
        labels: (T // 160,) int64 phone ids, label i = phone at sample 160 * i + 80.
    """
    n_samples = int(round(seconds * SAMPLE_RATE))
    ids, starts = _phone_sequence(rng, voice, n_phones, n_samples)
    n_tokens = len(ids)
    padded_len = -(-n_samples // _HOP) * _HOP
    t = np.arange(padded_len)
    token_of_sample = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, n_tokens - 1)
    pos = (t - starts[token_of_sample]) / np.maximum(np.diff(starts)[token_of_sample], 1)  # in [0, 1)

    kinds = np.array([PHONES[i].kind for i in ids])
    voiced = np.array([PHONES[i].voiced for i in ids])
    gains = np.array([PHONES[i].gain for i in ids])
    noise_amp = np.array([PHONES[i].noise[2] if PHONES[i].noise else 0.0 for i in ids])
    token_level = np.exp(rng.normal(0.0, 0.1, size=n_tokens))  # loudness varies by token

    # --- per-sample source gains: voicing, frication, aspiration
    k = kinds[token_of_sample]
    is_stop = k == "stop"
    closure = rng.uniform(0.45, 0.65, size=n_tokens)[token_of_sample]
    burst_len = (rng.uniform(0.008, 0.016, size=n_tokens) * SAMPLE_RATE
                 / np.maximum(np.diff(starts), 1))[token_of_sample]
    in_closure = is_stop & (pos < closure)
    in_burst = is_stop & (pos >= closure) & (pos < closure + burst_len)
    after_burst = is_stop & (pos >= closure + burst_len)
    lvl = token_level[token_of_sample]
    a_v = gains[token_of_sample] * lvl
    a_v = np.where(in_closure & voiced[token_of_sample], 0.08, np.where(in_closure | in_burst, 0.0, a_v))
    a_f = np.where(is_stop, np.where(in_burst, noise_amp[token_of_sample], 0.0), noise_amp[token_of_sample]) * lvl
    a_h = np.where(after_burst & ~voiced[token_of_sample], 0.25 * lvl, 0.0)
    a_v = _box(a_v, 96)  # 6 ms voicing onsets and offsets
    a_f = _box(a_f, 24)
    a_h = _box(a_h, 48)
    a_h = a_h + voice.breathiness * a_v

    # --- voice source: glottal pulse train with intonation, jitter and shimmer
    seconds_axis = t / SAMPLE_RATE
    contour = (voice.f0_range * 0.5 * (1 - 2 * seconds_axis / max(seconds, 1e-3))  # declination
               + voice.f0_range * 0.5 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * seconds_axis
                                                 + rng.uniform(0, 2 * np.pi)))
    f0 = voice.f0 * 2.0 ** (contour / 12.0)
    phase = np.cumsum(f0 / SAMPLE_RATE)
    n_pulses = int(phase[-1])
    targets = np.arange(1, n_pulses + 1) + voice.jitter * rng.standard_normal(n_pulses)
    where = np.interp(targets, phase, t.astype(np.float64))  # fractional sample positions
    pulses = np.zeros(padded_len + 1)
    lo = np.floor(where).astype(np.int64)
    frac = where - lo
    amp = (1 + voice.shimmer * rng.standard_normal(n_pulses)) * np.sqrt(SAMPLE_RATE / voice.f0)
    np.add.at(pulses, lo, amp * (1 - frac))
    np.add.at(pulses, lo + 1, amp * frac)
    pulses = pulses[:padded_len]

    noise_f = rng.standard_normal(padded_len)
    noise_h = rng.standard_normal(padded_len)

    # --- per-frame spectral envelopes (frame i centred at sample i * _HOP)
    n_frames = padded_len // _HOP + 1
    centre = np.minimum(np.arange(n_frames) * _HOP, padded_len - 1)
    tok = token_of_sample[centre]
    scale = voice.formant_scale
    accent = np.asarray(voice.accent)
    token_formant_jitter = np.exp(rng.normal(0.0, 0.09, size=(n_tokens, 3)))
    targets_f = np.array([PHONES[i].formants for i in ids]) * accent[ids] * token_formant_jitter
    # silence has no tract of its own: it borrows the neutral vowel
    targets_f[ids == 0] = (500.0, 1500.0, 2500.0)
    log_f = np.log(targets_f[tok] * scale)  # (F, 3)
    log_f = _smooth(log_f, 11)  # ~90 ms coarticulation: transitions and undershoot
    formants = np.concatenate([np.exp(log_f), np.full((n_frames, 2), (3500.0, 4500.0)) * scale], axis=1)
    formants = np.minimum(formants, 0.45 * SAMPLE_RATE)
    bandwidths = np.array([60.0, 90.0, 120.0, 200.0, 250.0]) * (formants / np.array([500, 1500, 2500, 3500, 4500])) ** 0.5
    tract = _resonators(formants, bandwidths)  # (F, bins)
    zero = np.array([PHONES[i].zero for i in ids])[tok] * scale
    nasal = zero > 0
    if nasal.any():  # nasal murmur: an extra low pole and an anti-resonance (zero)
        rows = np.flatnonzero(nasal)
        anti = 1.0 / _resonators(zero[rows, None], np.full((len(rows), 1), 150.0))
        pole = _resonators(np.full((len(rows), 1), 250.0 * scale), np.full((len(rows), 1), 100.0))
        tract[rows] *= anti * pole
    f = np.maximum(_BINS, 20.0)
    source = (f / 1000.0) / (1 + (f / (2.0 * voice.f0)) ** 2) * (f / 1000.0) ** (voice.tilt / 6.02)
    source[0] = 0.0
    voiced_env = _unit_power(tract * source)
    asp_env = _unit_power(tract * (f / 1000.0) ** 0.5)

    has_noise = noise_amp[tok] > 0
    token_band_jitter = np.exp(rng.normal(0.0, 0.15, size=n_tokens))
    centres = np.array([PHONES[i].noise[0] if PHONES[i].noise else np.nan for i in ids])
    centres = (centres * token_band_jitter)[tok]
    widths = np.array([PHONES[i].noise[1] if PHONES[i].noise else np.nan for i in ids])[tok]
    if has_noise.any():
        idx = np.flatnonzero(has_noise)
        centres = np.interp(np.arange(n_frames), idx, centres[idx])
        widths = np.interp(np.arange(n_frames), idx, widths[idx])
    else:
        centres, widths = np.full(n_frames, 4000.0), np.full(n_frames, 2000.0)
    centres = np.minimum(centres * scale ** 0.5, 7000.0)
    band = np.exp(-0.5 * ((_BINS - centres[:, None]) / (0.5 * widths[:, None])) ** 2)
    band *= (1 - np.exp(-(_BINS / 500.0) ** 2))  # no frication energy at DC
    fric_env = _unit_power(band)

    spec = (_stft(pulses * a_v) * voiced_env + _stft(noise_h * a_h) * asp_env
            + _stft(noise_f * a_f) * fric_env)
    # channel: a random tilt and one broad peak or dip per utterance (microphone, room colour)
    octaves = np.log2(f / 1000.0)
    peak_octaves = np.log2(f / np.exp(rng.uniform(np.log(300.0), np.log(5000.0))))
    eq_db = rng.uniform(-1.0, 1.0) * octaves + rng.uniform(-4.0, 4.0) * np.exp(-2.0 * peak_octaves ** 2)
    spec *= 10.0 ** (eq_db / 20.0)
    wave = _istft(spec, n_samples)
    wave = _reverberate(wave, rng)

    # --- level, background noise, 16-bit range
    rms = np.sqrt(np.mean(wave ** 2)) + 1e-9
    wave = wave * (0.08 * np.exp(rng.normal(0.0, 0.15)) / rms)
    snr_db = rng.uniform(20.0, 35.0)
    background = _smooth(rng.standard_normal(n_samples), 3)  # slightly coloured
    background *= np.sqrt(np.mean(wave ** 2)) * 10 ** (-snr_db / 20) / (np.sqrt(np.mean(background ** 2)) + 1e-12)
    wave = np.clip(wave + background, -0.99, 0.99).astype(np.float32)

    frame_centres = np.arange(n_samples // FRAME_HOP) * FRAME_HOP + FRAME_HOP // 2
    labels = ids[np.searchsorted(starts, frame_centres, side="right") - 1]
    return wave, labels.astype(np.int64)


# ----------------------------------------------------------------------------- the corpus


def read_phone_set(path: str | PathLike) -> list[str]:
    """Read `phone_set.txt`: phone names, one per line; line k (from 0) names label k."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_params(n_speakers: int, utterances_per_speaker: int, seconds: tuple[float, float],
                  n_phones: int, seed: int) -> tuple[float, float]:
    for name, value, low in (("n_speakers", n_speakers, 1), ("utterances_per_speaker", utterances_per_speaker, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"generate_corpus: {name}={value!r}; expected an integer >= {low}")
    try:
        lo, hi = (float(s) for s in seconds)
    except (TypeError, ValueError):
        raise ValueError(f"generate_corpus: seconds={seconds!r}; expected (min, max) in seconds") from None
    if not 0.5 <= lo <= hi:
        raise ValueError(f"generate_corpus: seconds={seconds!r}; expected 0.5 <= min <= max")
    if not isinstance(n_phones, (int, np.integer)) or not 2 <= n_phones <= len(PHONES):
        raise ValueError(f"generate_corpus: n_phones={n_phones!r}; expected an integer in 2..{len(PHONES)} "
                         "(silence included)")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"generate_corpus: seed={seed!r}; expected a non-negative integer")
    return lo, hi


# Module-level names whose source text determines the corpus (looked up when hashing, so a
# replaced function changes the version too).
_SYNTHESIS_CODE = ("speaker_voice", "_phone_sequence", "_smooth", "_box", "_stft", "_istft", "_resonators",
                   "_unit_power", "_reverberate", "synthesize_utterance", "_write_corpus")


def corpus_version() -> str:
    """Content hash of the generator: "<revision>-<12 hex digits>".

    Hashes `_REVISION`, the phone inventory `PHONES`, the synthesis constants (sample rate, frame
    hop, STFT size and hop) and the source text of every synthesis function (`_SYNTHESIS_CODE`),
    as they are when called: any change of them (a formant, a duration range, a line of the
    synthesis, even a comment in it) gives a new version. Without source (a frozen install) the
    functions are hashed by name only and `_REVISION` must be bumped by hand.

    Example:
        >>> corpus_version()  # doctest: +SKIP
        '2-5d41402abc4b'
    """
    module = globals()
    code = []
    for name in _SYNTHESIS_CODE:
        try:
            code.append(inspect.getsource(module[name]))
        except (OSError, TypeError):
            code.append(name)
    blob = json.dumps({"revision": _REVISION, "phones": [asdict(p) for p in PHONES],
                       "constants": [SAMPLE_RATE, FRAME_HOP, _N_FFT, _HOP], "code": code}, sort_keys=True)
    return f"{_REVISION}-{hashlib.sha1(blob.encode('utf-8')).hexdigest()[:12]}"


def _params(n_speakers: int, utterances_per_speaker: int, seconds: tuple[float, float], n_phones: int,
            seed: int) -> dict:
    lo, hi = _check_params(n_speakers, utterances_per_speaker, seconds, n_phones, seed)
    return dict(n_speakers=int(n_speakers), utterances_per_speaker=int(utterances_per_speaker),
                seconds=[lo, hi], n_phones=int(n_phones), seed=int(seed))


def corpus_key(*, n_speakers: int = 8, utterances_per_speaker: int = 24, seconds: tuple[float, float] = (2.0, 4.0),
               n_phones: int = 16, seed: int = 0) -> str:
    """Cache key of one generated corpus: 16 hex digits of sha1(generator version, arguments).

    Same arguments as `generate_corpus` (checked the same way); two calls give the same key
    exactly when they would write byte-identical corpora with the running code.
    """
    blob = json.dumps({"version": corpus_version(),
                       "params": _params(n_speakers, utterances_per_speaker, seconds, n_phones, seed)},
                      sort_keys=True)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def corpus_cache_dir(cache_root: str | PathLike, **params) -> Path:
    """The folder a corpus with these `generate_corpus` arguments is cached in: `cache_root/synth-<key>`.

    Example:
        >>> root = corpus_cache_dir("/tmp/cache", n_speakers=4, seed=1)
        >>> manifest = generate_corpus(root, n_speakers=4, seed=1)  # doctest: +SKIP
    """
    return Path(cache_root).expanduser() / f"synth-{corpus_key(**params)}"


def _is_complete(out_dir: Path, params: dict) -> bool:
    """Whether out_dir holds a finished corpus generated with exactly these parameters."""
    info_path = out_dir / "corpus.json"
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    if info.get("version") != corpus_version() or info.get("params") != params:
        return False
    manifest = out_dir / "manifest.csv"
    if not all((out_dir / name).is_file() for name in ("manifest.csv", "phones.txt", "phone_set.txt")):
        return False
    with manifest.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    n_expected = params["n_speakers"] * params["utterances_per_speaker"]
    return len(rows) == n_expected and all((out_dir / row["path"]).is_file() for row in rows)


def generate_corpus(out_dir: str | PathLike, *, n_speakers: int = 8, utterances_per_speaker: int = 24,
                    seconds: tuple[float, float] = (2.0, 4.0), n_phones: int = 16, seed: int = 0,
                    progress: bool = True) -> Path:
    """Generate (or reuse) the synthetic speech corpus in `out_dir`; see the module docstring.

    Args:
        out_dir: folder to write into (created if needed).
        n_speakers: synthetic speakers, alternately female and male.
        utterances_per_speaker: utterances per speaker; the last 20 % of each speaker's (at least
            one when there are two or more) have split "test", the rest "train".
        seconds: (min, max) utterance duration; each is drawn uniformly.
        n_phones: number of labels, silence included (label 0 = "sil"); 2..29.
        seed: everything is a function of the parameters: the same ones give byte-identical files.
        progress: show a tqdm progress bar.

    Returns:
        Path of `out_dir/manifest.csv`. If `out_dir/corpus.json` records the same parameters and
        the running generator's version (`corpus_version()`) and all files are there, nothing is
        regenerated; otherwise the corpus is written anew. To keep corpora of several settings
        side by side, pass `corpus_cache_dir(root, **arguments)` as `out_dir`.
    """
    params = _params(n_speakers, utterances_per_speaker, seconds, n_phones, seed)
    out_dir = Path(out_dir).expanduser().resolve()
    manifest_path = out_dir / "manifest.csv"
    if _is_complete(out_dir, params):
        return manifest_path
    _write_corpus(out_dir, params, progress)
    return manifest_path


def _write_corpus(out_dir: Path, params: dict, progress: bool) -> None:
    """Write every file of the corpus with checked `params` (see `generate_corpus`)."""
    n_speakers, utterances_per_speaker = params["n_speakers"], params["utterances_per_speaker"]
    (lo, hi), n_phones, seed = params["seconds"], params["n_phones"], params["seed"]
    manifest_path = out_dir / "manifest.csv"

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "corpus.json").unlink(missing_ok=True)  # marks the corpus incomplete until the end
    wav_dir = out_dir / "wav"
    if wav_dir.exists():
        shutil.rmtree(wav_dir)
    wav_dir.mkdir()

    voices = [speaker_voice(s, seed) for s in range(n_speakers)]
    n_test = max(1, round(0.2 * utterances_per_speaker)) if utterances_per_speaker >= 2 else 0
    rows, alignment_lines = [], []
    jobs = [(s, u) for s in range(n_speakers) for u in range(utterances_per_speaker)]
    for s, u in tqdm(jobs, desc="generating speech corpus", unit="utt", disable=not progress):
        voice = voices[s]
        rng = np.random.default_rng([seed, 1, s, u])
        duration = float(rng.uniform(lo, hi))
        wave, labels = synthesize_utterance(voice, n_phones, duration, rng)
        utt_id = f"{voice.name}-{u:04d}"
        sf.write(str(wav_dir / f"{utt_id}.wav"), wave, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        split = "test" if u >= utterances_per_speaker - n_test else "train"
        rows.append((utt_id, f"wav/{utt_id}.wav", voice.name, split, voice.gender))
        alignment_lines.append(utt_id + " " + " ".join(map(str, labels.tolist())))

    with manifest_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("id", "path", "speaker", "split", "gender"))
        writer.writerows(rows)
    (out_dir / "phones.txt").write_text("\n".join(alignment_lines) + "\n", encoding="utf-8")
    (out_dir / "phone_set.txt").write_text("\n".join(p.name for p in PHONES[:n_phones]) + "\n",
                                           encoding="utf-8")
    info = dict(version=corpus_version(), key=corpus_key(**params), params=params,
                sample_rate=SAMPLE_RATE, frame_hop=FRAME_HOP,
                phone_set=[p.name for p in PHONES[:n_phones]],
                speakers=[{k: v for k, v in asdict(v).items() if k != "accent"} for v in voices])
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# defined last, so that every function it hashes exists
CORPUS_VERSION: str = corpus_version()
"""The generator's version at import (see `corpus_version`); recorded in `corpus.json`."""
