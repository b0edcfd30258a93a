"""`lowbit compare`: method parsing, relative figures, Pareto front, plot, and (slow) a resumable run."""
from __future__ import annotations

import csv
import json

import pytest

from lowbit.errors import LowbitError
from lowbit.eval.compare import (MethodSpec, parse_methods, pareto_front, plot, with_relative_figures, write_csv)


def test_methods_parse_to_quantize_arguments(tmp_path):
    specs = {s.name: s for s in parse_methods("rtn4,gptq3,Q4_K_M,nf4,int8,given=" + str(tmp_path))}
    assert specs["rtn4"].quantize_args == ("--method", "rtn", "--bits", "4")
    assert specs["gptq3"].quantize_args == ("--method", "gptq", "--bits", "3")
    assert specs["Q4_K_M"].gguf and specs["Q4_K_M"].output(tmp_path).name == "Q4_K_M.gguf"
    assert specs["nf4"].quantize_args == ("--method", "nf4")
    assert specs["given"].given == tmp_path and specs["given"].output(tmp_path / "x") == tmp_path
    for bad, message in (("rtn4,rtn4", "each method once"), ("bogus", "unknown method 'bogus'"),
                         ("x=/nonexistent/path", "does not exist"), ("float", "always compared")):
        with pytest.raises(LowbitError, match=message):
            parse_methods(bad)


def test_pareto_front_keeps_the_undominated_points():
    points = [(100.0, 10.0), (50.0, 12.0), (60.0, 13.0), (25.0, 20.0), (30.0, 20.0), (200.0, 10.0)]
    assert pareto_front(points) == [3, 1, 0]


ROWS = [{"name": "float", "size_mb": 540.0, "perplexity": 20.0, "last_word_accuracy": 0.4, "cloze_accuracy": 0.6,
         "prompt_tokens_per_s": 400.0, "decode_tokens_per_s": 20.0},
        {"name": "rtn4", "size_mb": 100.0, "perplexity": 23.0, "last_word_accuracy": 0.3, "cloze_accuracy": 0.6,
         "prompt_tokens_per_s": 200.0, "decode_tokens_per_s": 40.0, "kld": 0.1}]


def test_relative_figures_csv_and_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'lowbit[plot]')")
    rows = with_relative_figures(ROWS)
    assert rows[0]["last_word_relative"] == 1.0 and rows[0]["decode_relative"] == 1.0
    assert rows[1]["last_word_relative"] == pytest.approx(0.75) and rows[1]["cloze_relative"] == 1.0
    assert rows[1]["prefill_relative"] == 0.5 and rows[1]["decode_relative"] == 2.0
    write_csv(tmp_path / "c.csv", rows)
    read = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert [r["name"] for r in read] == ["float", "rtn4"] and float(read[1]["kld"]) == 0.1
    png = plot(rows, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


@pytest.mark.slow
def test_compare_runs_and_resumes(stories_dir, tinystories_text, tmp_path, capsys):
    from lowbit.cli import main

    args = ["compare", str(stories_dir), "--methods", "rtn4,rtn8", "--data", str(tinystories_text), "--ctx", "128",
            "--max-tokens", "1024", "--task-items", "12", "-o", str(tmp_path)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "rtn4" in table and "rtn8" in table and "last-word" in table
    data = json.loads((tmp_path / "compare.json").read_text())
    rows = data["results"]
    assert list(rows) == ["float", "rtn4", "rtn8"]
    # the float row and each method's reference are the same model on the same tokens (separate processes)
    for name in ("rtn4", "rtn8"):
        assert rows[name]["base_perplexity"] == pytest.approx(rows["float"]["perplexity"], rel=1e-6)
        assert 0 < rows[name]["kld"] and 0 < rows[name]["top1_agreement"] <= 1
    assert rows["rtn8"]["kld"] < rows["rtn4"]["kld"] and rows["rtn8"]["size_mb"] > rows["rtn4"]["size_mb"]
    assert rows["float"]["kld"] is None and rows["float"]["cloze_accuracy"] > 0.25
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "compare.csv").is_file()
    # resumable: a second run with one more method evaluates only that one
    log_before = (tmp_path / "logs" / "rtn4.log").read_text()
    assert main(args[:3] + ["rtn4,rtn8,nf4"] + args[4:]) == 0
    assert (tmp_path / "logs" / "rtn4.log").read_text() == log_before
    assert list(json.loads((tmp_path / "compare.json").read_text())["results"]) == ["float", "rtn4", "rtn8", "nf4"]
    from lowbit.eval.compare import CompareSettings, run_compare

    changed = CompareSettings(model=str(stories_dir), methods=[MethodSpec("rtn4", ("--method", "rtn", "--bits", "4"))],
                              data=tinystories_text, out=tmp_path, task_items=13, ctx=128, max_tokens=1024)
    with pytest.raises(LowbitError, match="other settings"):
        run_compare(changed, progress=False)
