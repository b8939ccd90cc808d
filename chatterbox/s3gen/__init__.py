"""S3Gen: speech tokens -> 24 kHz waveform (flow encoder, mean-flow decoder, HiFT vocoder)."""

from chatterbox.s3gen.s3gen import S3Gen, S3GenNoise, S3GenRequest, draw_noise

__all__ = ["S3Gen", "S3GenNoise", "S3GenRequest", "draw_noise"]
