"""Peak memory per rank (CPU RSS) of DDP, FSDP2 and DeepSpeed ZeRO-3 on a model large enough to
show the difference: the tiny llava-1.5 vision side with a deep Llama LLM (default 24 layers x
768 wide, ~170M parameters), stage 2 (projector + LLM train, the ViT is frozen), fp32, 2 steps,
2 processes over gloo, launched with the shipped accelerate configs.

The figures are the trainer's own: ``OUT/stage.json``'s ``distributed.peak_rss_mib_per_rank``,
each rank's peak RSS (``ru_maxrss``) when training ends, before the final model is gathered (which
then costs the main process one full unsharded copy).

    .venv/bin/python bench/train_memory.py [--layers 24] [--hidden 768] [--procs 2] [--out DIR]

Prints a markdown table (docs/training.md has the figures); the LLM directory and the data are built locally.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": "ddp_cpu.yaml", "fsdp": "fsdp.yaml", "deepspeed-zero3": "deepspeed_zero3.yaml",
           "deepspeed-zero2": "deepspeed_zero2.yaml"}


def build_inputs(root: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    """A deep Llama LLM directory (with the tiny tokenizer) and 16 small training records."""
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM

    from hires_lmm.methods import build_model

    tok = build_model("llava-1.5", tiny=True).tokenizer
    llm_dir = root / "llm"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=4096,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    (root / "images").mkdir(exist_ok=True)
    recs = []
    for i in range(16):
        Image.new("RGB", (320, 240), (30 * (i % 8), 200, 40)).save(root / "images" / f"{i}.png")
        recs.append({"id": f"r{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                       {"from": "gpt", "value": "green"}]})
    (root / "train.json").write_text(json.dumps(recs))
    return llm_dir, root / "train.json"


def run(engine: str, root: Path, llm_dir: Path, data: Path, procs: int, port: int, steps: int) -> dict:
    out = root / f"out-{engine}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / CONFIGS[engine]), "--num_processes", str(procs),
           "--mixed_precision", "no", "--main_process_port", str(port), "-m", "hires_lmm.cli",
           "train", "-m", "llava-1.5", "--tiny", "--llm", str(llm_dir), "--stage", "2", "--data-path", str(data),
           "--image-folder", str(root / "images"), "--output-dir", str(out), "--batch-size", "1", "--max-steps",
           str(steps), "--save-steps", "1000", "--no-progress", "--no-group-by-length"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{engine} failed: {r.stderr[-3000:]}")
    dist = json.loads((out / "stage.json").read_text())["distributed"]
    return {"seconds": time.time() - t0, **dist}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--engines", default="ddp,fsdp,deepspeed-zero3")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        llm_dir, data = build_inputs(root, args.layers, args.hidden)
        rows = [run(e, root, llm_dir, data, args.procs, 29580 + i, args.steps) for i, e in enumerate(args.engines.split(","))]
    print("| engine | trainable params | per rank | peak RSS per rank (MiB) | wall (s) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        rss = " / ".join(f"{m:.0f}" for m in r["peak_rss_mib_per_rank"])
        print(f"| {r['engine']} | {r['trainable_params'] / 1e6:.1f}M | {r['trainable_params_per_rank'] / 1e6:.1f}M "
              f"| {rss} | {r['seconds']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
