"""Errors a caller can act on: each names what was wrong with the input and carries a stable code."""

from __future__ import annotations


class TTSInputError(ValueError):
    """Bad input from a caller; ``code`` is stable, ``field`` names the input at fault (if any)."""

    code = "invalid_parameter"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidAudioError(TTSInputError):
    code = "invalid_audio"


class VoiceTooShortError(TTSInputError):
    code = "voice_too_short"


class AudioTooLongError(TTSInputError):
    code = "audio_too_long"


class SilentAudioError(TTSInputError):
    code = "silent_audio"


class NonFiniteAudioError(TTSInputError):
    code = "nonfinite_audio"


class EmptyTextError(TTSInputError):
    code = "empty_text"


class TextTooLongError(TTSInputError):
    code = "text_too_long"


class ModelNotAvailableError(RuntimeError):
    """The weights are neither in the local cache nor downloadable; the message says how to fix it."""
