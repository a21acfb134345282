"""`hires bench`: the figures come out finite and well-formed, the pixels agree, the report has its
sections. Tiny settings only; no speed is asserted (timings depend on the machine)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hires_lmm.bench import (
    SUMMARY_KEYS,
    BenchSettings,
    format_report,
    run_bench,
    summary,
    write_report,
)
from hires_lmm.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (small ops gain nothing from more, and a busy machine makes them wait);
    restored afterwards, as the bench sets its own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_bench_quick_json_prints_the_four_figures(capsys, tmp_path):
    out = tmp_path / "perf.md"
    rc = main(["bench", "--quick", "--json", "--threads", "1", "--skip", "e2e,gpu", "--photos", "1",
               "--photo-size", "1200x900", "--encode-images", "2", "--repeat", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(SUMMARY_KEYS) <= set(res)
    for k in SUMMARY_KEYS:
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert 0.9 < res["uhd_arxiv_vs_llava15_tflops"] < 1.0  # LLaVA-UHD's "94%" claim, as we count it
    text = out.read_text()
    assert "## 4. End to end" in text and "left out with `--skip`" in text


def test_bench_cli_errors(capsys):
    assert main(["bench", "--quick", "--skip", "nope"]) == 2
    assert "unknown section" in capsys.readouterr().err
    assert main(["bench", "--quick", "--repeat", "0"]) == 2


def test_preprocess_matches_transformers_pixels(tmp_path):
    from hires_lmm.bench.preprocess import (
        bench_preprocess,
        hf_preprocess,
        hf_processor,
        make_photos,
        ours_preprocess,
    )

    (path,) = make_photos(tmp_path, 1, (2016, 1512), seed=3)
    proc, _ = hf_processor()
    ref = hf_preprocess(proc, path)
    fast = torch.stack(ours_preprocess(path)).numpy()
    exact = torch.stack(ours_preprocess(path, fast=False)).numpy()
    assert fast.shape == exact.shape == ref.shape == (5, 3, 336, 336)
    assert np.abs(exact - ref).max() < 1e-5  # the full decode: transformers' pixels
    assert np.abs(fast - ref).max() < 0.2 and np.abs(fast - ref).mean() < 0.005  # a few grey levels at edges
    r = bench_preprocess(n_images=1, size=(1200, 900), repeat=1, workdir=tmp_path)
    assert r["exact_max_abs_diff"] < 1e-5 and r["max_abs_diff"] < 0.2
    assert r["speedup_vs_hf"] > 0 and r["views_per_image"] == 5


def test_encode_packed_matches_per_view_and_counts_flops():
    from hires_lmm.bench.encode import bench_encode, vit_config

    r = bench_encode(vit_config(32, 2), name="test", repeat=1, sizes=[(500, 375), (1000, 600), (800, 1200)])
    assert r["views"] > r["distinct_sizes"] > 1
    assert r["max_abs_diff_vs_per_view"] < 1e-4
    for k in ("packed_vs_per_view", "grouped_vs_per_view", "packed_vs_uniform", "packed_vs_uniform_batched",
              "packed_vs_reference_call"):
        assert math.isfinite(r[k]) and r[k] > 0
    assert r["gflops"] > 0 and r["uniform_gflops"] > 0
    assert r["gflops"] < r["reference_gflops"] < 2 * r["gflops"]  # 2 blocks vs the 1 LLaVA reads (+ embedding)


def test_e2e_ttft_and_decode_rate():
    from hires_lmm.bench.e2e import bench_e2e

    (row,) = bench_e2e(["llava-uhd"], new_tokens=3, repeat=1, image_size=(500, 375))
    # EOS masked, so every requested token is generated: the prefill gives the first, then
    # GenerationMixin runs one decode forward per further token (none after the last)
    assert row["decode_steps"] == 2
    assert row["ttft_s"] > 0 and math.isfinite(row["decode_tokens_per_s"]) and row["decode_tokens_per_s"] > 0
    assert row["visual_tokens"] > 0 and row["views"] > 1


def test_gpu_section_skipped_without_cuda_and_runs_on_cpu_with_tiny_shapes():
    from hires_lmm.bench.gpu import (
        bench_gpu,
        bench_vit_encoding,
        extrapolate_memory,
        train_step,
        vendor_peak,
    )
    from hires_lmm.methods import TINY_TEXT, TINY_VISION

    if not torch.cuda.is_available():
        assert "not run" in bench_gpu(quick=True)["skipped"]
    assert vendor_peak("NVIDIA H100 80GB HBM3") == 989.4 and vendor_peak("NVIDIA H100 PCIe") == 756.0
    assert vendor_peak("NVIDIA A100-SXM4-80GB") == 312.0 and vendor_peak("Tesla T4") is None
    enc = bench_vit_encoding("cpu", config=dict(TINY_VISION), batch=2, dtype=torch.float32, repeat=1, peak=1.0,
                             uhd_sizes=[(500, 375)])
    assert enc["achieved_tflops_per_s"] > 0 and 0 < enc["fraction_of_vendor_peak"] < 1
    assert enc["uhd"]["max_abs_diff_vs_per_view"] < 1e-4
    steps = [train_step(n, device="cpu", vision=dict(TINY_VISION), text=dict(TINY_TEXT), batch=2, text_tokens=12,
                        dtype=torch.float32, steps=1) for n in (1, 2)]
    assert steps[1]["params"] > steps[0]["params"] and all(math.isfinite(s["loss"]) for s in steps)
    assert steps[0]["sequence"] == 11 + 576 and steps[0]["max_memory_gb"] is None  # no CUDA memory on a CPU
    a, b = {"llm_layers": 4, "max_memory_gb": 20.0}, {"llm_layers": 8, "max_memory_gb": 30.0}
    assert extrapolate_memory(a, b) == pytest.approx(20.0 + 2.5 * 28)


def _fake_results(gpu: dict | None) -> dict:
    """A results dict as run_bench makes it, from the cheap sections plus made-up timings."""
    res = run_bench(BenchSettings.preset(True, sections=("cost",), threads=1), log=lambda _m: None)
    res["preprocess"] = {"images": 2, "size": [4000, 3000], "views_per_image": 5, "processor": "P",
                         "hf_s_per_image": 0.4, "ours_s_per_image": 0.1, "ours_exact_s_per_image": 0.25,
                         "hf_images_per_s": 2.5, "ours_images_per_s": 10.0, "speedup_vs_hf": 4.0,
                         "exact_speedup_vs_hf": 1.6, "max_abs_diff": 0.04, "mean_abs_diff": 0.002,
                         "exact_max_abs_diff": 4.8e-7, "target_speedup": 3.0, "repeat": 5}
    enc = {"config": "mid", "width": 256, "layers_run": 3, "heads": 4, "images": 8, "views": 52,
           "distinct_sizes": 13, "distinct_lengths": 8, "tokens": 28933, "gflops": 100.0, "uniform_gflops": 104.0,
           "layers": 4, "reference_gflops": 133.0, "reference_call_s": 4.0, "packed_vs_reference_call": 1.43,
           "per_view_s": 3.0, "grouped_s": 2.9, "packed_s": 2.8, "uniform_batched_s": 4.0, "uniform_library_s": 2.9,
           "packed_gflops_per_s": 35.7, "uniform_gflops_per_s": 35.9, "packed_vs_per_view": 1.07,
           "grouped_vs_per_view": 1.03, "packed_vs_uniform": 0.99, "packed_vs_uniform_batched": 1.4,
           "max_abs_diff_vs_per_view": 0.0, "target_vs_per_view": 3.0, "target_vs_uniform": 0.85, "repeat": 3,
           "device": "cpu", "dtype": "float32"}
    res["encode"] = [enc]
    res["e2e"] = [{"method": "llava-1.5", "image_size": [1024, 768], "views": 1, "visual_tokens": 576,
                   "new_tokens": 8, "ttft_s": 0.03, "decode_tokens_per_s": 600.0, "decode_steps": 8, "repeat": 1}]
    if gpu is not None:
        res["gpu"] = gpu
    res["summary"] = summary(res)
    return res


def test_report_has_every_section(tmp_path):
    res = _fake_results({"skipped": "no CUDA GPU on this machine: section 5 was not run"})
    path = write_report(res, tmp_path / "docs" / "performance.md")
    text = path.read_text()
    for heading in ("# Performance", "## Machine", "## Commands", "## Summary", "## 1. Preprocessing",
                    "## 2. Vision encoding", "## 3. Cost table", "## 4. End to end", "## 5. GPU"):
        assert heading in text, heading
    assert "make bench" in text and "hires bench --quick --json" in text
    assert res["machine"]["cpu"] in text and f"| torch | {torch.__version__} |" in text
    assert "**Not run**: no CUDA GPU" in text
    assert "4.00x" in text and "**not met**" in text  # 1.07x against the 3x target
    assert "| `llava-hr` |" in text and "| visual tokens | 576 | 576 | 1024 | 2304 |" in text  # LLaVA-HR's counts
    assert "0.974" in text  # LLaVA-UHD's claim as we count it


def test_report_gpu_section_when_run():
    gpu = {"device": "NVIDIA H100 80GB HBM3", "vendor_peak_tflops": 989.4,
           "encoding": {"batch": 64, "achieved_tflops_per_s": 600.0, "fraction_of_vendor_peak": 0.61,
                        "fraction_of_measured_peak": 0.8, "measured_matmul_tflops_per_s": 750.0,
                        "uhd_packed_tflops_per_s": 500.0,
                        "uhd": {"packed_vs_per_view": 5.0, "packed_vs_uniform": 0.9}},
           "train_steps": [{"llm_layers": 4, "params": 1.4e9, "step_s": 0.5, "max_memory_gb": 20.0, "batch": 4,
                            "sequence": 703},
                           {"llm_layers": 8, "error": "out of memory"}],
           "train_memory_32_layers_gb": None}
    text = format_report(_fake_results(gpu))
    assert "NVIDIA H100 80GB HBM3" in text and "0.61" in text and "out of memory" in text
    assert "| ViT-L bf16 encoding, fraction of peak | 0.61 | >= 0.50 | met |" in text
