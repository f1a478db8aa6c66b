import json
from pathlib import Path

from defungi.cli import main
from defungi.results.audit import read_audit


def test_audit_counts_outliers_duplicates_and_random_split_leakage(tiny_data: Path, tmp_path: Path, capsys):
    # the same image under a second specimen number
    (tiny_data / "H2" / "H2_77a_1.jpg").write_bytes((tiny_data / "H2" / "H2_3a_1.jpg").read_bytes())
    assert main(["data", "audit", str(tiny_data), "--out", str(tmp_path / "audit")]) == 0
    result = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert result["classes"]["H1"] == {"images": 25, "samples": 7, "usable": 24, "outliers": 1, "unreadable": 0}
    assert read_audit(tmp_path / "audit" / "audit.json").outliers[0].label == "H1"  # typed, as the page reads it
    assert result["classes"]["H2"]["samples"] == 7
    assert [o["path"].endswith("H1_99a_1.jpg") for o in result["outliers"]] == [True]
    assert [sorted(i["sample"] for i in c) for c in result["duplicate_clusters"]] == [["H2_3", "H2_77"]]
    leak = result["random_split_leakage"]
    assert 0 < leak["with_same_sample_in_training"] <= leak["test_images"]  # 4 patches per specimen: most leak
    for name in ("audit.html", "audit.md", "variance.png", "outliers.png", "duplicates.png"):
        assert (tmp_path / "audit" / name).exists(), name
    assert "audit: " in capsys.readouterr().out
