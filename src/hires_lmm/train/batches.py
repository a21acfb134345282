"""Deterministic global batches, split into per-rank micro-batches.

The order of samples is a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted run would, and N processes with gradient accumulation A see exactly the
samples one process sees with accumulation N·A (same global batch): global batch b is cut into
N·A micro-batches; rank r takes micro-batches ``a·N + r`` for a = 0..A-1.

The lengths they group by are counted as the model splices (:class:`ImagePlanner`,
:func:`count_lengths`): a composed method's compressed count, within the model's visual-token
budget. No torch is imported here until an image is rendered.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .errors import one_line

if TYPE_CHECKING:
    from ..data.records import Problem, Record
    from ..plan import Plan


class GlobalBatches:
    """Global batches of ``micro · world · accum`` sample indices per optimizer step.

    Args:
        lengths: per-sample sequence length (text + visual tokens), for length grouping.
        micro: samples per micro-batch (per process, per forward).
        world, rank, accum: processes, this process, gradient-accumulation steps.
        group_by_length: LLaVA's grouping: shuffle, cut into megabatches of one global batch,
            sort each by length (so padding is small), shuffle the order of batches.
    """

    def __init__(self, lengths: Sequence[int], micro: int, *, world: int = 1, rank: int = 0, accum: int = 1,
                 seed: int = 0, group_by_length: bool = True) -> None:
        if micro < 1 or accum < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError("micro, accum, world must be ≥ 1 and 0 ≤ rank < world")
        if not lengths:
            raise ValueError("no samples to train on")
        self.lengths = list(lengths)
        self.micro, self.world, self.rank, self.accum = micro, world, rank, accum
        self.seed, self.group_by_length = seed, group_by_length

    @property
    def global_batch(self) -> int:
        return self.micro * self.world * self.accum

    def epoch(self, epoch: int) -> list[list[int]]:
        """The global batches of an epoch. The last partial batch is filled by wrapping around, so
        every rank always gets full micro-batches (and tiny datasets still yield a batch)."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        idx = list(range(len(self.lengths)))
        rng.shuffle(idx)
        G, n = self.global_batch, len(idx)
        idx += [idx[k % n] for k in range(-n % G)]
        batches = [idx[i:i + G] for i in range(0, len(idx), G)]
        if self.group_by_length:
            batches = [sorted(b, key=lambda i: -self.lengths[i]) for b in batches]
            rng.shuffle(batches)
        return batches

    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def micro_batches(self, epoch: int, start: int = 0) -> Iterator[list[int]]:
        """This rank's micro-batches of ``epoch`` from global batch ``start`` on, in order
        (``accum`` consecutive micro-batches make one optimizer step)."""
        for batch in self.epoch(epoch)[start:]:
            chunks = [batch[j * self.micro:(j + 1) * self.micro] for j in range(self.world * self.accum)]
            for a in range(self.accum):
                yield chunks[a * self.world + self.rank]


# --- what a sample's length is: its text plus the visual tokens the model splices ---------------

class ImagePlanner:
    """Plans images as the model being trained splices them: a preset by its planner
    (:func:`~hires_lmm.plan.plan_image`), a composed method (``config.method_spec``, e.g.
    LLaVA-NeXT's views through UHD's spatial resampler) by its parts
    (:meth:`hires_lmm.parts.MethodSpec.plan`), as :meth:`hires_lmm.model.HiresLMM.plan` does; the
    model's ``plan_options`` (a visual-token budget among them) apply either way.

    Picklable (DataLoader workers render with :meth:`prepare`); counts are cached per size.
    """

    def __init__(self, method: str, plan_options: Mapping[str, Any] | None = None, *,
                 method_spec: Mapping[str, Any] | None = None, connector: Mapping[str, Any] | None = None) -> None:
        self.method = method
        self.plan_options = dict(plan_options or {})
        self.method_spec = dict(method_spec) if method_spec else None
        self.connector = dict(connector or {})
        self._spec: Any = None
        self._counts: dict[tuple[int, int], int] = {}

    @classmethod
    def of(cls, model: Any) -> ImagePlanner:
        """The planner of ``model`` (a :class:`~hires_lmm.model.HiresLMM`) as it is configured now."""
        c = model.config
        return cls(c.method, c.plan_options, method_spec=getattr(c, "method_spec", None),
                   connector=getattr(c, "connector", None))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_spec": None, "_counts": {}}

    @property
    def name(self) -> str:
        """The method as its plans name it (a composed method's spec name, e.g. ``llava-next+uhd-spatial``)."""
        return str(self.method_spec.get("name", self.method)) if self.method_spec else self.method

    def plan(self, size: tuple[int, int]) -> Plan:
        """The plan of an image of ``size`` = (width, height), with the count the model splices;
        a budget no plan fits raises :class:`~hires_lmm.plan.budget.BudgetError`."""
        if self.method_spec:
            if self._spec is None:
                from ..parts import spec_from_config

                self._spec = spec_from_config(SimpleNamespace(method=self.method, plan_options=self.plan_options,
                                                              method_spec=self.method_spec, connector=self.connector))
            return self._spec.plan(size, **self.plan_options)
        from ..plan import plan_image

        return plan_image(self.method, size, **self.plan_options)

    def num_visual_tokens(self, size: tuple[int, int]) -> int:
        """Visual tokens of an image of ``size`` (cached: a plan is pure geometry)."""
        n = self._counts.get(size)
        if n is None:
            n = self._counts[size] = int(self.plan(size).num_visual_tokens)
        return n

    def prepare(self, path: str) -> Any:
        """Load (safely), plan and render one image: the :class:`~hires_lmm.processing.ImageInput`
        the model is fed (a preset's exactly :func:`~hires_lmm.processing.prepare_image`'s)."""
        from ..processing import ImageInput, prepare_image

        if not self.method_spec:
            return prepare_image(path, self.method, self.plan_options)
        from ..image import load_image
        from ..image.render import render

        img = load_image(path)
        plan = self.plan(img.size)
        return ImageInput(plan, render(img, plan))


@dataclass
class Lengths:
    """What :func:`count_lengths` found: per record its length (``None`` for a bad one), the
    problems of the bad ones (over ``max_length``, or an image no plan fits the budget for) and
    which of those problems are budget refusals."""

    lengths: list[int | None]
    problems: list[Problem] = field(default_factory=list)
    budget_problems: list[Problem] = field(default_factory=list)


def count_lengths(records: Sequence[Record], text_lengths: Sequence[int], *, image_folder: str | None,
                  planner: ImagePlanner, max_length: int | None, num_workers: int = 8) -> Lengths:
    """Each record's sequence length, text tokens plus each image's visual tokens in place of its
    placeholder, counted by ``planner`` (the model's own planning: right for composed methods,
    within the model's budget), and checked against ``max_length``.

    ``text_lengths``: each record's tokenised length with one token per ``<image>``
    (:func:`~hires_lmm.data.records.validate`'s lengths when it counts no visual tokens); the
    records' images are known to be readable (validated). Image headers are read once per file,
    in threads.
    """
    from ..data.records import Problem, resolve_image
    from ..image.load import image_size
    from ..plan.budget import BudgetError

    paths = list(dict.fromkeys(resolve_image(image_folder, p) for r in records for p in r.images))

    def size_of(path: str) -> tuple[int, int] | str:
        try:
            return image_size(path)
        except (OSError, ValueError) as e:  # gone since validation (ImageLoadError is a ValueError)
            return f"image file {path!r}: {e}"

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        sizes = dict(zip(paths, pool.map(size_of, paths)))
    out = Lengths([])
    for r, n_text in zip(records, text_lengths):
        mine: list[Problem] = []
        visual = 0
        for p in r.images:
            size = sizes[resolve_image(image_folder, p)]
            if isinstance(size, str):
                mine.append(Problem(r.id, r.source, size))
                continue
            try:
                visual += planner.num_visual_tokens(size)
            except BudgetError as e:
                problem = Problem(r.id, r.source, one_line(e))
                mine.append(problem)
                out.budget_problems.append(problem)
        total = int(n_text) - len(r.images) + visual
        if not mine and max_length is not None and total > max_length:
            if r.images:
                mine.append(Problem(r.id, r.source, (
                    f"sequence of {total} tokens ({int(n_text) - len(r.images)} text + {visual} visual for "
                    f"{len(r.images)} image(s) with {planner.name}) exceeds max_length {max_length}")))
            else:
                mine.append(Problem(r.id, r.source, f"sequence of {total} text tokens exceeds max_length {max_length}"))
        out.problems += mine
        out.lengths.append(None if mine else total)
    return out
