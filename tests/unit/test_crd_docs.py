"""docs/crd-reference.md is generated from the CRD and must not go stale."""

from __future__ import annotations

import importlib.util

import yaml

from .operator_fixtures import ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_crd_docs", ROOT / "scripts" / "gen_crd_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crd_reference_is_up_to_date():
    generator = load_generator()
    page = generator.render(yaml.safe_load(generator.CRD_PATH.read_text()))
    assert generator.DOC_PATH.read_text() == page, "docs/crd-reference.md is stale: run python scripts/gen_crd_docs.py"


def test_every_spec_field_has_a_row_with_its_description_and_default():
    generator = load_generator()
    crd = yaml.safe_load(generator.CRD_PATH.read_text())
    page = generator.render(crd)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `spec.")}
    for path, schema, _ in generator._fields(spec, "spec"):
        if path.count(".") == 1 and path.removeprefix("spec.") in spec["properties"]:
            continue  # a section: its own heading, not a row
        assert path in rows, path
        if "default" in schema:
            assert generator._literal(schema["default"]) in rows[path].replace("\\|", "|"), path
        if schema.get("description"):
            assert generator._cell(schema["description"]) in rows[path], path


def test_check_mode_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    generator = load_generator()
    stale = tmp_path / "crd-reference.md"
    stale.write_text("# out of date\n")
    monkeypatch.setattr(generator, "DOC_PATH", stale)
    assert generator.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert generator.main([]) == 0
    assert generator.main(["--check"]) == 0
