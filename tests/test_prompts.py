"""The shipped preserved-prompt list and the prompt-file reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nullbooth.errors import NullBoothError
from nullbooth.prompts import DEMO_PROMPTS_FILE, read_prompts, resolve_prompts_file


def _independent_parse(path: Path) -> list[str]:
    """Reference parser written differently from read_prompts: a regex over the raw text."""
    out = []
    for m in re.finditer(r"^[ \t]*(\S[^\n]*?)[ \t\r]*$", path.read_text(encoding="utf-8"), flags=re.MULTILINE):
        if not m.group(1).startswith("#"):
            out.append(m.group(1))
    return out


def test_shipped_prompts_are_many_distinct_and_free_of_the_identifier():
    prompts = read_prompts(DEMO_PROMPTS_FILE)
    assert len(prompts) >= 500
    assert len(set(prompts)) == len(prompts), "duplicate prompts in the shipped list"
    assert len({p.lower() for p in prompts}) == len(prompts), "prompts differing only in case"
    for p in prompts:
        assert "sks" not in p.lower(), p  # not even as a substring ("desks"): the identifier must stay unseen
    assert prompts == _independent_parse(DEMO_PROMPTS_FILE)


def test_shipped_prompts_file_starts_with_a_header_comment():
    first = DEMO_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "prompt" in first.lower()


def test_shipped_prompts_are_varied():
    words = {w for p in read_prompts(DEMO_PROMPTS_FILE) for w in re.findall(r"[a-z]+", p.lower())}
    assert len(words) > 1000
    for subject in ("dog", "cat", "car", "mountain", "painting", "woman", "bread", "castle", "watercolor"):
        assert subject in words, subject


@pytest.fixture
def messy_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text(
        "# header comment\n"
        "\n"
        "a photo of a dog\n"
        "   an oil painting of a ship   \n"
        "\t# an indented comment\n"
        "   \n"
        "a red car # with a hash inside\r\n"
        "#no space comment\n"
        "a bowl of soup\n"
        "a castle at night",  # no final newline
        encoding="utf-8",
    )
    return path


def test_read_prompts_skips_comments_and_blanks_and_keeps_order(messy_file: Path):
    prompts = read_prompts(messy_file)
    assert prompts == _independent_parse(messy_file)
    assert prompts == [
        "a photo of a dog",
        "an oil painting of a ship",
        "a red car # with a hash inside",
        "a bowl of soup",
        "a castle at night",
    ]


def test_max_prompts_truncates_in_file_order(messy_file: Path):
    full = _independent_parse(messy_file)
    for k in range(1, len(full) + 3):
        assert read_prompts(messy_file, max_prompts=k) == full[:k]
    assert read_prompts(DEMO_PROMPTS_FILE, max_prompts=7) == read_prompts(DEMO_PROMPTS_FILE)[:7]


def test_non_positive_max_prompts_is_rejected(messy_file: Path):
    with pytest.raises(NullBoothError, match="max_prompts"):
        read_prompts(messy_file, max_prompts=0)


def test_missing_file_raises_naming_the_path(tmp_path: Path):
    path = tmp_path / "nope" / "prompts.txt"
    with pytest.raises(NullBoothError, match=re.escape(str(path))):
        read_prompts(path)


def test_file_without_prompts_raises_naming_the_path(tmp_path: Path):
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n   \n", encoding="utf-8")
    with pytest.raises(NullBoothError, match=re.escape(str(path))):
        read_prompts(path)
    path.write_text("", encoding="utf-8")
    with pytest.raises(NullBoothError, match="no prompts"):
        read_prompts(path)


def test_unreadable_file_raises_naming_the_path(tmp_path: Path):
    with pytest.raises(NullBoothError, match=re.escape(str(tmp_path))):
        read_prompts(tmp_path)  # a directory
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(NullBoothError, match=re.escape(str(binary))):
        read_prompts(binary)


def test_resolve_prompts_file(tmp_path: Path, messy_file: Path):
    assert resolve_prompts_file("demo") == DEMO_PROMPTS_FILE
    assert DEMO_PROMPTS_FILE.is_file()
    assert resolve_prompts_file(str(messy_file)) == messy_file
    with pytest.raises(NullBoothError, match="missing.txt"):
        resolve_prompts_file(str(tmp_path / "missing.txt"))


def test_a_toy_world_folder_gets_the_worlds_demo_like_the_embedded_toy(tmp_path: Path):
    """A model made by `nullbooth toy-model train OUT_DIR` is a toy world too: it ships the probe, so "demo" means
    the world's captions, and the instance variants are set on the world's backgrounds, as for `model.path: toy`.
    (A run of a retrained folder once measured no concept accuracy: it sampled the general demo prompts.)"""
    from nullbooth.models.toyworld import WEIGHTS_DIR
    from nullbooth.models.toyworld.probe import PROBE_WEIGHTS
    from nullbooth.prompts import TOY_PROMPTS_FILE, is_toy_world
    from nullbooth.report.plan import instance_variants

    assert PROBE_WEIGHTS == "probe.safetensors" and (WEIGHTS_DIR / PROBE_WEIGHTS).is_file()
    own = tmp_path / "my-toy"
    own.mkdir()
    assert not is_toy_world(str(own)) and resolve_prompts_file("demo", str(own)) == DEMO_PROMPTS_FILE
    (own / PROBE_WEIGHTS).write_bytes(b"")
    assert is_toy_world("toy") and is_toy_world(str(own)) and is_toy_world(str(WEIGHTS_DIR))
    assert not is_toy_world("tiny")
    assert resolve_prompts_file("demo", str(own)) == resolve_prompts_file("demo", "toy") == TOY_PROMPTS_FILE
    assert instance_variants("a photo of sks teapot", str(own)) == instance_variants("a photo of sks teapot", "toy")
    assert "a photo of sks teapot on a sky background" in instance_variants("a photo of sks teapot", str(own))
