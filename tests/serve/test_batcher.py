"""The model replica's batcher (pure asyncio; no Ray, no model)."""

import asyncio

import pytest

from serve_app.batcher import Batcher


def request_of(chunk: str) -> str:
    """Chunk names here are "<request>.<index>" (or bare names, one request each)."""
    return chunk.split(".")[0]


class SlowModel:
    """Takes `seconds` per batch and records every batch it ran."""

    def __init__(self, seconds: float, fail_on: str | None = None) -> None:
        self.seconds = seconds
        self.fail_on = fail_on
        self.batches: list[list[str]] = []

    async def run(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise RuntimeError("CUDA error: device-side assert")
        return [item.upper() for item in items]


def test_items_that_arrive_during_a_batch_join_the_next_one():
    async def scenario() -> tuple[list[str], list[list[str]]]:
        model = SlowModel(seconds=0.3)
        batcher = Batcher(model.run, owner=str, max_batch_size=8, wait_s=0.05)
        first = asyncio.create_task(batcher.submit("c0"))
        await asyncio.sleep(0.1)  # c0's batch is running
        later = []
        for i in range(1, 11):  # one at a time, as requests arrive under steady load
            later.append(asyncio.create_task(batcher.submit(f"c{i}")))
            await asyncio.sleep(0.01)
        return await asyncio.gather(first, *later), model.batches

    outcomes, batches = asyncio.run(scenario())
    assert outcomes == [f"C{i}" for i in range(11)]
    assert batches == [["c0"], [f"c{i}" for i in range(1, 9)], ["c9", "c10"]]


def test_a_failed_batch_fails_its_items_and_cancelled_items_are_dropped():
    async def scenario() -> tuple[list, list[list[str]]]:
        model = SlowModel(seconds=0.05, fail_on="bad")
        batcher = Batcher(model.run, owner=str, max_batch_size=2, wait_s=0.0)
        tasks = [asyncio.create_task(batcher.submit(item)) for item in ("a", "bad", "gone", "c")]
        await asyncio.sleep(0)
        tasks[2].cancel()  # its client hung up before its batch formed
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        batcher.max_batch_size = 1  # reconfigure between batches
        outcomes.append(await batcher.submit("d"))
        assert batcher.dropped == 1
        return outcomes, model.batches

    outcomes, batches = asyncio.run(scenario())
    assert batches == [["a", "bad"], ["c"], ["d"]]
    assert isinstance(outcomes[0], RuntimeError) and outcomes[0] is outcomes[1]
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert outcomes[3:] == ["C", "D"]


@pytest.mark.parametrize("outcomes", [[], ["A", "B", "C"]])
def test_a_run_that_returns_the_wrong_count_fails_its_batch(outcomes):
    async def run(items: list[str]) -> list[str]:
        return outcomes

    async def scenario() -> list:
        batcher = Batcher(run, owner=str, max_batch_size=2, wait_s=0.0)
        return await asyncio.gather(batcher.submit("a"), batcher.submit("b"))

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "2 items gave" in str(r) for r in results)


def test_batches_take_requests_in_turn_so_a_short_one_is_not_queued_behind_a_long_one():
    async def scenario() -> tuple[list[list[str]], list[str]]:
        model = SlowModel(seconds=0.2)
        batcher = Batcher(model.run, owner=request_of, max_batch_size=4, wait_s=0.0)
        finished: list[str] = []

        async def request(name: str, n_chunks: int) -> None:
            await asyncio.gather(*(batcher.submit(f"{name}.{i}") for i in range(n_chunks)))
            finished.append(name)

        long = asyncio.create_task(request("long", 12))
        await asyncio.sleep(0.1)  # long.0-3 are running, long.4-11 wait
        await asyncio.gather(request("short", 1), request("mid", 3), long)
        return model.batches, finished

    batches, finished = asyncio.run(scenario())
    assert batches == [
        ["long.0", "long.1", "long.2", "long.3"],
        ["long.4", "short.0", "mid.0", "long.5"],  # one chunk of each request in turn
        ["mid.1", "long.6", "mid.2", "long.7"],
        ["long.8", "long.9", "long.10", "long.11"],
    ]
    assert finished == ["short", "mid", "long"]
