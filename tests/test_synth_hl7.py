"""HL7 v2.5 messages of synthetic patients: structure, codes, values, dates, determinism."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from ml.errors import SynthError
from ml.synth.centres import centres
from ml.synth.hl7gen import (
    CA19_9,
    CEA,
    TNM_SYSTEM,
    check_message,
    hl7_messages,
    oru_pathology,
    write_hl7,
)
from ml.synth.latent import PatientSpec, sample_patient

SEED = 20240611


@pytest.fixture(scope="module")
def crc() -> PatientSpec:
    return sample_patient(SEED, 0, centres(3))


@pytest.fixture(scope="module")
def pdac() -> PatientSpec:
    return sample_patient(SEED, 1, centres(3))


def _field(seg: hl7.Segment, index: int) -> str:
    return str(seg[index])


def _observations(text: str) -> dict[str, hl7.Segment]:
    """OBX segments keyed by their LOINC code (OBX-3.1)."""
    return {str(seg[3][0][0]): seg for seg in hl7.parse(text).segments("OBX")}


def _ts_date(value: str) -> dt.date:
    return dt.datetime.strptime(value[:8], "%Y%m%d").date()


@pytest.mark.parametrize("index, stems", [
    (0, ["01-adt-a04", "02-oru-lab", "03-oru-pathology"]),
    (1, ["01-adt-a04", "02-oru-lab"]),
])
def test_messages_parse_with_hl7apy_and_hl7(index: int, stems: list[str]) -> None:
    spec = sample_patient(SEED, index, centres(3))
    messages = hl7_messages(spec, SEED)
    assert [stem for stem, _ in messages] == stems
    types = {"01-adt-a04": "ADT^A04^ADT_A01", "02-oru-lab": "ORU^R01^ORU_R01",
             "03-oru-pathology": "ORU^R01^ORU_R01"}
    for stem, text in messages:
        assert "\n" not in text and text.endswith("\r")
        parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
        assert parsed.validate()
        assert parsed.msh.msh_9.to_er7() == types[stem]
        assert parsed.msh.msh_12.to_er7() == "2.5"
        msg = hl7.parse(text)
        msh = msg.segment("MSH")
        assert str(msh[4]) == spec.centre.code
        assert str(msh[5]) == "ONCOPACS"
        pid = msg.segment("PID")
        assert str(pid[3]) == f"{spec.patient_id}^^^{spec.issuer}^MR"
        assert str(pid[5]) == spec.name
        assert str(pid[7]) == spec.birth_date.strftime("%Y%m%d")
        assert str(pid[8]) == spec.sex


def test_adt_registers_the_patient(crc: PatientSpec) -> None:
    text = dict(hl7_messages(crc, SEED))["01-adt-a04"]
    msg = hl7.parse(text)
    assert str(msg.segment("MSH")[3]) == "SYNTH_ADT"
    assert str(msg.segment("EVN")[1]) == "A04"
    assert [str(seg[0]) for seg in msg] == ["MSH", "EVN", "PID", "PV1"]
    assert _ts_date(str(msg.segment("MSH")[7])) < crc.surgery_date


@pytest.mark.parametrize("index", [0, 1])
def test_lab_results_carry_loinc_values_and_dates(index: int) -> None:
    spec = sample_patient(SEED, index, centres(3))
    obx = _observations(dict(hl7_messages(spec, SEED))["02-oru-lab"])
    assert set(obx) == {"2039-6", "24108-3"}
    for analyte, value in ((CEA, spec.latent.cea_ug_l), (CA19_9, spec.latent.ca19_9_u_ml)):
        seg = obx[analyte.loinc]
        assert _field(seg, 2) == "NM"
        assert _field(seg, 3) == f"{analyte.loinc}^{analyte.name}^LN"
        assert float(_field(seg, 5)) == value
        assert _field(seg, 6) == f"{analyte.unit}^{analyte.unit}^UCUM"
        assert _field(seg, 7) == f"0-{analyte.upper:g}"
        assert _field(seg, 8) == ("H" if value > analyte.upper else "N")
        assert _field(seg, 11) == "F"
        observed = _ts_date(_field(seg, 14))
        assert observed == spec.lab_date
        assert observed < spec.surgery_date


@pytest.mark.parametrize("index", range(0, 24, 2))
def test_pathology_matches_the_latent_stage(index: int) -> None:
    spec = sample_patient(SEED, index, centres(3))
    latent = spec.crc
    text = dict(hl7_messages(spec, SEED))["03-oru-pathology"]
    msg = hl7.parse(text)
    assert str(msg.segment("OBR")[4]).startswith("11529-5^")
    assert _ts_date(str(msg.segment("MSH")[7])) > spec.surgery_date
    obx = _observations(text)
    expected = {"21899-0": f"pT{latent.t_stage}", "21900-6": f"pN{latent.n_stage}",
                "21901-4": "cM0", "21902-2": latent.stage_group}
    for code, value in expected.items():
        assert _field(obx[code], 2) == "CWE"
        assert str(obx[code][5][0][0]) == value
        assert str(obx[code][5][0][2]) == TNM_SYSTEM
    summary = _field(obx["22637-3"], 5)
    assert latent.site in summary and f"stage {latent.stage_group}" in summary


def test_stage_groups_cover_i_to_iii() -> None:
    groups = {sample_patient(SEED, i, centres(3)).crc.stage_group for i in range(0, 80, 2)}
    assert groups == {"I", "II", "III"}


def test_pdac_has_no_pathology_report(pdac: PatientSpec) -> None:
    with pytest.raises(SynthError, match="only for CRC"):
        oru_pathology(pdac, SEED)


def test_messages_are_deterministic(crc: PatientSpec) -> None:
    first = hl7_messages(crc, SEED)
    again = hl7_messages(sample_patient(SEED, 0, centres(3)), SEED)
    assert first == again
    other = hl7_messages(sample_patient(SEED + 1, 0, centres(3)), SEED + 1)
    ids = {str(hl7.parse(text).segment("MSH")[10]) for _, text in first + other}
    assert len(ids) == len(first) + len(other)


def test_write_hl7_writes_the_messages(crc: PatientSpec, tmp_path: Path) -> None:
    paths = write_hl7(crc, SEED, tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "hl7/01-adt-a04.hl7", "hl7/02-oru-lab.hl7", "hl7/03-oru-pathology.hl7"]
    for path, (_, text) in zip(paths, hl7_messages(crc, SEED), strict=True):
        assert path.read_bytes() == text.encode("ascii")


def test_check_message_rejects_a_broken_message() -> None:
    broken = "MSH|^~\\&|A|C1|ONCOPACS||20240101||ADT^A04^ADT_A01|X|P|2.5\rEVN|A04|20240101\r"
    with pytest.raises(SynthError, match="broken-adt"):
        check_message(broken, "broken-adt")
