import json

import pytest

from trainer.data import documents


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_line_ranges_hold_every_line_once_each_numbered_as_in_the_file(tmp_path, parts):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "x" * (i * 7 % 23)}) for i in range(40)]
    lines[5] = ""  # a blank line is skipped, but counted
    path.write_text("\n".join(lines) + "\n")
    ranges = documents.line_ranges(str(path), parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # contiguous
    raw = path.read_bytes()
    for start, _end, first in ranges:
        assert start == 0 or raw[start - 1 : start] == b"\n"  # each starts a line
        assert raw[:start].count(b"\n") + 1 == first
    counted = sum(documents.count_json_range(str(path), "text", *r) for r in ranges)
    assert counted == sum(1 for _ in documents.file_texts([str(path)], "text")) == 39


def test_a_range_names_a_bad_line_by_its_number_in_the_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(30)]
    lines[22] = '{"body": "no text"}'
    path.write_text("\n".join(lines) + "\n")
    start, end, first = documents.line_ranges(str(path), 3)[-1]
    assert first < 23
    with pytest.raises(Exception, match=rf"{path}, line 23: no text field 'text'"):
        documents.count_json_range(str(path), "text", start, end, first)
