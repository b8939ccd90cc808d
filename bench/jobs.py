"""A long script as one durable job vs the seed client's pattern, side by side in one run; and
what the jobs consumer adds to an application's start.

    python -m bench.jobs                    # tiny checkpoint on CPU, embedded filesystem broker
    python -m bench.jobs --redis-url redis://127.0.0.1:6379/0 --chars 20000

On a local Ray and app (127.0.0.1): **start** times `serve.run` with jobs off and on, alternating,
`--starts` times each. **one job** is `POST /v1/jobs` with the whole script, polled every 0.1 s,
then its audio fetched. **seed client** cuts the script into pieces of at most 180 characters at
sentences and sends each to `POST /v1/tts` in turn, joining the WAVs. Time to first progress: the
first poll showing a finished chunk, or the first piece's answer. Equal work: the service cuts the
job at `CLIENT_PIECE_CHARS` too, with the same seeds on the same replicas; the job differs only in
how chunks reach the model (`jobs.max_chunks_in_flight` at once, no HTTP round trip each) and in
joining them server-side.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time

import httpx
import numpy as np
import soundfile as sf
from ray import serve

from bench.local_serve import local_serve
from serve_app.app import build_app
from serve_app.config import AppArgs
from serve_app.synthesis.chunking import split_text
from tests.text_samples import SENTENCES

CLIENT_PIECE_CHARS = 180  # what the seed client sends per request
APP = "bench-jobs"


def script(chars: int) -> str:
    """A narration of about `chars` characters: sentences in paragraphs of about 1,000."""
    paragraphs, sentences, total = [], [], 0
    while total < chars:
        sentence = SENTENCES[len(sentences) % len(SENTENCES)]
        sentences.append(sentence)
        total += len(sentence) + 1
        if sum(len(s) + 1 for s in sentences) > 1000:
            paragraphs.append(" ".join(sentences))
            sentences = []
    return "\n\n".join([*paragraphs, " ".join(sentences)]).strip()


def one_job(url: str, text: str, seed: int) -> tuple[float, float, float]:
    """(time to first progress, wall time, audio seconds) of the script as one job."""
    start = time.perf_counter()
    answer = httpx.post(f"{url}/v1/jobs", json={"text": text, "seed": seed}, timeout=60)
    answer.raise_for_status()
    job_id = answer.json()["id"]
    first = None
    while True:
        status = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        if first is None and status["progress"]["chunks_done"] > 0:
            first = time.perf_counter() - start
        if status["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    assert status["status"] == "completed", status
    audio = httpx.get(f"{url}/v1/jobs/{job_id}/audio", timeout=60).content
    wall = time.perf_counter() - start
    return first or wall, wall, len(sf.read(io.BytesIO(audio))[0]) / 24_000


def seed_client(url: str, text: str, seed: int) -> tuple[float, float, float]:
    """(time to first progress, wall time, audio seconds) of the client-side pattern."""
    pieces = [chunk.text for chunk in split_text(text, CLIENT_PIECE_CHARS)]
    start = time.perf_counter()
    first = None
    wavs = []
    for i, piece in enumerate(pieces):
        answer = httpx.post(f"{url}/v1/tts", json={"text": piece, "seed": seed + i}, timeout=300)
        answer.raise_for_status()
        wavs.append(sf.read(io.BytesIO(base64.b64decode(answer.json()["audio_base64"])), dtype="float32")[0])
        first = first or time.perf_counter() - start
    joined = np.concatenate(wavs)
    buffer = io.BytesIO()
    sf.write(buffer, joined, 24_000, format="WAV", subtype="PCM_16")
    return first, time.perf_counter() - start, len(joined) / 24_000


def app_args(args: argparse.Namespace, jobs_dir: str, enabled: bool) -> AppArgs:
    jobs = {"enabled": enabled, "dir": jobs_dir, "max_text_chars": max(args.chars * 2, 200_000)}
    if args.redis_url:
        jobs["broker_url"] = args.redis_url
    if args.job_chunks_in_flight:
        jobs["max_chunks_in_flight"] = args.job_chunks_in_flight
    return AppArgs(
        model=args.model,
        device=args.device,
        model_num_cpus=0,
        max_batch_size=args.max_batch_size,
        max_new_tokens=args.max_new_tokens,
        ingress={"num_cpus": 0},
        stitcher={"num_cpus": 0},
        limits={"max_text_chars": args.chars * 2},
        # The job is cut as the client cuts: the same chunks, so both do the same model work.
        chunking={"max_chunk_chars": CLIENT_PIECE_CHARS},
        jobs=jobs,
        shutdown={"graceful_shutdown_wait_loop_s": 0.1, "graceful_shutdown_timeout_s": 1},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chars", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--job-chunks-in-flight", type=int, default=None, help="jobs.max_chunks_in_flight")
    parser.add_argument("--redis-url", default=None, help="default: the embedded filesystem broker")
    parser.add_argument("--starts", type=int, default=2)
    args = parser.parse_args()

    with local_serve() as port:
        url = f"http://127.0.0.1:{port}"
        jobs_dir = tempfile.mkdtemp(prefix="bench-jobs-")
        starts: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.starts):
            for enabled in (False, True):
                begin = time.perf_counter()
                serve.run(build_app(app_args(args, jobs_dir, enabled)), name=APP, route_prefix="/")
                starts[enabled].append(time.perf_counter() - begin)
                if not (enabled and _ == args.starts - 1):
                    serve.delete(APP)
        text = script(args.chars)
        httpx.post(f"{url}/v1/tts", json={"text": "Warm up.", "seed": 0}, timeout=300).raise_for_status()
        job = one_job(url, text, args.seed)
        client = seed_client(url, text, args.seed)

    broker = "Redis" if args.redis_url else "embedded filesystem broker"
    print(
        f"\nmodel={args.model} device={args.device} max_batch_size={args.max_batch_size} "
        f"max_new_tokens={args.max_new_tokens} jobs.max_chunks_in_flight={args.job_chunks_in_flight}; "
        f"{len(text)}-character script; {broker}\n"
    )
    print("| way | time to first progress (s) | wall time (s) | audio (s) | wall / one job |")
    print("|---|---:|---:|---:|---:|")
    for name, (first, wall, audio) in (
        ("one job (`POST /v1/jobs`)", job),
        (f"seed client ({CLIENT_PIECE_CHARS}-char pieces, one at a time)", client),
    ):
        print(f"| {name} | {first:.2f} | {wall:.1f} | {audio:.1f} | {wall / job[1]:.2f} |")
    print("\n| application start | runs | median (s) |\n|---|---:|---:|")
    for enabled in (False, True):
        runs = starts[enabled]
        print(f"| jobs {'on' if enabled else 'off'} | {len(runs)} | {statistics.median(runs):.2f} |")


if __name__ == "__main__":
    main()
