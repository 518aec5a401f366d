"""benchmarks/table2.py: the short budget's table puts the original code's numbers (same recipe, about the same
steps; ../shared/reference/original-optvq.md) beside ours."""

import importlib.util
import os

from training_helpers import ROOT


def test_short_table_has_the_original_codes_column():
    spec = importlib.util.spec_from_file_location("table2", os.path.join(ROOT, "benchmarks", "table2.py"))
    table2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table2)
    row = dict(psnr=20.0, ssim=0.5, codebook_usage=1.0, perplexity=900.0, dead_codes=0, global_step=160,
               train_time_s=100.0, seconds_per_step=0.6, train_wall_s=120.0)
    results = {name: dict(row) for name in ("optvq", "vq", "otvae")}
    short = table2.render_table(results, "short").splitlines()
    assert short[0].endswith("original code, same recipe: PSNR / usage |")
    assert short[2].endswith("| 12.2 / 61 % (150 steps) |") and "one code (0.1 %)" in short[3]
    assert all(line.count("|") == short[0].count("|") for line in short)
    assert "original code" not in table2.render_table(results, "paper")
