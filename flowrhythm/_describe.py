"""Describe a flow's configuration: a text outline and a Mermaid diagram."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._callables import StageCallable, callable_name
from .scaling import ScalingStrategy

if TYPE_CHECKING:
    from ._flow import Flow
    from ._plan import StagePlan


def describe(flow: Flow) -> str:
    """Return a plain-text outline of ``flow``: one line per part, in item order.

    Each stage line shows its kind, its name, the capacity of its input buffer and
    its scaling strategy::

        producer     numbers
        transformer  double   buffer 64  FixedScaling(workers=2)  ordered
        batch        batch    buffer 64  FixedScaling(workers=1)  max_size=10
        consumer     show     buffer 64  FixedScaling(workers=1)
        errors       on_error
    """
    producer = _text(_producer_name(flow)) or "(not set)"
    rows: list[tuple[str, ...]] = [("producer", producer)]
    for plan in flow._stage_plans():
        buffer = plan.buffer_size if plan.buffer_size is not None else flow._buffer_size
        strategy = plan.scaling if plan.scaling is not None else flow._default_scaling
        rows.append(
            (
                _kind(plan),
                _text(plan.name),
                f"buffer {buffer}",
                "  ".join([repr(strategy), *_options(plan)]),
            )
        )
    if flow._consumer is None:
        rows.append(("consumer", "(not set)"))
    handler = _handler_name(flow)
    rows.append(("errors", _text(handler) if handler else "logged (no error handler)"))
    # Align the columns of the stage rows; the others only align their second cell.
    widths = [
        max((len(row[i]) for row in rows if len(row) > i + 1), default=0)
        for i in range(3)
    ]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)
        ]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def to_mermaid(flow: Flow) -> str:
    """Return ``flow`` as a Mermaid ``flowchart LR`` definition.

    The producer and the consumer are rounded nodes; each stage shows its kind
    (unless a plain transformer), its scaling strategy in brief and its options;
    a dashed edge leads from every stage that can fail to the error handler.
    """
    plans = flow._stage_plans()
    lines = ["flowchart LR"]
    producer = _producer_name(flow) or "(not set)"
    lines.append(f'    producer(["{_label(producer, "producer")}"])')
    ids = []
    can_fail = []
    for number, plan in enumerate(plans, start=1):
        node = f"stage{number}"
        ids.append(node)
        strategy = plan.scaling if plan.scaling is not None else flow._default_scaling
        if plan.kind == "batch":
            # One task that calls nothing: no strategy to show, nothing can fail.
            label = _label(plan.name, "batch", *_options(plan))
        else:
            can_fail.append(node)
            kind = _kind(plan)
            shown = [] if kind in ("transformer", "consumer") else [kind]
            label = _label(plan.name, *shown, _brief(strategy), *_options(plan))
        if plan.kind == "consumer":
            lines.append(f'    {node}(["{label}"])')
        else:
            lines.append(f'    {node}["{label}"]')
    handler = _handler_name(flow)
    if handler:
        lines.append(f'    errors{{{{"{_label(handler, "error handler")}"}}}}')
    else:
        lines.append('    errors{{"logged<br/>no error handler"}}')
    previous = "producer"
    for node in ids:
        lines.append(f"    {previous} --> {node}")
        previous = node
    lines.extend(f"    {node} -.-> errors" for node in can_fail)
    return "\n".join(lines)


def _kind(plan: StagePlan) -> str:
    return "fan-out" if plan.fan_out else plan.kind


def _options(plan: StagePlan) -> list[str]:
    """``ordered``, ``timeout=2``, ``retry=Retry(...)``: the operator options set."""
    options = []
    for key, value in plan.options.items():
        if key == "fan_out":
            continue
        options.append(key if value is True else f"{key}={value!r}")
    return options


def _producer_name(flow: Flow) -> str | None:
    """The name of the flow's producer (``None`` when it has none)."""
    return flow._producer_name


def _handler_name(flow: Flow) -> str | None:
    handler: StageCallable | None = flow._error_handler
    if handler is None:
        return None
    obj = handler.fn if handler.fn is not None else handler.factory
    return callable_name(obj) or "error handler"


def _brief(strategy: ScalingStrategy) -> str:
    """``Fixed 2``, ``Utilization 1–16``: the strategy's kind and worker bounds."""
    kind = type(strategy).__name__
    kind = kind.removesuffix("Scaling") or kind
    low, high = strategy.min_workers, strategy.max_workers
    return f"{kind} {low}" if low == high else f"{kind} {low}–{high}"


def _text(name: str | None) -> str:
    """A name for the outline: as is when printable, else its repr."""
    if name is None:
        return ""
    return name if name.isprintable() else repr(name)


def _label(*lines: str) -> str:
    """A Mermaid node label: the lines, escaped, joined by line breaks."""
    return "<br/>".join(_escape(line) for line in lines)


def _escape(text: str) -> str:
    # Mermaid reads #name; and #number; as entities, and HTML in labels.
    text = text.replace("#", "#35;")
    for char, entity in (('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, entity)
    return " ".join(text.split())  # no line breaks or tabs inside a label
