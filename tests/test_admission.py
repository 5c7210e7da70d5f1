"""Admission by a memory budget: the budget itself (FIFO, waiting bound, cancellation), the cost model
against a real decode, the gateway (a request waits for memory and is admitted when the earlier one
finishes; larger than the whole budget is 413) and the batch job (items wait for memory, never more in
flight than fit). Nothing here is timed: waiting is observed through the budget's own state."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import serve_in_thread
from PIL import Image

from cleanplate import admission, imaging
from cleanplate.admission import MemoryBudget, removal_cost
from cleanplate.batch import InProcessBackend, ItemOptions, load_items, read_report, run_batch
from cleanplate.engines import TorchEngine
from cleanplate.errors import InputError, QueueFull
from cleanplate.remover import RemovalRequest, composite, prepare
from cleanplate.serving.app import create_app
from cleanplate.serving.settings import Settings

MiB = admission.MiB


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


# -- the budget --------------------------------------------------------------------------------------------
def test_budget_waits_in_order_and_admits_when_memory_comes_back() -> None:
    async def scenario() -> list[str]:
        drained: list[int] = []
        budget = MemoryBudget(100, max_waiting=2, on_drain=lambda: drained.append(budget.in_use))
        order: list[str] = []
        release_a = asyncio.Event()

        async def hold(name: str, cost: int, until: asyncio.Event | None = None) -> None:
            async with budget.reserve(cost):
                order.append(name)
                if until is not None:
                    await until.wait()

        a = asyncio.create_task(hold("a", 70, release_a))
        await asyncio.sleep(0)
        assert budget.in_use == 70 and order == ["a"]
        b = asyncio.create_task(hold("b", 60))  # does not fit next to a
        c = asyncio.create_task(hold("c", 10))  # would fit, but waits behind b (FIFO: b is never starved)
        for _ in range(5):
            await asyncio.sleep(0)
        assert order == ["a"] and budget.waiting == 2
        with pytest.raises(QueueFull):  # the waiting queue is bounded
            async with budget.reserve(1):
                pass
        release_a.set()
        await asyncio.gather(a, b, c)
        assert budget.in_use == 0 and budget.waiting == 0 and drained and drained[-1] == 0
        return order

    assert asyncio.run(scenario()) == ["a", "b", "c"]


def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_the_next() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        release = asyncio.Event()
        admitted: list[str] = []

        async def hold(name: str, cost: int) -> None:
            async with budget.reserve(cost):
                admitted.append(name)
                await release.wait()

        first = asyncio.create_task(hold("first", 50))
        await asyncio.sleep(0)
        big = asyncio.create_task(hold("big", 80))  # waits
        small = asyncio.create_task(hold("small", 40))  # fits, but behind big
        for _ in range(3):
            await asyncio.sleep(0)
        assert admitted == ["first"]
        big.cancel()  # e.g. the request's deadline passed while it waited
        for _ in range(3):
            await asyncio.sleep(0)
        assert admitted == ["first", "small"] and budget.in_use == 90 and budget.waiting == 0
        release.set()
        await asyncio.gather(first, small)
        with pytest.raises(asyncio.CancelledError):
            await big
        assert budget.in_use == 0

    asyncio.run(scenario())


def test_a_cost_over_the_whole_budget_is_refused_at_once() -> None:
    budget = MemoryBudget(10 * MiB)
    with pytest.raises(InputError) as err:
        budget.check(11 * MiB)
    assert err.value.code == "over_budget" and "11 MiB" in str(err.value) and "10 MiB" in str(err.value)
    with pytest.raises(InputError):
        MemoryBudget(0)


def test_cost_model_bounds_a_real_decode() -> None:
    """The header-only estimate covers the pixels a decode really makes (2 native copies + extra)."""
    rng = np.random.default_rng(0)
    for shape, mode in [((300, 500, 3), "RGB"), ((300, 500, 4), "RGBA"), ((300, 500), "L")]:
        data = png(rng.integers(0, 256, shape, dtype=np.uint8))
        header = imaging.read_header(data)
        decoded = imaging.decode_image(data)
        native = decoded.pixels.nbytes + (0 if decoded.alpha is None else decoded.alpha.nbytes)
        assert (header.width, header.height) == (500, 300), mode
        assert header.channels * header.bytes_per_sample * header.pixels == native, mode
        cost = removal_cost(header, encoded_bytes=len(data))
        assert cost >= 2 * native + 2 * len(data) + admission.EXTRA_BYTES_PER_PIXEL * header.pixels
        # and it bounds what a whole removal really allocates (numpy's buffers, traced; Pillow's are not)
        mask = np.zeros((300, 500), bool)
        mask[100:200, 150:350] = True
        tracemalloc.start()
        try:
            image = imaging.decode_image(data)
            req = RemovalRequest(image, mask)
            prep = prepare(req, 64, 2)
            imaging.encode_image(composite(req, prep, prep.crop), image)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak <= cost, (mode, peak, cost)


# -- the gateway ------------------------------------------------------------------------------------------
class HeldEngine(TorchEngine):
    """The real torch engine whose model work waits for ``release``; records the budget in use meanwhile."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.release = threading.Event()
        self.seen_in_use: list[int] = []
        self.budget: MemoryBudget | None = None

    def _run_inpaint(self, items):
        assert self.budget is not None
        self.seen_in_use.append(self.budget.in_use)
        self.release.wait(60)
        return super()._run_inpaint(items)


async def until(condition, limit_s: float = 120.0) -> None:
    """Poll ``condition``; fail (not hang) if it never holds."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_gateway_holds_a_request_until_the_earlier_one_frees_its_memory(gated_bundle: Path, photos) -> None:
    img = np.ascontiguousarray(np.tile(photos["coffee"], (2, 2, 1)))  # 800x1200 RGB: ~15 MiB of working memory
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[150:210, 250:350] = 255
    one = removal_cost(imaging.read_header(png(img)), extra_images=(imaging.read_header(png(mask)),),
                       encoded_bytes=len(png(img)) + len(png(mask)))
    budget_mib = int(np.ceil(1.5 * one / MiB))  # room for one such request, not two
    settings = Settings(bundle=gated_bundle, torch_threads=1, memory_budget_mib=max(budget_mib, 16))
    assert one <= settings.memory_budget_bytes < 2 * one, "pick a bigger photo: the budget's floor is 16 MiB"
    engine = HeldEngine(gated_bundle, torch_threads=1)
    app = create_app(settings, engine=engine)
    engine.budget = app.state.budget
    files = {"image": png(img), "mask": png(mask)}

    with serve_in_thread(app) as url:
        async def two() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                first = asyncio.create_task(client.post(url + "/v1/remove", files=files))
                await until(lambda: bool(engine.seen_in_use))  # the first is in the model, holding its memory
                second = asyncio.create_task(client.post(url + "/v1/remove", files=files))
                await until(lambda: app.state.budget.waiting == 1)  # the second waits for memory, not the model
                assert metric(url, "cleanplate_admission_waiting") == 1
                assert metric(url, "cleanplate_memory_reserved_bytes") == app.state.budget.in_use
                engine.release.set()
                return list(await asyncio.gather(first, second))

        rs = asyncio.run(two())
        assert [r.status_code for r in rs] == [200, 200]
        assert engine.seen_in_use == [one, one]  # never both admitted
        assert app.state.budget.in_use == 0 and metric(url, "cleanplate_memory_budget_bytes") == budget_mib * MiB


def test_gateway_refuses_a_request_larger_than_its_whole_budget(gated_bundle: Path, photos) -> None:
    big = np.ascontiguousarray(np.tile(photos["astronaut"], (3, 3, 1)))  # 1536x1536: ~27 MiB to remove
    mask = np.zeros(big.shape[:2], np.uint8)
    mask[100:200, 100:200] = 255
    settings = Settings(bundle=gated_bundle, torch_threads=1, memory_budget_mib=16)
    with serve_in_thread(create_app(settings)) as url:
        r = httpx.post(url + "/v1/remove", files={"image": png(big), "mask": png(mask)}, timeout=60)
        assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
        body = r.json()
        assert body["code"] == "over_budget" and "16 MiB" in body["detail"] and "send a smaller image" in body["detail"]
        small = np.ascontiguousarray(big[:400, :600])
        ok = httpx.post(url + "/v1/remove", files={"image": png(small), "mask": png(mask[:400, :600])}, timeout=60)
        assert ok.status_code == 200


def test_budget_follows_the_memory_limit() -> None:
    assert Settings().memory_budget_bytes == 1024 * MiB
    assert Settings(memory_limit_mib=4096).memory_budget_bytes == 3072 * MiB
    assert Settings(memory_limit_mib=4096, memory_reserve_mib=512).memory_budget_bytes == 3584 * MiB
    assert Settings(memory_limit_mib=1100).memory_budget_bytes == 256 * MiB  # floor
    assert Settings(memory_limit_mib=4096, memory_budget_mib=100).memory_budget_bytes == 100 * MiB


# -- the batch job ------------------------------------------------------------------------------------------
class CountingBackend(InProcessBackend):
    """Counts items between load (decode) and finish (encode): the ones holding decoded pixels."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.lock = threading.Lock()
        self.holding = self.peak = 0

    def load(self, item, mask_channel):
        with self.lock:
            self.holding += 1
            self.peak = max(self.peak, self.holding)
        time.sleep(0.05)  # widen the window in which a second decode could overlap (not a timing assert)
        return super().load(item, mask_channel)

    def finish(self, item, loaded, inferred):
        data = super().finish(item, loaded, inferred)
        with self.lock:
            self.holding -= 1
        return data


def test_batch_items_wait_for_memory_and_an_oversized_item_fails_alone(gated_bundle: Path, photos,
                                                                       tmp_path: Path) -> None:
    src, masks = tmp_path / "photos", tmp_path / "masks"
    src.mkdir()
    masks.mkdir()
    mask = np.zeros((400, 600), np.uint8)
    mask[150:210, 250:350] = 255
    for i in range(5):
        Image.fromarray(np.roll(photos["coffee"], 7 * i, axis=1)).save(src / f"p{i}.png")
        Image.fromarray(mask).save(masks / f"p{i}.png")
    Image.fromarray(np.ascontiguousarray(np.tile(photos["astronaut"], (2, 2, 1)))).save(src / "huge.png")
    Image.fromarray(np.pad(mask, ((0, 624), (0, 424)))).save(masks / "huge.png")
    items = load_items(src, masks=masks)
    assert len(items) == 6

    from cleanplate.engines import make_engine

    backend = CountingBackend(make_engine(Settings(bundle=gated_bundle, torch_threads=1)))
    one = backend.cost(next(i for i in items if i.key == "p0.png"), "luma")
    huge = backend.cost(next(i for i in items if i.key == "huge.png"), "luma")
    budget = int(1.5 * one)
    assert huge > budget
    result = asyncio.run(run_batch(items, backend, tmp_path / "out", concurrency=4, memory_budget_bytes=budget,
                                   defaults=ItemOptions(quality_gate=False), handle_signals=False))
    records, _ = read_report(tmp_path / "out" / "report.jsonl")
    by_key = {r["key"]: r for r in records}
    assert result.ok == 5 and result.errors == 1
    assert by_key["huge.png"]["error"]["code"] == "over_budget"
    assert backend.peak == 1  # with room for one item, decodes never overlap although concurrency is 4
    assert all((tmp_path / "out" / f"p{i}.png").is_file() for i in range(5))
