"""Benchmark results: every file records its run, report.py finds files by that record, and the
checked-in results and the docs that cite them agree."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stac_backend.results import device_key, read_text_run, run_record, write_result, write_text_result

from conftest import load_script

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "docs" / "benchmarks"
RUN_FIELDS = ("benchmark", "command", "commit", "device", "date")
# Docs whose references to result files and docs pages are checked here.
CHECKED_DOCS = ("README.md", "CHANGELOG.md", "docs/performance.md", "docs/architecture.md", "docs/deployment.md",
                "docs/local-triton.md")


def report_module():
    return load_script(ROOT / "benchmarks" / "report.py", "benchmark_report")


@pytest.mark.parametrize("name, key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("cpu", "cpu"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090")])
def test_device_key_names_the_card(name, key):
    assert device_key(name) == key


def test_run_record_says_what_how_where_and_when():
    record = run_record("policies", "cpu", argv=[str(ROOT / "benchmarks" / "policies.py"), "--frames", "8", "--note", "a b"])
    assert set(record) == set(RUN_FIELDS)
    assert record["command"] == "python benchmarks/policies.py --frames 8 --note 'a b'"
    assert record["device"] == "cpu" and record["benchmark"] == "policies"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date"])


def test_written_results_carry_their_run_first(tmp_path):
    path = write_result(tmp_path / "sub" / "x.json", {"rows": [1, 2]}, "engine_concurrency", "cpu")
    data = json.loads(path.read_text())
    assert list(data) == ["run", "rows"] and data["rows"] == [1, 2]
    assert data["run"]["benchmark"] == "engine_concurrency"
    text = write_text_result(tmp_path / "p.txt", "profile table\n", "profile_step", "cpu")
    assert read_text_run(text)["benchmark"] == "profile_step"
    assert text.read_text().endswith("\nprofile table\n")


def test_report_finds_results_by_their_record_not_their_name(tmp_path):
    report = report_module()
    write_result(tmp_path / "any_name.json", {"rows": []}, "engine_concurrency", "cpu")
    write_text_result(tmp_path / "profile.txt", "table\n", "profile_step", "cpu")
    write_result(tmp_path / "pool_insert_cpu.json", {}, "pool_insert", "cpu")
    write_text_result(tmp_path / "pool_insert_cpu.txt", "its profile\n", "pool_insert", "cpu")  # beside its JSON
    (tmp_path / "notes.json").write_text(json.dumps({"no": "record"}))
    found = report.find_results(tmp_path)
    assert found == {("engine_concurrency", "cpu"): tmp_path / "any_name.json",
                     ("profile_step", "cpu"): tmp_path / "profile.txt",
                     ("pool_insert", "cpu"): tmp_path / "pool_insert_cpu.json"}
    write_result(tmp_path / "older.json", {"rows": []}, "engine_concurrency", "cpu")
    with pytest.raises(ValueError, match="any_name.json and older.json both record benchmark 'engine_concurrency' on cpu"):
        report.find_results(tmp_path)


def test_merge_keeps_every_run_and_refuses_mixed_benchmarks(tmp_path):
    report = report_module()
    a = write_result(tmp_path / "a.json", {"rows": [1]}, "cuda_graphs_ab", "cpu")
    b = write_result(tmp_path / "b.json", {"rows": [2]}, "cuda_graphs_ab", "cpu")
    merged = report.merge(tmp_path / "m.json", [("off", a), ("on", b)])
    assert [r["label"] for r in merged["runs"]] == ["off", "on"] and merged["runs"][1]["rows"] == [2]
    assert merged["run"]["benchmark"] == "cuda_graphs_ab"
    assert [label for label, _ in report.runs_of(json.loads((tmp_path / "m.json").read_text()))] == ["off", "on"]
    c = write_result(tmp_path / "c.json", {}, "policies", "cpu")
    with pytest.raises(ValueError, match="one benchmark on one device"):
        report.merge(tmp_path / "n.json", [("x", a), ("y", c)])


def test_checked_in_results_are_one_per_benchmark_and_device_named_by_them():
    found = report_module().find_results(BENCH)  # raises on two files for one benchmark and device
    assert found
    for (benchmark, device), path in found.items():
        run = report_module().read_run(path)
        assert all(run.get(k) for k in RUN_FIELDS), (path.name, run)
        assert path.stem == f"{benchmark}_{device}", path.name
    for path in BENCH.iterdir():
        if path.suffix in (".json", ".txt"):
            assert path.with_suffix(".json") in found.values() or path in found.values(), f"{path.name} records no run"


def test_summary_is_rebuilt_from_the_results():
    text = report_module().build(BENCH)
    assert (BENCH / "SUMMARY.md").read_text() == text


@pytest.mark.parametrize("doc", CHECKED_DOCS)
def test_docs_cite_files_that_exist(doc):
    text = (ROOT / doc).read_text()
    base = (ROOT / doc).parent
    cited = set(re.findall(r"docs/benchmarks/[\w./-]+\.(?:json|txt|png|log|csv|md)", text))
    cited |= {"docs/benchmarks/" + m for m in re.findall(r"`([\w-]+_(?:cpu|h100|h200)\.(?:json|txt|png|log))`", text)}
    missing = sorted(p for p in cited if not (ROOT / p).is_file())
    links = re.findall(r"\]\(((?!https?:)[^)#\s]+)", text)
    missing += sorted(link for link in links if not (base / link).exists() and link not in OTHERS_WRITE_NOW)
    assert not missing, f"{doc} cites missing files: {missing}"


# docs pages that other work adds in parallel; linked before they land
OTHERS_WRITE_NOW = {"docs/security.md", "docs/stac.md", "docs/evaluation.md", "docs/viewer.md",
                    "security.md", "stac.md", "evaluation.md", "viewer.md"}


def test_user_docs_speak_without_development_history():
    for doc in CHECKED_DOCS:
        text = (ROOT / doc).read_text()
        if doc == "CHANGELOG.md":
            continue
        assert not re.search(r"\bround \d|\brounds? \d+-\d+|issue #\d|\(#\d+\)", text, re.IGNORECASE), doc
