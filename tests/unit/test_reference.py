"""The reference tables in docs/ are generated from the code and must match it."""

from __future__ import annotations

import pytest

from catstream.reference import DOCS, TABLES, settings_table, update_docs
from core.settings import Settings


def test_the_generated_tables_in_the_docs_match_the_code():
    stale = update_docs(check=True)
    assert stale == [], f"run `python -m catstream.reference` to regenerate {stale}"


def test_every_setting_is_in_its_table_with_its_description():
    table = settings_table()
    for name, field in Settings.model_fields.items():
        assert f"| `CATSTREAM_{name.upper()}` |" in table and field.description in table


def test_a_changed_field_makes_its_page_stale(tmp_path):
    for page, _ in TABLES.values():
        target = tmp_path / page
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((DOCS / page).read_text())
    page = tmp_path / TABLES["settings"][0]
    page.write_text(page.read_text().replace("Input topic of offer messages.", "Some old words."))
    assert update_docs(tmp_path, check=True) == ["settings"]
    assert update_docs(tmp_path) == ["settings"] and update_docs(tmp_path, check=True) == []


def test_a_page_without_its_markers_is_an_error(tmp_path):
    for page, _ in TABLES.values():
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text("# nothing generated here\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        update_docs(tmp_path, check=True)
