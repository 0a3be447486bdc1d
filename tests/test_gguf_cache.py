"""The GGUF conversion cache is keyed by content: copies of one file share a directory, a changed file does not,
and the hash is read from its memo instead of the file on later loads."""

from __future__ import annotations

import os

from sapling.models import gguf


def test_cache_key_follows_content(tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with gguf.conversion_cache(tmp_path / "cache"):
        assert gguf.cached_dir(a) == gguf.cached_dir(b)
        assert gguf.cached_dir(a).parent == tmp_path / "cache" / "gguf" and gguf.cached_dir(a).name.startswith("m-")
        hashed = []
        real_hash = gguf.content_hash
        monkeypatch.setattr(gguf, "content_hash", lambda p: hashed.append(p) or real_hash(p))
        same = gguf.cached_dir(a)
        assert hashed == [] and same == gguf.cached_dir(b)  # both remembered: nothing read again
        b.write_bytes(b"GGUF" + bytes(range(256)) * 63 + bytes(256))
        os.utime(b, ns=(1, 1))
        assert gguf.cached_dir(b) != same and hashed == [b]
