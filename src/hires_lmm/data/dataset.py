"""A map-style dataset of LLaVA records for :class:`~hires_lmm.model.HiresLMM`, its collate
function, and LLaVA's length-grouped sampler with a per-rank split.

Samples are per-sample 1-D tensors (no padding here): ``HiresLMM.build_inputs`` splices the visual
tokens and pads, so the collate function only gathers lists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from transformers import PreTrainedTokenizerBase

from ..image import ImageLoadError
from ..text import IMAGE_TOKEN
from .records import DataError, Record, VisualTokenCounter, check_image, contained_image, resolve_image
from .templates import ChatTemplate, TemplateError, check_alignment, get_template, single_token_id


class LlavaDataset(Dataset):
    """LLaVA records → token ids, labels and image paths.

    Args:
        records: from :func:`~hires_lmm.data.records.load_records` (run
            :func:`~hires_lmm.data.records.validate` first: a bad record raises here, mid-epoch).
        image_folder: the folder the records' relative image paths are in.
        tokenizer: the LLM's tokenizer (with its ``<image>`` token).
        template: a :class:`ChatTemplate` or its name.
        model_prepare: optional ``path -> ImageInput`` (e.g. ``model.prepare_image``): when given,
            items also carry ``image_inputs`` (loaded, planned and rendered in the DataLoader's
            workers). A bound method of a HiresLMM also supplies ``method``/``plan_options``/``method_spec``.
        method, plan_options: the method whose plan counts visual tokens for :meth:`lengths`.
        method_spec: a composed method (a config's ``method_spec``): :meth:`lengths` counts the
            tokens its parts splice (:class:`~hires_lmm.data.records.VisualTokenCounter`).
        add_bos: as :meth:`ChatTemplate.encode` (None: as the tokenizer does).
        check: run :func:`check_alignment` on every item (one extra tokenisation).
        lengths: precomputed lengths (e.g. ``ValidationReport.lengths`` for its ``ok_records``).
    """

    def __init__(self, records: Sequence[Record], *, image_folder: str | os.PathLike | None,
                 tokenizer: PreTrainedTokenizerBase, template: str | ChatTemplate,
                 model_prepare: Callable[[str], Any] | None = None, method: str | None = None,
                 plan_options: Mapping[str, Any] | None = None, add_bos: bool | None = None, check: bool = True,
                 lengths: Sequence[int] | None = None, method_spec: Any = None) -> None:
        self.records = list(records)
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.model_prepare = model_prepare
        config = getattr(getattr(model_prepare, "__self__", None), "config", None)
        self.method = method if method is not None else getattr(config, "method", None)
        self.plan_options = dict(plan_options if plan_options is not None else getattr(config, "plan_options", None) or {})
        #: a composed method's spec (the model config's ``method_spec``): lengths count its parts' tokens
        self.method_spec = method_spec if method_spec is not None else getattr(config, "method_spec", None)
        self.add_bos, self.check = add_bos, check
        if lengths is not None and len(lengths) != len(self.records):
            raise ValueError(f"{len(lengths)} lengths for {len(self.records)} records")
        self._lengths = [int(n) for n in lengths] if lengths is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, r: Record) -> str:
        return f"record {r.id!r} ({r.source}, #{r.index})"

    def encode(self, r: Record) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a record, checked; errors name the record."""
        try:
            enc = self.template.encode_full(self.tokenizer, r.conversations, add_bos=self.add_bos)
        except TemplateError as e:
            raise DataError(f"{self._where(r)}: {e}") from e
        if self.check:
            check_alignment(self.tokenizer, enc.input_ids, enc.text, bos=enc.bos, labels=enc.labels,
                            record_id=r.id, source=r.source)
        image_id = single_token_id(self.tokenizer, IMAGE_TOKEN)
        n = sum(1 for t in enc.input_ids if t == image_id) if image_id is not None else 0
        if n != len(r.images):
            raise DataError(f"{self._where(r)}: {n} {IMAGE_TOKEN} token(s) but {len(r.images)} image(s)")
        return enc.input_ids, enc.labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``id``; ``input_ids`` and ``labels``: LongTensor (T,); ``images``: absolute paths in
        placeholder order; ``num_text_tokens``: T; ``image_inputs`` when ``model_prepare`` is set.
        Raises :class:`DataError` for an image outside ``image_folder`` (symlinks resolved)."""
        r = self.records[i]
        ids, labels = self.encode(r)
        # refused here too, not only by validate: a dataset built from unvalidated records must
        # not read files outside the image folder either
        paths = [contained_image(self.image_folder, p, self._where(r)) for p in r.images]
        item: dict[str, Any] = {
            "id": r.id,
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "images": paths,
            "num_text_tokens": len(ids),
        }
        if self.model_prepare is not None:
            try:
                item["image_inputs"] = [self.model_prepare(p) for p in paths]
            except ImageLoadError as e:
                raise DataError(f"{self._where(r)}: {e}") from e
        return item

    def lengths(self, *, num_workers: int = 8, progress: bool | None = None) -> list[int]:
        """Per record, text tokens + planned visual tokens (each image's
        ``num_visual_tokens`` in place of its placeholder), for length-grouped sampling. Computed
        once (image headers read once per distinct file, in threads) and cached."""
        if self._lengths is not None:
            return self._lengths
        from tqdm.auto import tqdm

        if self.method is None and self.method_spec is None and any(r.images for r in self.records):
            raise ValueError("lengths() needs the method to count visual tokens: pass method= "
                             "(or model_prepare=model.prepare_image)")
        show = len(self.records) >= 10_000 if progress is None else progress
        paths = list(dict.fromkeys(contained_image(self.image_folder, p, self._where(r))
                                   for r in self.records for p in r.images))
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            sizes = dict(zip(paths, tqdm(pool.map(check_image, paths), total=len(paths), desc="image sizes",
                                         disable=not show)))
        count = (VisualTokenCounter(self.method, self.plan_options, method_spec=self.method_spec)
                 if self.method is not None or self.method_spec is not None else None)
        out = []
        bar = tqdm(total=len(self.records), desc="lengths", disable=not show)
        for c0 in range(0, len(self.records), 1024):  # one batched tokenizer call per chunk
            chunk = self.records[c0:c0 + 1024]
            encs = self.template.encode_many(self.tokenizer, [r.conversations for r in chunk], add_bos=self.add_bos,
                                             check=False)
            for r, enc in zip(chunk, encs):
                if isinstance(enc, Exception):
                    raise DataError(f"{self._where(r)}: {enc}") from enc
                out.append(self._length(r, len(enc.input_ids), sizes, count))
            bar.update(len(chunk))
        bar.close()
        self._lengths = out
        return out

    def _length(self, r: Record, n: int, sizes: Mapping[str, Any], count: Any) -> int:
        """``n`` text tokens + each image's planned visual tokens in place of its placeholder."""
        for p in r.images:
            size, err = sizes[resolve_image(self.image_folder, p)]
            if err:
                raise DataError(f"{self._where(r)}: {err}")
            n += count(size) - 1
        return n

    @staticmethod
    def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return collate(batch)


def collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Gather items into lists (``HiresLMM.build_inputs`` splices and pads):
    ``ids: list[str]``, ``input_ids``/``labels``: list of LongTensor (T_i,),
    ``images: list[list[str]]``, plus ``image_inputs`` when every item has them."""
    out: dict[str, Any] = {
        "ids": [b["id"] for b in batch],
        "input_ids": [b["input_ids"] for b in batch],
        "labels": [b["labels"] for b in batch],
        "images": [list(b["images"]) for b in batch],
    }
    if batch and all("image_inputs" in b for b in batch):
        out["image_inputs"] = [b["image_inputs"] for b in batch]
    return out


def split_to_even_chunks(indices: Sequence[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """LLaVA's split of a megabatch (longest first) into ``num_chunks`` chunks of equal count,
    each index going to the chunk with the least total length that still has room."""
    if len(indices) % num_chunks != 0:
        return [list(indices[i::num_chunks]) for i in range(num_chunks)]
    per = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for i in indices:
        c = totals.index(min(totals))
        chunks[c].append(i)
        totals[c] += lengths[i]
        if len(chunks[c]) == per:
            totals[c] = float("inf")
    return chunks


class LengthGroupedSampler(Sampler[int]):
    """LLaVA's length-grouped order (``get_length_grouped_indices``), deterministic and rank-aware.

    Each epoch: a permutation seeded by ``seed + epoch`` (:meth:`set_epoch`), cut into megabatches
    of ``world_size * batch_size``; each megabatch is sorted longest first and split into
    ``world_size`` chunks of equal count and balanced total length (LLaVA's
    ``split_to_even_chunks``); chunk ``r`` of every megabatch is rank ``r``'s batch.

    ``rank=None`` yields the global order (chunks of a megabatch one after another, LLaVA's layout,
    for a loader such as accelerate that shards batches itself); ``rank=r`` yields rank r's part.
    So that every rank gets disjoint slices of equal size, ``len(lengths) % world_size`` samples
    (a different random few every epoch) are left out of each epoch.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0, *,
                 rank: int | None = 0) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError("batch_size and world_size must be >= 1")
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def rank_indices(self) -> list[list[int]]:
        """This epoch's indices of every rank: ``world_size`` disjoint lists of equal length."""
        n, ws = len(self.lengths), self.world_size
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g).tolist()
        perm = perm[: n - n % ws]
        mb = ws * self.batch_size
        out: list[list[int]] = [[] for _ in range(ws)]
        for s in range(0, len(perm), mb):
            megabatch = sorted(perm[s:s + mb], key=lambda i: self.lengths[i], reverse=True)
            for r, chunk in enumerate(split_to_even_chunks(megabatch, self.lengths, ws)):
                out[r] += chunk
        return out

    def global_indices(self) -> list[int]:
        """The global order: per megabatch, rank 0's chunk, rank 1's chunk, ..."""
        per_rank = self.rank_indices()
        out: list[int] = []
        bs = self.batch_size
        for s in range(0, len(per_rank[0]), bs):
            for chunk in per_rank:
                out += chunk[s:s + bs]
        return out

    def __iter__(self) -> Iterator[int]:
        if self.rank is None:
            return iter(self.global_indices())
        return iter(self.rank_indices()[self.rank])

    def __len__(self) -> int:
        usable = len(self.lengths) - len(self.lengths) % self.world_size
        return usable if self.rank is None else usable // self.world_size


__all__ = ["LengthGroupedSampler", "LlavaDataset", "collate", "split_to_even_chunks"]
