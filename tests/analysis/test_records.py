"""The one metrics.jsonl reader: a torn last line dropped, damage elsewhere refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from reslab.analysis.records import read_metrics


def test_read_metrics(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl"):
        read_metrics(tmp_path)
    assert read_metrics(tmp_path, missing_ok=True) == []
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1}\n\n{"iter": 2}\n{"iter": 3, "tra')  # killed mid-write
    assert read_metrics(tmp_path) == [{"iter": 1}, {"iter": 2}]
    for bad, n in (('{"iter": 1}\n{"it\n{"iter": 3}\n', 2), ('{"iter": 1}\n[1, 2]\n', 2)):
        path.write_text(bad)
        with pytest.raises(ValueError, match=rf"metrics.jsonl:{n}: not a JSON object"):
            read_metrics(tmp_path)
