"""The generated fine-detail dataset (hires_lmm.data.synth): files and formats, determinism,
balance, splits, and the property it exists for: the detail a question asks about cannot be
read from LLaVA-1.5's 336-px view of the whole image, and is plain at high resolution."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hires_lmm.data import synth
from hires_lmm.image.load import load_image
from hires_lmm.image.render import make_canvas
from hires_lmm.plan import plan_image

N = 40


def _read(out: Path) -> dict:
    meta = json.loads((out / "meta.json").read_text())
    return {
        "meta": meta,
        "stage1": json.loads((out / "stage1.json").read_text()),
        "stage2": json.loads((out / "stage2.json").read_text()),
        "questions": [json.loads(x) for x in (out / "test/questions.jsonl").read_text().splitlines()],
        "answers": [json.loads(x) for x in (out / "test/answers.jsonl").read_text().splitlines()],
    }


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    meta = synth.generate(out, N, seed=0, progress=False)
    return out, meta


# --- files and formats --------------------------------------------------------------------------

def test_files_and_formats(dataset):
    out, meta = dataset
    d = _read(out)
    assert d["meta"] == meta
    folder = out / meta["image_folder"]
    assert meta["n"] == N and meta["seed"] == 0
    assert meta["counts"]["train"] == len(d["stage1"]) == len(d["stage2"])
    assert meta["counts"]["test"] == len(d["questions"]) == len(d["answers"])
    assert len(d["stage2"]) + len(d["questions"]) == N
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [r["image"] for r in d["stage2"]] + [q["image"] for q in d["questions"]])

    for stage in ("stage1", "stage2"):
        for r in d[stage]:
            assert set(r) == {"id", "image", "conversations"}
            conv = r["conversations"]
            assert [t["from"] for t in conv] == ["human", "gpt"]
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert conv[0]["value"].startswith("<image>\n")
            assert "<image>" not in conv[1]["value"] and conv[1]["value"]
    by_id = {r["id"]: r for r in d["stage2"]}
    for r in d["stage1"]:
        task = r["id"].split("-")[0]
        assert r["conversations"][0]["value"] == "<image>\n"
        answer = by_id[r["id"]]["conversations"][1]["value"]
        assert answer in r["conversations"][1]["value"]         # the caption names the detail
        assert answer in synth.ANSWERS[task]
    for r in d["stage2"]:
        task = r["id"].split("-")[0]
        assert r["conversations"][0]["value"] == "<image>\n" + synth.QUESTIONS[task]

    assert [q["question_id"] for q in d["questions"]] == [a["question_id"] for a in d["answers"]]
    for q, a in zip(d["questions"], d["answers"]):
        assert set(q) == {"question_id", "image", "text", "category"}
        assert set(a) == {"question_id", "text"}
        assert q["text"] == synth.QUESTIONS[q["category"]]
        assert a["text"] in synth.ANSWERS[q["category"]]
        assert "<image>" not in q["text"]

    sizes = {tuple(s) for s in meta["sizes"]}
    for name in [r["image"] for r in d["stage2"][:6]] + [q["image"] for q in d["questions"][:4]]:
        raw = (folder / name).read_bytes()
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        img = load_image(folder / name)
        assert img.mode == "RGB" and img.size in sizes
        assert max(img.size) % 336 == 0

    for task in synth.TASKS:
        sep = meta["separability"][task]
        assert sep["lowres_max_abs_diff"]["max"] <= synth.LOWRES_MAX_DIFF
        assert sep["highres_min_pairwise_rms"]["min"] >= synth.HIGHRES_MIN_RMS


def test_saved_pixels_are_the_example(dataset):
    out, _ = dataset
    ex = next(e for e in synth.build_examples(N, seed=0) if e.task == "digit")
    saved = np.asarray(Image.open(out / "images" / ex.file))
    assert np.array_equal(saved, np.asarray(synth.render(ex)))


# --- determinism, balance, splits ---------------------------------------------------------------

def test_deterministic(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    synth.generate(again, N, seed=0, workers=2, progress=False)     # workers must not matter
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    synth.generate(other, N, seed=1, progress=False)
    a, b = _files(out), _files(other)
    assert a.keys() == b.keys()
    differ = [k for k in a if a[k] != b[k]]
    assert len([k for k in differ if k.endswith(".png")]) == N
    assert "stage2.json" in differ and "meta.json" in differ


def test_regenerating_removes_stale_images(tmp_path):
    synth.generate(tmp_path, 8, seed=3, progress=False)
    (tmp_path / "images" / "notes.txt").write_text("mine")
    synth.generate(tmp_path, 4, seed=3, progress=False)
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert names == ["color-000000.png", "count-000002.png", "digit-000003.png", "notes.txt", "shape-000001.png"]


def _balanced(counter: Counter, classes: list[str]) -> bool:
    v = [counter.get(c, 0) for c in classes]
    return max(v) - min(v) <= 1


def test_balance_and_disjoint_splits(dataset):
    out, meta = dataset
    d = _read(out)
    train = {r["id"]: r["conversations"][1]["value"] for r in d["stage2"]}
    test = {a["question_id"]: a["text"] for a in d["answers"]}
    assert not set(train) & set(test)
    assert {r["image"] for r in d["stage2"]}.isdisjoint(q["image"] for q in d["questions"])
    per_task = Counter(i.split("-")[0] for i in [*train, *test])
    assert max(per_task.values()) - min(per_task.values()) <= 1
    for task in synth.TASKS:
        classes = synth.ANSWERS[task]
        tr = Counter(a for i, a in train.items() if i.startswith(task))
        te = Counter(a for i, a in test.items() if i.startswith(task))
        assert _balanced(tr, classes) and _balanced(te, classes) and _balanced(tr + te, classes)
        assert meta["counts"]["per_task"][task]["test"]["answers"] == {c: te.get(c, 0) for c in classes}
    # about test_fraction held out, per task
    assert abs(len(test) - 0.2 * N) <= len(synth.TASKS)


@pytest.mark.parametrize("n", [7, 50, 203])
def test_balance_property(n):
    exs = synth.build_examples(n, seed=5, tasks=("digit", "count", "shape"), test_fraction=0.3)
    assert [e.index for e in exs] == list(range(n))
    for task in ("digit", "count", "shape"):
        sub = [e for e in exs if e.task == task]
        for split in ("train", "test", None):
            c = Counter(e.answer for e in sub if split is None or e.split == split)
            assert _balanced(c, synth.ANSWERS[task])


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="336"):
        synth.build_examples(4, sizes=[(1200, 900)])
    with pytest.raises(ValueError, match="336"):
        synth.build_examples(4, sizes=[(336, 336)])       # f = 1: the 336 view is the image itself
    with pytest.raises(ValueError, match="shorter side"):
        synth.build_examples(4, sizes=[(2016, 100)])
    with pytest.raises(ValueError, match="unknown task"):
        synth.build_examples(4, tasks=("colour",))
    with pytest.raises(ValueError):
        synth.build_examples(4, test_fraction=1.5)
    with pytest.raises(ValueError):
        synth.render(synth.build_examples(1)[0], "mauve")


# --- the property: unreadable at 336, plain at high resolution -----------------------------------

def _views(ex: synth.Example) -> tuple[Image.Image, Image.Image]:
    """LLaVA-1.5's 336 view and the padded square at 1008 (INF-LLaVA's canvas), as the pipeline
    makes them."""
    img = synth.render(ex)
    low = make_canvas(img, plan_image("llava-1.5", ex.size).canvases[0])
    high = make_canvas(img, plan_image("inf-llava", ex.size).canvases[0])
    assert low.size == (336, 336) and high.size == (1008, 1008)
    return low, high


def _box_pixels(view: Image.Image, ex: synth.Example) -> tuple[np.ndarray, np.ndarray]:
    """The target's box in a view, as d = pixel − the plate's grey (float, h×w×3), and the box
    resampled to 24×24 (the same array at any scale)."""
    side = view.size[0]
    box, plate = synth.target_boxes(ex, side)
    u = ex.f * side / max(ex.size)                    # one 336-pixel in this view
    a = np.asarray(view, np.float32)
    px0, py0, px1, py1 = (int(round(v)) for v in (plate[0] + u, plate[1] + u, plate[2] - u, plate[3] - u))
    ref = np.median(a[py0:py1, px0:px1].reshape(-1, 3), axis=0)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    raw = np.asarray(view.crop((x0, y0, x1, y1)).resize((24, 24), Image.Resampling.BILINEAR), np.float32) - ref
    return a[y0:y1, x0:x1] - ref, raw


def _features(view: Image.Image, ex: synth.Example) -> np.ndarray:
    """Phase-invariant statistics of the box's pixels that define each task's answer, computed
    the same way at any scale (the view's pixel grid only sets how many pixels there are):

    * color: the six second moments of d over the box (RR, GG, BB, RG, RB, GB), normalised;
    * shape / digit: the local energy |d| (3×3 mean), normalised by its maximum, pooled on a grid;
    * count: the mean of that normalised energy (the textured area).
    """
    d, _ = _box_pixels(view, ex)
    if ex.task == "color":
        m = np.array([(d[..., i] * d[..., j]).mean() for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]])
        return m / (m[:3].sum() + 1)
    e = np.abs(d).sum(-1)
    c = np.pad(np.cumsum(np.cumsum(np.pad(e, 1, mode="edge"), 0), 1), ((1, 0), (1, 0)))
    e = (c[3:, 3:] - c[:-3, 3:] - c[3:, :-3] + c[:-3, :-3]) / 9
    e = e / (e.max() + 1)
    if ex.task == "count":
        return np.array([e.mean()])
    grid = (4, 4) if ex.task == "shape" else (4, 6)
    return np.asarray(Image.fromarray(e, "F").resize(grid, Image.Resampling.BOX), np.float32).ravel()


def _logistic_accuracy(X: np.ndarray, y: np.ndarray, train: np.ndarray, l2: float = 1e-2, steps: int = 300) -> float:
    """Multinomial logistic regression (standardised features, L2, full-batch gradient descent)
    fitted on ``train``, accuracy on the rest."""
    mu, sd = X[train].mean(0), X[train].std(0)
    Z = np.clip((X - mu) / np.maximum(sd, 1e-6), -10, 10)
    k = int(y.max()) + 1
    W, b = np.zeros((Z.shape[1], k)), np.zeros(k)
    Zt, Y = Z[train], np.eye(k)[y[train]]
    for _ in range(steps):
        logits = Zt @ W + b
        P = np.exp(logits - logits.max(1, keepdims=True))
        G = (P / P.sum(1, keepdims=True) - Y) / len(Zt)
        W -= 0.5 * (Zt.T @ G + l2 * W)
        b -= 0.5 * G.sum(0)
    return float((np.argmax(Z[~train] @ W + b, 1) == y[~train]).mean())


@pytest.mark.parametrize("task", synth.TASKS)
def test_detail_unreadable_at_336_and_plain_at_high_resolution(task):
    """The same classifier on the same pixel features of the target's box: near perfect on the
    1008-px view, at chance on LLaVA-1.5's 336 view of the whole image (and at chance there on
    the raw pixels of the box too)."""
    K = len(synth.ANSWERS[task])
    exs = synth.build_examples(K * 8, seed=11, tasks=(task,), test_fraction=0.5,
                               sizes=[(1008, 1008), (1344, 1008), (1008, 1344), (1680, 672)])
    assert {e.f for e in exs} == {3, 4, 5}
    y = np.array([synth.ANSWERS[task].index(e.answer) for e in exs])
    train = np.array([e.split == "train" for e in exs])      # balanced halves
    low_f, high_f, low_raw = [], [], []
    for e in exs:
        low, high = _views(e)
        low_f.append(_features(low, e))
        high_f.append(_features(high, e))
        low_raw.append(_box_pixels(low, e)[1].ravel())
    acc_high = _logistic_accuracy(np.stack(high_f), y, train)
    acc_low = _logistic_accuracy(np.stack(low_f), y, train)
    acc_low_raw = _logistic_accuracy(np.stack(low_raw), y, train)
    chance, n_test = 1 / K, int((~train).sum())
    at_chance = chance + 3 * np.sqrt(chance * (1 - chance) / n_test)
    assert acc_high >= 0.9, (task, acc_high, acc_low, acc_low_raw)
    assert acc_low <= at_chance and acc_low_raw <= at_chance, (task, acc_high, acc_low, acc_low_raw)


def test_check_window_matches_the_full_views():
    """check_example measures on a grid-aligned window; the full views agree with it."""
    for ex in synth.build_examples(8, seed=2, sizes=[(1344, 1008), (672, 1680), (2016, 1008), (1008, 1008)]):
        stats = synth.check_example(ex)
        low_a, high_a = _views(ex)
        empty = synth.render(ex, None)
        low_e = make_canvas(empty, plan_image("llava-1.5", ex.size).canvases[0])
        high_e = make_canvas(empty, plan_image("inf-llava", ex.size).canvases[0])
        _, plate = synth.target_boxes(ex, 336)
        x0, y0, x1, y1 = int(plate[0]), int(plate[1]), int(np.ceil(plate[2])), int(np.ceil(plate[3]))
        diff = np.abs(np.asarray(low_a, np.int16) - np.asarray(low_e, np.int16))
        assert diff.max() <= synth.LOWRES_MAX_DIFF                    # the whole 336 view, not only the plate
        assert diff[y0:y1, x0:x1].max() <= stats["low_max"]
        box, _ = synth.target_boxes(ex, 1008)
        bx0, by0, bx1, by1 = (int(round(v)) for v in box)
        hd = np.asarray(high_a, np.float32)[by0:by1, bx0:bx1] - np.asarray(high_e, np.float32)[by0:by1, bx0:bx1]
        assert np.abs(hd).max() >= 80                                 # the texture's peaks


def test_answers_export():
    assert set(synth.ANSWERS) == set(synth.TASKS) == set(synth.QUESTIONS)
    assert synth.ANSWERS["count"] == ["1", "2", "3", "4", "5"]
    assert synth.ANSWERS["digit"] == [str(i) for i in range(10)]
    assert len(synth.ANSWERS["color"]) == 7 and len(synth.ANSWERS["shape"]) == 4
    signs = [np.array(synth._COLOR_SIGNS[c]) for c in synth.ANSWERS["color"]]
    for i in range(len(signs)):                                   # no colour is another's complement
        for j in range(len(signs)):
            assert not np.array_equal(signs[i], -signs[j])
    for classes in synth.ANSWERS.values():
        assert len(set(classes)) == len(classes)
