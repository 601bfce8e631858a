"""The audio modality of scm-mm: log-mel spectrograms, vocoders, datasets, presets and `AudioSCM`.

    from scm_mm_audio import AudioSCM
    model = AudioSCM.load("runs/notes_scd", vocoder="runs/notes_vocoder")
    waves, sample_rate = model.generate(8, steps=2, seed=0)
    model.save("notes.wav")
"""

from .api import AudioModality, AudioSCM

__all__ = ["AudioModality", "AudioSCM"]
