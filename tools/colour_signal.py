"""How strongly each method's visual tokens carry the demo's answer, before any training.

For a few examples of a demo directory's task, each is rendered once per colour (red, green,
blue: the same image but for the square's texture), encoded by a freshly initialised tiny model
of each method (the demo's pretrained encoders, a random connector) and compared token by token:

* ``signal``: the largest spread of a visual token across the three colours, divided by the mean
  spread between the tokens of one image (how much the answer moves a token, against how much
  the tokens differ anyway);
* ``tokens``: the fraction of visual tokens whose colour spread is over 10 % of the largest.

A weak signal makes the LLM's answer-prior plateau long (docs/results.md, item 1 of issue 18).

    python tools/colour_signal.py out/demo --methods inf-llava,llava-hr --examples 3
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def colour_signal(demo_dir: Path, method: str, examples: int = 3, seed: int = 0) -> list[tuple[float, float]]:
    """(signal, fraction of tokens moved) per example; see the module doc."""
    import torch

    from hires_lmm.data import synth
    from hires_lmm.demo.run import vocabulary
    from hires_lmm.methods import build_model

    meta = json.loads((demo_dir / "data" / "meta.json").read_text())
    stamp = json.loads((demo_dir / "data" / "demo-stamp.json").read_text())
    exs = synth.build_examples(examples, seed=stamp["seed"], tasks=("color",), sizes=[tuple(s) for s in stamp["sizes"]],
                               target_scale=stamp["target_scale"], classes={"color": list(stamp["colors"])})
    torch.manual_seed(seed)
    enc = demo_dir / "encoders"
    model = build_model(method, tiny=True, vision=str(enc / "vit"), convnext=str(enc / "convnext"),
                        words=vocabulary(meta)).eval()
    out = []
    for ex in exs:
        with torch.no_grad():
            toks = torch.stack([model.encode_images([model.prepare_image(synth.render(replace(ex, answer=c)))])[0]
                                for c in stamp["colors"]])                       # (C, N, d)
        mean = toks.mean(0)                                                      # (N, d)
        moved = (toks - mean).norm(dim=-1).max(0).values                         # (N,)
        between = (mean - mean.mean(0)).norm(dim=-1).mean()
        out.append((float(moved.max() / between), float((moved > 0.1 * moved.max()).float().mean())))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_dir", type=Path, help="a `hires demo --out` directory (its data/ and encoders/)")
    ap.add_argument("--methods", default="llava-next,llava-uhd,llava-hr,inf-llava,slime")
    ap.add_argument("--examples", type=int, default=3)
    args = ap.parse_args()
    for m in args.methods.split(","):
        res = colour_signal(args.demo_dir, m, args.examples)
        print(f"{m:10s} signal {' '.join(f'{s:.2f}' for s, _ in res)}   tokens moved "
              f"{' '.join(f'{f:.1%}' for _, f in res)}")


if __name__ == "__main__":
    main()
