"""Golden outputs of the seven tiny presets, recorded before the core redesign so that the
redesigned model can be proven bit-identical (checked by ``tests/test_golden.py``).

Re-record (writes ``tests/golden/golden.json`` and ``tests/golden/golden.safetensors``)::

    .venv/bin/python tests/golden/record.py            # all presets
    .venv/bin/python tests/golden/record.py slime      # only some (the others are kept)

Only re-record when a numerical change is intended (or after bumping the locked torch /
transformers versions): the whole point of the files is to catch unintended changes.

What is recorded, per preset (``build_model(method, tiny=True, seed=0)``, after
``torch.manual_seed(0)``) and per case (:data:`CASES`: two synthetic RGB images of odd sizes from a
fixed numpy seed, alone and together in one prompt):

* ``inputs_embeds``: ``model.build_inputs([ids], [[prepared...]]).inputs_embeds`` (text and visual
  embeddings spliced; SliME's selector sees the prompt's text the way ``build_inputs`` passes it),
  plus ``num_visual_tokens`` (in the JSON);
* ``visual``: the visual tokens of each image, sliced out of ``inputs_embeds`` (the same bytes
  ``encode_images`` returned), so a failure says whether the visual or the text part moved;
* ``logits``: ``model(input_ids=[ids], images=[[prepared...]]).logits``;
* ``text``: ``model.generate([prompt], [[prepared...]], max_new_tokens=8)`` (greedy), in the JSON.

Each tensor is stored in ``golden.json`` as the SHA-256 of its exact bytes (float32, contiguous,
CPU) with shape and dtype; ``golden.safetensors`` keeps small reduced statistics (``head``: the
first 64 values, ``strided``: 256 evenly spaced values, ``rowsum``: sums over the last dimension)
so that a mismatch reports how far off the result is. The JSON also records the versions of torch,
transformers and the CPU capability, and fingerprints of the initial weights (informational).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
JSON_PATH = HERE / "golden.json"
TENSORS_PATH = HERE / "golden.safetensors"

#: threads used for recording and checking (a fixed count: reduction order may depend on it)
THREADS = 2
SEED = 0
MAX_NEW_TOKENS = 8
N_HEAD = 64
N_STRIDED = 256
#: (width, height) of the synthetic images; odd sizes that exercise every planner
IMAGE_SIZES = [(700, 500), (333, 1000)]
PROMPT_ONE = "<image>\nWhat is the red object in the top left corner of this picture?"
PROMPT_TWO = "First <image> then <image>\nWhich of the two pictures shows more blue sky?"
#: case name -> (prompt, indices of the images it uses)
CASES: dict[str, tuple[str, tuple[int, ...]]] = {
    "a": (PROMPT_ONE, (0,)),
    "b": (PROMPT_ONE, (1,)),
    "ab": (PROMPT_TWO, (0, 1)),
}


def setup_torch() -> int:
    """Fix the CPU thread count (returns the previous one, to restore)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    return prev


def environment() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def make_images() -> list[Image.Image]:
    rng = np.random.default_rng(1234)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB") for w, h in IMAGE_SIZES]


def sha256(t: torch.Tensor) -> str:
    t = t.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def reduce(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The small statistics stored for a tensor (float32)."""
    t = t.detach().to("cpu", torch.float32).contiguous()
    flat = t.flatten()
    idx = torch.linspace(0, flat.numel() - 1, min(N_STRIDED, flat.numel())).round().long()
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    return {"head": flat[:N_HEAD].clone(), "strided": flat[idx].clone(), "rowsum": rows.sum(-1)}


def weights_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """SHA-256 of the initial weights: in state-dict order with names, and name-independent (the
    sorted per-tensor hashes), so a redesign that renames parameters can still be compared."""
    sd = model.state_dict()
    named = hashlib.sha256()
    per = []
    for k, v in sd.items():
        h = sha256(v) if v.is_floating_point() else hashlib.sha256(v.cpu().contiguous().numpy().tobytes()).hexdigest()
        named.update(k.encode() + b"\0" + h.encode())
        per.append(h)
    return {"named": named.hexdigest(), "unnamed": hashlib.sha256("".join(sorted(per)).encode()).hexdigest(),
            "num_tensors": len(sd), "num_elements": int(sum(v.numel() for v in sd.values()))}


def build(method: str):
    from hires_lmm.methods import build_model

    torch.manual_seed(SEED)  # build_model seeds itself too (seed=0); this keeps it so if that changes
    return build_model(method, tiny=True, seed=SEED)


@torch.no_grad()
def compute(method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (name -> tensor) and JSON-able facts of one preset."""
    model = build(method)
    images = make_images()
    prepared = [model.prepare_image(im) for im in images]
    tensors: dict[str, torch.Tensor] = {}
    facts: dict[str, Any] = {"weights": weights_fingerprint(model), "cases": {}}
    for case, (prompt, which) in CASES.items():
        ims = [prepared[i] for i in which]
        ids = torch.tensor(model.tokenizer(prompt, add_special_tokens=True).input_ids, dtype=torch.long)
        out = model(input_ids=[ids], images=[ims])  # its .batch is model.build_inputs([ids], [ims])
        batch, emb = out.batch, out.batch.inputs_embeds
        tensors[f"{case}/inputs_embeds"] = emb
        # visual tokens of each image: placeholder k sits at its text position + the tokens before it
        where = (ids == model.image_token_id).nonzero().flatten().tolist()
        shift = 0
        for k, (pos, n) in enumerate(zip(where, batch.num_visual_tokens)):
            start = pos + shift
            tensors[f"{case}/visual{k}"] = emb[0, start:start + n]
            shift += n - 1
        tensors[f"{case}/logits"] = out.logits
        text = model.generate([prompt], [ims], max_new_tokens=MAX_NEW_TOKENS)[0]
        facts["cases"][case] = {"prompt": prompt, "images": [list(IMAGE_SIZES[i]) for i in which],
                                "num_visual_tokens": list(batch.num_visual_tokens),
                                "plan_num_visual_tokens": [int(im.plan.num_visual_tokens) for im in ims],
                                "input_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                                "text": text}
    return tensors, facts


def record(methods: list[str]) -> None:
    from safetensors.torch import load_file, save_file

    from hires_lmm.plan import METHODS

    setup_torch()
    old = json.loads(JSON_PATH.read_text()) if JSON_PATH.exists() else {"presets": {}}
    stats = load_file(str(TENSORS_PATH)) if TENSORS_PATH.exists() else {}
    presets = {m: v for m, v in old.get("presets", {}).items() if m in METHODS and m not in methods}
    if presets and old.get("environment") != environment():
        sys.exit(f"the kept presets were recorded under {old.get('environment')}, not {environment()}: "
                 "re-record all of them (no arguments)")
    stats = {k: v for k, v in stats.items() if k.split("/")[0] in presets}
    for m in methods:
        tensors, facts = compute(m)
        facts["tensors"] = {}
        for name, t in tensors.items():
            facts["tensors"][name] = {"sha256": sha256(t), "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for stat, v in reduce(t).items():
                stats[f"{m}/{name}/{stat}"] = v
        presets[m] = facts
        print(f"{m}: " + ", ".join(f"{c}: {f['num_visual_tokens']} {f['text']!r}" for c, f in facts["cases"].items()))
    doc = {"about": "golden outputs of the tiny presets; see tests/golden/record.py (re-record) and tests/test_golden.py",
           "environment": environment(), "threads": THREADS, "seed": SEED, "max_new_tokens": MAX_NEW_TOKENS,
           "presets": {m: presets[m] for m in METHODS if m in presets}}
    JSON_PATH.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(stats.items())}, str(TENSORS_PATH))


if __name__ == "__main__":
    from hires_lmm.plan import METHODS

    args = sys.argv[1:] or list(METHODS)
    unknown = set(args) - set(METHODS)
    if unknown:
        sys.exit(f"unknown preset(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    record(args)
