import asyncio

from prefill_worker.inflight_prefixes import InflightPrefixes


def test_a_request_waits_for_blocks_another_is_computing_then_claims_them():
    async def scenario() -> list[str]:
        inflight = InflightPrefixes()
        events: list[str] = []
        first_claimed = asyncio.Event()

        async def first() -> None:
            async with inflight.claim([b"p0", b"p1", b"a2"]):
                events.append("first computes")
                first_claimed.set()
                await asyncio.sleep(0.01)
                events.append("first published")

        async def second() -> None:
            await first_claimed.wait()
            async with inflight.claim([b"p0", b"p1", b"b2"]) as claim:
                events.append("second looks up")
                claim.release_leading(2)  # the store had p0 and p1
                assert inflight.num_blocks == 1

        await asyncio.gather(first(), second())
        assert inflight.num_blocks == 0
        return events

    assert asyncio.run(scenario()) == [
        "first computes",
        "first published",
        "second looks up",
    ]


def test_blocks_found_in_the_store_are_released_before_the_compute():
    async def scenario() -> list[str]:
        inflight = InflightPrefixes()
        events: list[str] = []
        released = asyncio.Event()

        async def owner() -> None:
            async with inflight.claim([b"p0", b"x1"]) as claim:
                claim.release_leading(1)  # p0 was in the store
                released.set()
                await asyncio.sleep(0.01)
                events.append("owner done")

        async def reader() -> None:
            await released.wait()
            async with inflight.claim([b"p0"]):
                events.append("reader did not wait")

        await asyncio.gather(owner(), reader())
        return events

    assert asyncio.run(scenario()) == ["reader did not wait", "owner done"]


def test_a_cancelled_owner_releases_its_blocks():
    async def scenario() -> int:
        inflight = InflightPrefixes()

        async def owner() -> None:
            async with inflight.claim([b"p0"]):
                await asyncio.sleep(10)

        task = asyncio.ensure_future(owner())
        await asyncio.sleep(0)
        task.cancel()
        async with inflight.claim([b"p0"]):
            pass
        return inflight.num_blocks

    assert asyncio.run(asyncio.wait_for(scenario(), 2)) == 0
