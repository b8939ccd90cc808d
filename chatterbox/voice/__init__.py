"""Voices: reference decoding, the three front ends (speech tokenizer, voice encoder, CAMPPlus) and
the conditioning that turns a reference clip into a ``Voice``."""

from chatterbox.voice.reference import ReferenceAudio, decode_reference_audio, reference_from_array
from chatterbox.voice.voice import Voice, VoiceConditionals

__all__ = ["ReferenceAudio", "Voice", "VoiceConditionals", "decode_reference_audio", "reference_from_array"]
