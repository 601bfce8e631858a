"""The audio modality of scm-mm: log-mel spectrograms, vocoders, datasets, presets and `AudioSCM`.

    from scm_mm_audio import AudioSCM
    model = AudioSCM.load("runs/notes_scd", vocoder="runs/notes_vocoder")
    waves, sample_rate = model.generate(8, steps=2, seed=0)
    model.save("notes.wav")
"""

from typing import TYPE_CHECKING, Any

__all__ = ["AudioModality", "AudioSCM"]

if TYPE_CHECKING:
    from .api import AudioModality, AudioSCM


def __getattr__(name: str) -> Any:
    """The API on first use, so the mel code, presets and vocoder trainer import without soundfile or librosa."""
    if name in __all__:
        from . import api  # noqa: PLC0415

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
