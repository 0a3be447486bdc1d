"""sapling.io's atomic writers: unique temp names, nothing left behind on failure, the old file kept."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sapling import io
from sapling.eval.report import write_report


class Boom(Exception):
    pass


def _fail(_f) -> None:
    raise Boom


def _fail_dir(tmp: Path) -> None:
    (tmp / "half.bin").write_bytes(b"half")
    raise Boom


@pytest.mark.parametrize("write", [
    lambda p: io.write_atomically(p / "out", _fail),
    lambda p: io.write_bytes_atomically(p / "out", (b"part" if i == 0 else _fail(None) for i in range(2))),
    lambda p: io.write_dir_atomically(p / "model", _fail_dir),
], ids=["file", "bytes", "dir"])
def test_a_failed_write_leaves_no_temp_and_the_old_target(tmp_path, write):
    (tmp_path / "out").write_text("old")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_text("old")
    with pytest.raises(Boom):
        write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    assert (tmp_path / "out").read_text() == (tmp_path / "model" / "w.bin").read_text() == "old"


def test_concurrent_writers_use_unique_temp_names(tmp_path):
    """Two writers of one path are inside their writes at the same time: each has its own temp file."""
    target, both_in = tmp_path / "metrics.json", threading.Barrier(2, timeout=30)
    temps: list[list[str]] = []

    def writer(text: str) -> None:
        def write(f) -> None:
            f.write(text.encode())
            both_in.wait()  # both temp files exist now
            temps.append(sorted(p.name for p in tmp_path.iterdir()))
            both_in.wait()
        io.write_atomically(target, write)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a" * 1000, "b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(temps) == 2 and len(temps[0]) == 2 and temps[0][0] != temps[0][1]  # two distinct temp files
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_dir_writer_replaces_or_keeps_an_existing_dir(tmp_path):
    out = tmp_path / "model"
    io.write_dir_atomically(out, lambda d: (d / "a").write_text("1"))
    io.write_dir_atomically(out, lambda d: (d / "b").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    io.write_dir_atomically(out, lambda d: (d / "c").write_text("3"), keep_existing=True)
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_report_and_stop_file_never_reuse_a_fixed_temp_name(tmp_path):
    """`write_report` and the CLI's stop file used `.<name>.tmp` / `<name>.tmp`: a second writer's temp file
    was overwritten and renamed away under it."""
    from sapling.cli import _write_stop_file

    theirs = [tmp_path / ".report.md.tmp", tmp_path / "stop.json.tmp"]
    for p in theirs:
        p.write_text("another writer's")
    write_report(tmp_path / "report.md", "t", [("s", "text")])
    cfg = OmegaConf.create({"command": "distill", "output_dir": str(tmp_path)})
    _write_stop_file(cfg, 3, str(tmp_path / "stop.json"))
    assert [p.read_text() for p in theirs] == ["another writer's"] * 2
    assert "## s" in (tmp_path / "report.md").read_text()
    assert '"steps": 3' in (tmp_path / "stop.json").read_text()
