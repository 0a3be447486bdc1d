"""Data files: any UTF-8 text file is a document; a bad file is one short line naming the file (and line)."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import random
from importlib.resources import files

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from sapling.config import ConfigError, check_data, register_configs
from sapling.data import build_packed_data, sources
from sapling.errors import DataError

MAX_LINE = 400
STDLIB = pathlib.Path(os.__file__).parent


def data_config(*paths) -> object:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(files("sapling.conf")), version_base=None):
        cfg = compose(config_name="config", overrides=["command=eval", f"data.files=[{','.join(map(str, paths))}]"])
    return cfg.data


def assert_one_short_line(msg: str, *needles: str) -> None:
    assert "\n" not in msg and len(msg) < MAX_LINE, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_any_utf8_text_file_is_one_document(tiny_tokenizer, tmp_path):
    texts = {"a.py": (STDLIB / "bisect.py").read_text(), "b.md": "# Notes\n\nSome *markdown* é→.\n",
             "NOTES": "no extension at all\n", "c.txt": "plain text\n"}
    paths = []
    for name, text in texts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        paths.append(str(tmp_path / name))
    check_data(data_config(*paths), required=True)  # the old code refused .py and .md at validation
    data = build_packed_data(paths, tiny_tokenizer, 8, val_fraction=0.0)
    assert data.meta["num_docs"] == 4
    ids = data.train.array.ravel().tolist()
    eos = tiny_tokenizer.eos_token_id
    first = tiny_tokenizer(texts["a.py"], add_special_tokens=False)["input_ids"] + [eos]
    assert ids[: len(first)] == first  # read as is, one document


def _latin1_after_sniff() -> bytes:
    """Valid UTF-8 for longer than the config-time sniff, then a latin-1 'é' on line 3001."""
    return b"".join(b"line %05d of plain ascii text\n" % i for i in range(3000)) + "café\n".encode("latin-1")


BAD_FILES = {
    "binary": ("big.txt", bytes([0]) + random.Random(0).randbytes(600_000), ["big.txt", "binary file, not text"]),
    "latin1": ("latin.txt", _latin1_after_sniff(), ["latin.txt", "not UTF-8 text (line 3001, byte 93003: 0xe9"]),
    "latin1_jsonl": ("latin.jsonl", ('{"text": "ok"}\n{"text": "caf\xe9"}\n').encode("latin-1"),
                     ["latin.jsonl", "not UTF-8 text (line 2"]),
    "bad_json": ("bad.jsonl", b'{"text": "a"}\n\n{"text": "b",\n', ["bad.jsonl' line 3: not valid JSON"]),
    "no_field": ("nofield.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n',
                 ["nofield.jsonl' line 3: no 'text' field (fields: ['body'])", "data.text_field"]),
    "not_string": ("number.jsonl", b'{"text": "a"}\n{"text": 5}\n', ["number.jsonl' line 2: 'text' is of type int"]),
    "not_object": ("list.jsonl", b'{"text": "a"}\n[1, 2]\n', ["list.jsonl' line 2: not a JSON object"]),
    "gzip": ("corpus.txt", gzip.compress(b"hello world\n" * 1000), ["corpus.txt", "gzip-compressed file"]),
    "utf16": ("notes.md", "hello\n".encode("utf-16"), ["notes.md", "UTF-16 text"]),
    "fake_parquet": ("table.parquet", b"just text\n", ["table.parquet", "not a readable Parquet file"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_one_short_line_naming_file_and_line(case, tiny_tokenizer, docs, write_corpus, tmp_path):
    name, content, needles = BAD_FILES[case]
    bad = tmp_path / name
    bad.write_bytes(content)
    good = write_corpus("jsonl", docs[:4])
    with pytest.raises(DataError) as err:
        build_packed_data([*good, str(bad)], tiny_tokenizer, 16, val_fraction=0.0)
    assert_one_short_line(str(err.value), *needles, "fix:")


def test_empty_files_are_named(tiny_tokenizer, docs, write_corpus, tmp_path):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.md"
    empty.write_text("")
    blank.write_text(" \n\n\t\n")
    with pytest.raises(DataError) as err:  # the old code: "cannot split 1 document into train and val"
        build_packed_data([str(empty)], tiny_tokenizer, 16)
    assert_one_short_line(str(err.value), "empty.txt", "no text")
    with pytest.raises(DataError) as err:
        build_packed_data([str(empty), str(blank)], tiny_tokenizer, 16, val_fraction=0.0)
    assert_one_short_line(str(err.value), "all 2 data files", "empty.txt", "blank.md")
    with pytest.raises(DataError) as err:
        build_packed_data(write_corpus("jsonl", ["", "  "]), tiny_tokenizer, 16, val_fraction=0.0)
    assert_one_short_line(str(err.value), ".jsonl", "no text")
    one = write_corpus("txt", docs[:1])
    with pytest.raises(DataError) as err:
        build_packed_data(one, tiny_tokenizer, 4, val_fraction=0.1)
    assert_one_short_line(str(err.value), os.path.basename(one[0]), "1 document", "data.val_fraction=0")
    # An empty file among others is an empty document, not an error (a package's empty __init__.py).
    data = build_packed_data([*write_corpus("txt", docs[:3]), str(empty)], tiny_tokenizer, 4, val_fraction=0.0)
    assert data.meta["num_docs"] == 4


def test_validation_sniffs_each_file_before_any_model_loads(tmp_path):
    name, content, _ = BAD_FILES["binary"]
    (tmp_path / name).write_bytes(content)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.py").write_text("\n\n")
    (tmp_path / "ok.py").write_text("x = 1\n")
    (tmp_path / "late.txt").write_bytes(_latin1_after_sniff())
    cases = {
        (tmp_path / "ok.py", tmp_path / name): ("data.files[1]=", "binary file, not text"),
        (tmp_path / "empty.txt", tmp_path / "blank.py"): ("data.files=", "every file is empty or blank"),
        (tmp_path,): ("data.files[0]=", "is a directory"),
    }
    for paths, (key, problem) in cases.items():
        with pytest.raises(ConfigError) as err:
            check_data(data_config(*paths), required=True)
        assert_one_short_line(str(err.value), problem, "fix:")
        assert str(err.value).startswith(key)
    # Validation reads only the first 64 KiB of each file: the reader finds what lies beyond.
    check_data(data_config(tmp_path / "ok.py", tmp_path / "late.txt"), required=True)


def test_text_check_is_exact_across_chunk_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 5)  # every multi-byte character gets cut somewhere
    text = "héllo wörld € 𝄞\n" * 40
    path = tmp_path / "utf8.txt"
    path.write_text(text, encoding="utf-8")
    assert sources.text_problem(str(path)) is None
    raw = text.encode("utf-8")
    at = raw.index(b"\n", len(raw) // 2) + 1  # the start of some line
    line = raw[:at].count(b"\n") + 1
    path.write_bytes(raw[:at] + b"\xe9t\xe9\n" + raw[at:])
    problem, fix = sources.text_problem(str(path))
    assert problem == f"not UTF-8 text (line {line}, byte {at}: 0xe9, invalid continuation byte)"
    assert "iconv" in fix
    path.write_bytes(raw + "é".encode()[:1])  # cut off at the very end
    assert f"byte {len(raw)}: 0xc3, unexpected end of data" in sources.text_problem(str(path))[0]


# CLI: what a user meets. `main` in this process where the imports are already paid for; a subprocess
# where the exact stderr matters.


def test_cli_eval_reads_python_and_markdown_sources(tmp_path, teacher_dir, run_sapling):
    (tmp_path / "x.py").write_text((STDLIB / "bisect.py").read_text())
    (tmp_path / "notes.md").write_text("# Notes\n\n" + "Some words about sorting lists. " * 20)
    rc = run_sapling(tmp_path, "eval", f"model.path={teacher_dir}", "data.files=[x.py,notes.md]", "data.seq_len=32",
                     "eval.window=32", "eval.max_tokens=200", "eval.gen_tokens=0", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert rc == 0  # the old code: "data.files[0]='x.py': unsupported file type"
    assert "perplexity" in (tmp_path / "run" / "report.md").read_text().lower()


def test_cli_binary_txt_is_one_short_line(cli, tmp_path, teacher_dir):
    (tmp_path / "data.txt").write_bytes(BAD_FILES["binary"][1])
    res = cli("eval", f"model.path={teacher_dir}", "data.files=[data.txt]", "logger=none",
              f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("sapling:")]
    assert len(lines) == 1 and len(res.stderr) < 2000, res.stderr[-3000:]
    assert_one_short_line(lines[0], "data.files[0]='data.txt'", "binary file")
    assert "Traceback" not in res.stderr


def test_cli_bad_line_found_while_reading_names_file_and_line(tmp_path, teacher_dir, run_sapling, capsys):
    rows = "".join(json.dumps({"text": f"row {i} " * 20}) + "\n" for i in range(600))  # > 64 KiB: past the sniff
    (tmp_path / "rows.jsonl").write_text(rows + '{"text": "cut off\n')
    rc = run_sapling(tmp_path, "eval", f"model.path={teacher_dir}", "data.files=[rows.jsonl]", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sapling:")]
    assert rc == 1 and len(lines) == 1, lines
    assert_one_short_line(lines[0], "rows.jsonl' line 601: not valid JSON")
