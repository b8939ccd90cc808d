"""Command line: ``python -m chatterbox synthesize ...`` and ``python -m chatterbox download ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from chatterbox.constants import MAX_NEW_TOKENS, TURBO_REPO_ID
from chatterbox.errors import ModelNotAvailableError, TTSInputError
from chatterbox.sampling import SAMPLING_BOUNDS, SamplingParams

MAX_NEW_TOKENS_BOUNDS = SAMPLING_BOUNDS["max_new_tokens"]


def _synthesize(args: argparse.Namespace) -> None:
    from chatterbox.tts import TTSRequest, TurboTTS  # torch-heavy; `download` stays light

    if (args.text is None) == (args.text_file is None):
        raise TTSInputError("give exactly one of --text or --text-file", "text")
    texts = [args.text] if args.text is not None else _read_lines(args.text_file)
    tts = TurboTTS.from_pretrained(
        repo_id=args.repo, revision=args.revision, local_dir=args.checkpoint, device=args.device
    )
    voice = tts.prepare_voice(Path(args.voice).read_bytes()) if args.voice else None
    requests = [
        TTSRequest(
            text,
            voice=voice,
            sampling=SamplingParams(
                seed=None if args.seed is None else args.seed + i, max_new_tokens=args.max_new_tokens
            ),
        )
        for i, text in enumerate(texts)
    ]
    outputs = _output_paths(Path(args.out), len(texts))
    done = 0
    with tqdm(total=len(requests), unit="utt", disable=len(requests) == 1 or args.quiet) as progress:
        for wavs in tts.generate_batches(requests, batch_size=args.batch_size):
            for wav in wavs:
                sf.write(outputs[done], wav, tts.sample_rate, subtype="PCM_16")
                done += 1
            progress.update(len(wavs))
    if not args.quiet:
        print(f"wrote {done} file(s): {outputs[0]}" + (f" ... {outputs[-1]}" if done > 1 else ""))


def _read_lines(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise TTSInputError(f"{path} holds no text", "text_file")
    return lines


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:04d}{out.suffix or '.wav'}") for i in range(count)]


def _max_new_tokens(value: str) -> int:
    """``--max-new-tokens``, checked while parsing so that a bad one fails before the model loads."""
    if not value.isdigit() or not MAX_NEW_TOKENS_BOUNDS.contains(int(value)):
        raise argparse.ArgumentTypeError(
            f"must be an integer in {MAX_NEW_TOKENS_BOUNDS.interval()}, got {value!r}"
        )
    return int(value)


def _download(args: argparse.Namespace) -> None:
    from chatterbox.hub import download

    path = download(args.repo, revision=args.revision, local_dir=args.local_dir)
    print(f"{args.repo} is in {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chatterbox", description="Chatterbox Turbo text-to-speech"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synthesize", help="speak text into a WAV file (24 kHz, watermarked)")
    synth.add_argument("--text", help="the text to speak")
    synth.add_argument("--text-file", help="one utterance per line; writes OUT_0000.wav, OUT_0001.wav, ...")
    synth.add_argument(
        "--voice", help="reference clip (wav/flac/ogg/mp3, 5 s or more); default: built-in voice"
    )
    synth.add_argument("--out", required=True, help="output WAV path")
    synth.add_argument("--checkpoint", help="local checkpoint directory instead of the hub")
    synth.add_argument("--repo", default=TURBO_REPO_ID)
    synth.add_argument("--revision")
    synth.add_argument("--seed", type=int, help="seed for reproducible output (line i uses seed + i)")
    synth.add_argument(
        "--max-new-tokens",
        type=_max_new_tokens,
        default=MAX_NEW_TOKENS,
        help=f"speech tokens at most (25 per second), in {MAX_NEW_TOKENS_BOUNDS.interval()}",
    )
    synth.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    synth.add_argument("--batch-size", type=int, default=16, help="utterances per batch for --text-file")
    synth.add_argument("--quiet", action="store_true")
    synth.set_defaults(run=_synthesize)

    down = commands.add_parser(
        "download", help="fetch a checkpoint into the Hugging Face cache (image builds)"
    )
    down.add_argument("--repo", default=TURBO_REPO_ID)
    down.add_argument("--revision")
    down.add_argument("--local-dir", help="download into this directory instead of the cache")
    down.set_defaults(run=_download)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (TTSInputError, ModelNotAvailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
