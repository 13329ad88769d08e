"""Smoke test of bench/sampler.py: the tiny config at a small edit, 2 steps, every report field finite."""

import math

import pytest

from bench import sampler


@pytest.fixture(scope="module")
def tiny_report():
    spec = sampler.EditSpec(id_grid=(16, 16), text_len=8, steps=2)
    built = sampler.build("tiny", spec, matmul_n=128)
    meas = sampler.measure(built, 1, min_round_s=0.0)
    return sampler.report(built, meas)


def test_report_fields_are_finite(tiny_report):
    for field in ("loop_s", "pyloop_s", "ratio_pyloop_over_loop", "compile_loop_s", "compile_pyloop_step_s",
                  "compile_forward_s", "forward_s", "step_s", "non_transformer_share", "post_s", "post_share",
                  "forward_gflop", "forward_gflop_analytic", "forward_gflops", "matmul_peak_gflops",
                  "forward_frac_peak", "vq_s", "edit_with_vq_s"):
        assert math.isfinite(tiny_report[field]), field
    assert tiny_report["loop_s"] > 0 and tiny_report["forward_gflop"] > 0
    # same keys, same step: both loops produce the same tokens, and no mask id survives the last step
    assert tiny_report["tokens_equal_frac"] >= 0.95
    assert not tiny_report["loop_has_mask"]


def test_results_text_names_the_command(tiny_report):
    text = sampler.results_text([tiny_report], "python -m bench.sampler --config tiny", ((1.0,) * 3, (1.0,) * 3))
    assert text.startswith("`python -m bench.sampler --config tiny`")
    assert "| ratio (b) / (a)" in text and "compiled loop faster" in text


def test_results_go_to_the_end_of_their_section(tmp_path):
    from bench.results import append_to_section

    path = tmp_path / "R.md"
    path.write_text("# Benchmark results\n\n## A\n\nold a\n\n## B\n\nold b\n")
    append_to_section("## A", "new a", path=str(path))
    append_to_section("## C", "new c", intro="about c", path=str(path))
    append_to_section("## B", "new b", path=str(path))
    assert path.read_text() == ("# Benchmark results\n\n## A\n\nold a\n\nnew a\n\n## B\n\nold b\n\nnew b\n\n"
                                "## C\n\nabout c\n\nnew c\n")
