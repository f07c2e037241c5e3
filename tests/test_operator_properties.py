"""Property tests for operators combined: random chains of 1-5 stages drawn from
plain maps, fan-outs, filters, batches and ordered maps/fan-outs, ending in a
consumer; with random failing items, flaky calls under ``Retry``, a stage whose
calls hang on some items under ``timeout=``, buffers from 0, and random cuts (run
to the end, drain, abort). Every run is checked against a pure-Python model of the
chain: what the consumer gets (and in which order, when every stage keeps order),
which items fail where and after how many attempts, and every stage's counters.

Each example runs in its own event loop (``anyio.run``), as in
``test_properties.py``. Time (timeouts, ``max_wait``) runs on a ``ManualClock``
under ``autojump()``: a hanging call times out as soon as everything else waits.

How the model stays exact: every value at a stage is unique (the producer's ints,
fan-out outputs ``(value, k)``, lists made by a batch), and whatever a stage does
with a value (fail, hang, be flaky ``k`` times, how many outputs, keep or drop) is
a hash of the scenario's seed, the stage and the value. A fan-out unbatches a list
(its outputs are the list's items). Where the grouping of a batch is not
deterministic (``max_wait``, a reordering stage before it, an abort), lists are
"neutral": no stage fails, hangs, filters or is flaky on a list, so the flattened
outcome is deterministic even though the lists are not.
"""

from __future__ import annotations

import re
import sys
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flowrhythm import FixedScaling, Flow, Retry
from flowrhythm._ordered import WINDOW_PER_WORKER
from flowrhythm.testing import ManualClock

BACKENDS: list[Any] = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform == "win32":
    del BACKENDS[1]

# max_examples comes from the profile loaded in conftest.py (25, or 400 in stress).
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=False,
)

#: a deadlock guard only (real seconds)
GUARD = 30
#: the per-attempt timeout of the stage that has one (ManualClock seconds)
TIMEOUT = 1.0


# -- scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    kind: str  # "map", "fanout", "filter", "batch" or "consumer"
    workers: int = 1
    ordered: bool = False
    buffer_size: int = 0
    #: 0: no item fails; n: about one item in n fails (a fan-out after j outputs)
    boom: int = 0
    #: some items fail their first 1 or 2 attempts
    flaky: bool = False
    #: timeout=TIMEOUT, and the call hangs on some items (a fan-out after j outputs)
    timeout: bool = False
    #: Retry(attempts, on=Flaky if flaky_only else Exception, backoff=0)
    retry: tuple[int, bool] | None = None
    #: for a batch
    max_size: int = 1
    max_wait: float | None = None

    @property
    def keeps_order(self) -> bool:
        return self.kind == "batch" or self.workers == 1 or self.ordered

    def retry_object(self) -> Retry | None:
        if self.retry is None:
            return None
        attempts, flaky_only = self.retry
        on: Any = Flaky if flaky_only else Exception
        return Retry(attempts=attempts, on=on, backoff=0, jitter=False)


@dataclass(frozen=True)
class Scenario:
    items: int
    stages: tuple[OpSpec, ...]  # the last one is the consumer
    seed: int
    #: None: run to the end; else (how, after how many stage calls)
    cut: tuple[str, int] | None

    @property
    def uses_time(self) -> bool:
        return any(s.timeout or s.max_wait is not None for s in self.stages)

    @property
    def aborting(self) -> bool:
        return self.cut is not None and self.cut[0].startswith("abort")

    def random_batch(self, index: int) -> bool:
        """Whether the grouping of the batch at ``index`` depends on timing."""
        spec = self.stages[index]
        return spec.kind == "batch" and (
            spec.max_wait is not None
            or not all(s.keeps_order for s in self.stages[:index])
        )

    @property
    def neutral_lists(self) -> bool:
        """Whether stages treat lists neutrally (see the module docstring)."""
        return self.aborting or any(
            self.random_batch(i) for i in range(len(self.stages))
        )

    def exact(self, index: int) -> bool:
        """Whether the items reaching stage ``index`` are known exactly."""
        return not any(self.random_batch(i) for i in range(index))


retries = st.one_of(st.none(), st.tuples(st.integers(1, 3), st.booleans()))


@st.composite
def op_specs(draw: st.DrawFn) -> OpSpec:
    kind = draw(st.sampled_from(["map", "fanout", "filter", "batch"]))
    buffer_size = draw(st.integers(0, 3))
    if kind == "batch":
        return OpSpec(
            "batch",
            buffer_size=buffer_size,
            max_size=draw(st.integers(1, 5)),
            max_wait=draw(st.one_of(st.none(), st.sampled_from([0.5, 1.5]))),
        )
    ordered = kind != "filter" and draw(st.booleans())
    # Mostly one worker where order is not kept, so the order check applies often.
    workers = st.integers(1, 8) if ordered else st.sampled_from([1, 1, 2, 3])
    return OpSpec(
        kind,
        workers=draw(workers),
        ordered=ordered,
        buffer_size=buffer_size,
        boom=draw(st.sampled_from([0, 2, 3] if kind == "fanout" else [0, 0, 3, 5])),
        flaky=draw(st.booleans()),
        retry=None if kind == "filter" else draw(retries),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    stages = draw(st.lists(op_specs(), min_size=1, max_size=5))
    stages.append(
        OpSpec(
            "consumer",
            workers=draw(st.sampled_from([1, 1, 2, 3])),
            buffer_size=draw(st.integers(0, 3)),
            boom=draw(st.sampled_from([0, 0, 4])),
            flaky=draw(st.booleans()),
            retry=draw(retries),
        )
    )
    timed = [i for i, spec in enumerate(stages) if spec.kind != "batch"]
    where = draw(st.one_of(st.none(), st.sampled_from(timed)))
    if where is not None:
        stages[where] = replace(stages[where], timeout=True)
    cut = draw(
        st.one_of(
            st.none(),
            st.tuples(
                st.sampled_from(
                    ["drain_inside", "drain_outside", "abort_inside", "abort_outside"]
                ),
                st.integers(0, 12),
            ),
        )
    )
    return Scenario(
        items=draw(st.integers(0, 24)),
        stages=tuple(stages),
        seed=draw(st.integers(0, 2**16)),
        cut=cut,
    )


# -- what each stage does with each value -----------------------------------------------


class Flaky(Exception):
    def __init__(self, stage: int) -> None:
        super().__init__(stage)
        self.stage = stage


class Boom(Exception):
    def __init__(self, stage: int) -> None:
        super().__init__(stage)
        self.stage = stage


@dataclass(frozen=True)
class Behaviour:
    """What stage ``index`` does with one value, on every attempt."""

    flaky: int  # the first ``flaky`` attempts raise Flaky
    hang_at: int | None  # then: the call hangs (a fan-out: after that many outputs)
    boom_at: int | None  # or raises Boom (a fan-out: after that many outputs)
    outputs: tuple[Any, ...]  # a fan-out's outputs
    keep: bool  # a filter's verdict
    pause: bool  # await a checkpoint first (varies the interleavings)


def behaviour(scenario: Scenario, index: int, value: Any) -> Behaviour:
    spec = scenario.stages[index]
    is_list = isinstance(value, list)
    # a fan-out unbatches a list; its outputs for other values are drawn below
    outputs = tuple(value) if is_list and spec.kind == "fanout" else ()
    h = zlib.crc32(f"{scenario.seed}/{index}/{value!r}".encode())
    if is_list and scenario.neutral_lists:
        return Behaviour(0, None, None, outputs, True, bool(h & 1))
    if spec.kind == "fanout" and not is_list:
        outputs = tuple((value, k) for k in range((h >> 1) % 4))
    steps = len(outputs) + 1  # a fan-out may stop before any output, or after each
    fails = spec.boom and (h >> 4) % spec.boom == 0
    hangs = spec.timeout and (h >> 8) % 3 == 0
    return Behaviour(
        flaky=(h >> 11) % 3 if spec.flaky else 0,
        hang_at=(h >> 14) % steps if hangs else None,
        boom_at=(h >> 18) % steps if fails else None,
        outputs=outputs,
        keep=(h >> 22) % 3 != 0,
        pause=bool(h & 1),
    )


def attempt(b: Behaviour, number: int) -> tuple[tuple[Any, ...], str | None]:
    """The model of one attempt: (outputs sent on, failure or None)."""
    if number <= b.flaky:
        return (), "Flaky"
    for step in range(len(b.outputs) + 1):
        if b.hang_at == step:
            return b.outputs[:step], "Timeout"
        if b.boom_at == step:
            return b.outputs[:step], "Boom"
    return b.outputs, None


# -- the model ----------------------------------------------------------------------------


@dataclass
class StageModel:
    received: int = 0
    processed: int = 0
    errors: int = 0
    emitted: int = 0
    filtered: int = 0
    retries: int = 0
    timeouts: int = 0


@dataclass
class Model:
    stages: list[StageModel] = field(default_factory=list)
    #: what the consumer consumed, in order
    consumed: list[Any] = field(default_factory=list)
    #: (stage, repr(item), failure, attempts made)
    errors: Counter[tuple[int, str, str, int]] = field(default_factory=Counter)


def run_model(scenario: Scenario, produced: int) -> Model:
    model = Model()
    values: list[Any] = list(range(produced))
    for index, spec in enumerate(scenario.stages):
        stage = StageModel(received=len(values))
        model.stages.append(stage)
        out: list[Any] = []
        if spec.kind == "batch":
            size = spec.max_size
            out = [values[i : i + size] for i in range(0, len(values), size)]
            stage.processed, stage.emitted = len(values), len(out)
            values = out
            continue
        retry = spec.retry
        for value in values:
            b = behaviour(scenario, index, value)
            failed = 0
            while True:
                sent, failure = attempt(b, failed + 1)
                if failure == "Timeout":
                    stage.timeouts += 1
                if failure is None:
                    break
                failed += 1
                if (
                    retry is not None
                    and not sent
                    and failed < retry[0]
                    and (failure == "Flaky" or not retry[1])
                ):
                    stage.retries += 1
                    continue
                break
            if spec.kind == "fanout":
                out.extend(sent)
                stage.emitted += len(sent)
            if failure is not None:
                stage.errors += 1
                model.errors[(index, repr(value), failure, failed)] += 1
                continue
            stage.processed += 1
            if spec.kind == "map":
                out.append(value)
                stage.emitted += 1
            elif spec.kind == "filter":
                if b.keep:
                    out.append(value)
                    stage.emitted += 1
                else:
                    stage.filtered += 1
            elif spec.kind == "consumer":
                model.consumed.append(value)
        values = out
    return model


def flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, list):
        for element in value:
            yield from flatten(element)
    else:
        yield value


def freeze(value: Any) -> Any:
    if isinstance(value, list):
        return ("list", tuple(freeze(element) for element in value))
    return value


def is_subsequence(short: list[Any], long: list[Any]) -> bool:
    remaining = iter(long)
    return all(any(x == y for y in remaining) for x in short)


# -- one run -----------------------------------------------------------------------------


async def run_scenario(scenario: Scenario) -> None:
    specs = scenario.stages
    names = [f"s{index}" for index in range(len(specs))]
    last = len(specs) - 1
    clock = ManualClock()
    flow = Flow(clock=clock)
    produced = 0
    consumed: list[Any] = []
    handled: Counter[tuple[int, str, str, int]] = Counter()
    odd_failures: list[BaseException] = []
    #: per stage: the values called (first attempts), attempts per value, outputs
    called: list[list[Any]] = [[] for _ in specs]
    attempts: list[Counter[str]] = [Counter() for _ in specs]
    yielded = [0] * len(specs)
    how, at = scenario.cut if scenario.cut is not None else ("none", -1)
    cut_fired = anyio.Event()
    cut_requested = False
    calls = 0

    async def produce() -> AsyncIterator[int]:
        nonlocal produced
        for i in range(scenario.items):
            produced += 1
            yield i

    async def start_call(index: int, value: Any) -> tuple[Behaviour, int]:
        """Count the call, fire the cut if it is due; return what to do."""
        nonlocal calls, cut_requested
        key = repr(value)
        attempts[index][key] += 1
        if attempts[index][key] == 1:
            called[index].append(value)
        calls += 1
        if calls == at + 1 and not cut_fired.is_set():
            cut_fired.set()
            if how.endswith("_inside"):
                cut_requested = True
                await flow.stop(drain=how.startswith("drain"))
        b = behaviour(scenario, index, value)
        if b.pause:
            await checkpoint()
        return b, attempts[index][key]

    def make_call(index: int) -> Any:
        kind = specs[index].kind

        async def call(value: Any) -> Any:
            b, number = await start_call(index, value)
            if number <= b.flaky:
                raise Flaky(index)
            if b.hang_at == 0:
                await anyio.sleep_forever()
            if b.boom_at == 0:
                raise Boom(index)
            if kind == "filter":
                return b.keep
            if kind == "consumer":
                consumed.append(value)
            return value

        async def fan_out(value: Any) -> AsyncIterator[Any]:
            b, number = await start_call(index, value)
            if number <= b.flaky:
                raise Flaky(index)
            for step in range(len(b.outputs) + 1):
                if b.hang_at == step:
                    await anyio.sleep_forever()
                if b.boom_at == step:
                    raise Boom(index)
                if step < len(b.outputs):
                    yielded[index] += 1
                    yield b.outputs[step]

        return fan_out if kind == "fanout" else call

    async def on_error(item: Any, exc: BaseException) -> None:
        if isinstance(exc, (Flaky, Boom)):
            stage, failure = exc.stage, type(exc).__name__
        elif isinstance(exc, TimeoutError) and (
            found := re.search(r"'s(\d+)' took longer than", str(exc))
        ):
            stage, failure = int(found.group(1)), "Timeout"
        else:
            odd_failures.append(exc)
            return
        made = 1
        notes = getattr(exc, "__notes__", [])
        if notes:
            assert len(notes) == 1, notes
            found = re.fullmatch(
                rf"flowrhythm: \w+ 's{stage}' gave up after (\d+) attempts", notes[0]
            )
            assert found is not None, notes
            made = int(found.group(1))
            assert made > 1
        handled[(stage, repr(item), failure, made)] += 1

    flow.set_producer(produce)
    for index, spec in enumerate(specs):
        options: dict[str, Any] = {"name": names[index]}
        options["buffer_size"] = spec.buffer_size
        if spec.kind == "batch":
            flow.add_batch(spec.max_size, max_wait=spec.max_wait, **options)
            continue
        options["scaling_strategy"] = FixedScaling(spec.workers)
        options["timeout"] = TIMEOUT if spec.timeout else None
        if spec.kind == "filter":
            flow.add_filter(make_call(index), **options)
            continue
        options["retry"] = spec.retry_object()
        if spec.kind == "consumer":
            flow.set_consumer(make_call(index), **options)
        else:
            flow.add_transformer(make_call(index), ordered=spec.ordered, **options)
    flow.set_error_handler(on_error)

    async def drive() -> None:
        nonlocal cut_requested
        async with anyio.create_task_group() as tg:
            await tg.start(flow.run)
            if how.endswith("_outside"):
                await _first_of(cut_fired, flow)
                if cut_fired.is_set() and flow.state != "finished":
                    cut_requested = True
                    await flow.stop(drain=how.startswith("drain"))

    with anyio.fail_after(GUARD):
        if scenario.uses_time:
            async with clock.autojump():
                await drive()
        else:
            await drive()

    # -- what must hold ----------------------------------------------------------------
    assert not odd_failures, odd_failures
    stats = flow.stats()
    _note_coverage(scenario, stats, cut_requested, handled)
    assert list(stats) == names
    aborted = cut_requested and scenario.aborting
    model = run_model(scenario, produced)
    assert stats[names[0]].received == produced
    if not cut_requested:
        assert produced == scenario.items

    for index, spec in enumerate(specs):
        stage = stats[names[index]]
        expected = model.stages[index]
        # conservation, and nothing left running
        assert stage.received == stage.processed + stage.errors + stage.dropped, stage
        assert stage.dropped >= 0, stage
        assert stage.total_workers() == 0, stage
        assert stage.reorder_window == 0, stage
        assert stage.throttled_waits == 0, stage
        if not aborted:
            assert stage.dropped == 0, stage
        # what each kind sends on: once the run is over, ``received`` counts every
        # item offered to a stage (those an abort cut included), so what a stage
        # sent on is exactly what the next one received
        if index < last:
            assert stage.emitted == stats[names[index + 1]].received, stage
        if spec.kind == "map":
            assert stage.processed == stage.emitted, stage
        if spec.kind == "consumer":
            assert stage.emitted == 0
            assert stage.processed == len(consumed)
        if spec.kind == "filter":
            assert stage.emitted == stage.processed - stage.filtered, stage
        else:
            assert stage.filtered == 0, stage
        if spec.kind == "fanout":
            if spec.ordered and aborted:
                # collected outputs still waiting for their turn are dropped
                assert stage.emitted <= yielded[index], stage
            else:
                assert stage.emitted == yielded[index], stage
        if spec.kind == "batch":
            assert stage.errors == 0, stage
            assert stage.retries == stage.timeouts == 0, stage
        # ordered stages: the window stays bounded
        if spec.ordered:
            assert stage.reorder_window_peak <= WINDOW_PER_WORKER * spec.workers
            assert (stage.reorder_window_peak > 0) == (len(called[index]) > 0)
        else:
            assert stage.reorder_window_peak == 0, stage
        # every item taken was called (an abort may cut items still queued)
        if spec.kind != "batch":
            if aborted:
                assert len(called[index]) <= stage.received, stage
            else:
                assert len(called[index]) == stage.received, stage
        # errors are the handler's calls
        assert stage.errors == sum(
            count for (where, *_), count in handled.items() if where == index
        )
        # against the model
        if aborted:
            assert stage.errors <= expected.errors, (stage, expected)
            assert stage.retries <= expected.retries, (stage, expected)
            assert stage.timeouts <= expected.timeouts, (stage, expected)
            assert stage.filtered <= expected.filtered, (stage, expected)
            continue
        assert stage.errors == expected.errors, (stage, expected)
        assert stage.retries == expected.retries, (stage, expected)
        assert stage.timeouts == expected.timeouts, (stage, expected)
        assert stage.filtered == expected.filtered, (stage, expected)
        if scenario.exact(index):
            assert stage.received == expected.received, (stage, expected)
            assert stage.processed == expected.processed, (stage, expected)
            if not scenario.random_batch(index):
                assert stage.emitted == expected.emitted, (stage, expected)

    # batches: every list has 1..max_size items; none is lost on the way
    for index, spec in enumerate(specs):
        if spec.kind == "batch" or index == 0 or specs[index - 1].kind != "batch":
            continue
        sizes = _batch_sizes(specs, index)
        for value in called[index]:
            _check_batch(value, sizes)
        batch = stats[names[index - 1]]
        if not aborted:
            assert len(called[index]) == batch.emitted
            assert sum(len(value) for value in called[index]) == batch.processed

    # failures: each item failed where, how and after as many attempts as modelled
    if aborted:
        assert not handled - model.errors, (handled, model.errors)
    else:
        assert handled == model.errors

    # the consumer's output; in the model's order when every stage keeps order (a
    # consumer with several workers calls in no defined order, so it must have one)
    keeps_order = (
        all(spec.keeps_order for spec in specs[:-1]) and specs[-1].workers == 1
    )
    flat_got = [atom for value in consumed for atom in flatten(value)]
    flat_expected = [atom for value in model.consumed for atom in flatten(value)]
    if aborted:
        assert not Counter(flat_got) - Counter(flat_expected)
        if keeps_order:
            assert is_subsequence(flat_got, flat_expected), (flat_got, flat_expected)
    elif scenario.neutral_lists:
        assert Counter(flat_got) == Counter(flat_expected)
        if keeps_order:
            assert flat_got == flat_expected
    else:
        assert Counter(map(freeze, consumed)) == Counter(map(freeze, model.consumed))
        if keeps_order:
            assert consumed == model.consumed


def _note_coverage(
    scenario: Scenario,
    stats: Any,
    cut_requested: bool,
    handled: Counter[tuple[int, str, str, int]],
) -> None:
    """Label the example for ``--hypothesis-show-statistics``."""
    event(f"cut: {scenario.cut[0] if cut_requested and scenario.cut else 'none'}")
    totals = Counter[str]()
    for stage in stats.values():
        for counter in ("dropped", "retries", "timeouts", "filtered", "errors"):
            totals[counter] += getattr(stage, counter) > 0
    for counter, stages in totals.items():
        event(f"{counter} > 0: {bool(stages)}")
    event(f"neutral lists: {scenario.neutral_lists}")
    event(f"gave up after retries: {any(made > 1 for *_, made in handled)}")


def _batch_sizes(specs: tuple[OpSpec, ...], index: int) -> list[int]:
    """The max_size of the batches right before stage ``index``, outermost first."""
    sizes = []
    while index > 0 and specs[index - 1].kind == "batch":
        index -= 1
        sizes.append(specs[index].max_size)
    return sizes


def _check_batch(value: Any, sizes: list[int]) -> None:
    if not sizes:
        return
    assert isinstance(value, list), value
    assert 1 <= len(value) <= sizes[0], (value, sizes)
    for element in value:
        _check_batch(element, sizes[1:])


async def _first_of(event: anyio.Event, flow: Flow) -> None:
    """Return once ``event`` is set or the flow has ended, whichever comes first."""
    async with anyio.create_task_group() as tg:

        async def on_event() -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        async def on_end() -> None:
            await flow.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(on_event)
        tg.start_soon(on_end)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(scenario=scenarios())
def test_operator_chains_match_the_model(
    backend: tuple[str, dict[str, Any]], scenario: Scenario
) -> None:
    name, options = backend
    anyio.run(partial(run_scenario, scenario), backend=name, backend_options=options)
