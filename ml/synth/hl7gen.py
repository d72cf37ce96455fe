"""HL7 v2.5 messages of one synthetic patient.

Three messages describe what the clinical store learns of a patient:

- ``01-adt-a04``: ADT^A04 (register a patient) with the patient's identity.
- ``02-oru-lab``: ORU^R01 with the pre-operative tumour markers, serum CEA
  (LOINC 2039-6, ug/L) and CA 19-9 (LOINC 24108-3, U/mL), taken on
  ``spec.lab_date``.
- ``03-oru-pathology`` (CRC only): ORU^R01 with the surgical pathology report
  (LOINC 11529-5), a few days after surgery: pT (LOINC 21899-0), pN
  (21900-6), M (21901-4) and the stage group (21902-2) as coded CWE values,
  plus a free-text diagnosis (22637-3).

Coding systems: ``LN`` (LOINC) for observation identifiers, ``UCUM`` for
units, ``L`` (HL7 table 0396: local) for the tumour-marker panel and
``AJCC8`` for TNM categories and stage groups. ``AJCC8`` is this project's
name for the AJCC Cancer Staging Manual, 8th edition; its codes are the
category labels themselves (``pT3``, ``pN1``, ``cM0``, ``III``). Patients of
this cohort are stage I-III, so M is always ``cM0`` (AJCC 8 has no pM0).

Messages are built with hl7apy objects at ``VALIDATION_LEVEL.STRICT``; each is
then parsed back with hl7apy (strict, with ``validate()``) and with the
``hl7`` package before it is returned. Message times and control ids come from
the patient's dates and the cohort seed, never from the clock, so the same
seed gives byte-identical messages.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import hl7
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message

from ml.errors import SynthError
from ml.synth.latent import CrcLatent, PatientSpec, patient_rng

logger = logging.getLogger(__name__)

HL7_VERSION = "2.5"
RECEIVING_APP = "ONCOPACS"
ADT_APP = "SYNTH_ADT"
LAB_APP = "SYNTH_LAB"
PATHOLOGY_APP = "SYNTH_PATH"
LOINC = "LN"
UCUM = "UCUM"
LOCAL = "L"
TNM_SYSTEM = "AJCC8"
MARKER_PANEL = ("TUMMARK", "Tumour markers CEA and CA 19-9")
SURGICAL_PATHOLOGY = ("11529-5", "Surgical pathology study")
FINAL_DIAGNOSIS = ("22637-3", "Pathology report final diagnosis Narrative")
PRIMARY_TUMOUR = ("21899-0", "Primary tumor.pathology Cancer")
REGIONAL_NODES = ("21900-6", "Regional lymph nodes.pathology [Class] Cancer")
DISTANT_METASTASES = ("21901-4", "Distant metastases.pathology [Class] Cancer")
STAGE_GROUP = ("21902-2", "Stage group.pathology Cancer")
PRIMARY_SITE = ("21905-5", "Primary tumor site Cancer")
ICDO3_SYSTEM = "ICDO3"
ICDO3_SITE = {"right colon": "C18.2", "left colon": "C18.6", "rectum": "C20.9"}

T_TEXT = {
    1: "Tumour invades the submucosa",
    2: "Tumour invades the muscularis propria",
    3: "Tumour invades through the muscularis propria into pericolorectal tissues",
    4: "Tumour invades the visceral peritoneum or adjacent organs or structures",
}
N_TEXT = {
    0: "No regional lymph node metastasis",
    1: "Metastasis in 1 to 3 regional lymph nodes",
    2: "Metastasis in 4 or more regional lymph nodes",
}
M0_TEXT = "No distant metastasis"


@dataclass(frozen=True)
class Analyte:
    """A numeric laboratory test: LOINC code and name, UCUM unit, upper reference limit."""

    loinc: str
    name: str
    unit: str
    upper: float
    decimals: int


CEA = Analyte("2039-6", "Carcinoembryonic Ag [Mass/volume] in Serum or Plasma", "ug/L", 5.0, 2)
CA19_9 = Analyte("24108-3", "Cancer Ag 19-9 [Units/volume] in Serum or Plasma", "U/mL", 37.0, 1)


@dataclass(frozen=True)
class _Times:
    """When each message happens, drawn once per patient."""

    registered: dt.datetime
    lab_collected: dt.datetime
    lab_reported: dt.datetime
    pathology_reported: dt.datetime


def control_id(seed: int, index: int, kind: str) -> str:
    """Message control id (MSH-10) of message ``kind`` of patient ``index``: 20 characters."""
    digest = hashlib.sha256(f"oncopacs-hl7|{seed}|{index}|{kind}".encode()).hexdigest()
    return "OP" + digest[:18].upper()


def _ts(when: dt.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S")


def _times(spec: PatientSpec, seed: int) -> _Times:
    rng = patient_rng(seed, spec.index, "hl7")
    first_visit = min(spec.ct_date, spec.lab_date) - dt.timedelta(days=int(rng.integers(1, 15)))
    registered = dt.datetime.combine(first_visit, dt.time(8)) + dt.timedelta(
        minutes=int(rng.integers(0, 240)))
    collected = dt.datetime.combine(spec.lab_date, dt.time(7)) + dt.timedelta(
        minutes=int(rng.integers(0, 180)))
    reported = collected + dt.timedelta(minutes=int(rng.integers(60, 300)))
    path_day = spec.surgery_date + dt.timedelta(days=int(rng.integers(3, 8)))
    path_reported = dt.datetime.combine(path_day, dt.time(10)) + dt.timedelta(
        minutes=int(rng.integers(0, 360)))
    return _Times(registered, collected, reported, path_reported)


def _new_message(structure: str, msg_type: str, app: str, spec: PatientSpec, when: dt.datetime,
                 ctrl: str) -> Message:
    msg = Message(structure, version=HL7_VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msg.msh.msh_3 = app
    msg.msh.msh_4 = spec.centre.code
    msg.msh.msh_5 = RECEIVING_APP
    msg.msh.msh_6 = RECEIVING_APP
    msg.msh.msh_7 = _ts(when)
    msg.msh.msh_9 = f"{msg_type}^{structure}"
    msg.msh.msh_10 = ctrl
    msg.msh.msh_11 = "P"
    return msg


def _fill_pid(pid: Segment, spec: PatientSpec) -> None:
    pid.pid_1 = "1"
    pid.pid_3 = f"{spec.patient_id}^^^{spec.issuer}^MR"
    pid.pid_5 = spec.name
    pid.pid_7 = spec.birth_date.strftime("%Y%m%d")
    pid.pid_8 = spec.sex


def adt_a04(spec: PatientSpec, seed: int) -> str:
    """ADT^A04: register the patient (MSH, EVN, PID, PV1), as ER7 text."""
    when = _times(spec, seed).registered
    msg = _new_message("ADT_A01", "ADT^A04", ADT_APP, spec, when,
                       control_id(seed, spec.index, "adt-a04"))
    msg.evn.evn_1 = "A04"
    msg.evn.evn_2 = _ts(when)
    _fill_pid(msg.pid, spec)
    msg.pv1.pv1_1 = "1"
    msg.pv1.pv1_2 = "O"
    msg.pv1.pv1_3 = f"ONC^^^{spec.centre.code}"
    return str(msg.to_er7())


def _order(msg: Message, spec: PatientSpec, ctrl: str, service: str, observed: dt.datetime,
           reported: dt.datetime) -> Segment:
    """Add the PATIENT_RESULT group (PID) and one ORDER_OBSERVATION with its OBR."""
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    _fill_pid(result.add_group("ORU_R01_PATIENT").add_segment("PID"), spec)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_2 = f"P{ctrl[2:]}^{spec.centre.code}"
    order.obr.obr_3 = f"F{ctrl[2:]}^{spec.centre.code}"
    order.obr.obr_4 = service
    order.obr.obr_7 = _ts(observed)
    order.obr.obr_22 = _ts(reported)
    order.obr.obr_25 = "F"
    return order


def _obx(order: Segment, set_id: int, value_type: str, code: tuple[str, str], value: str,
         observed: dt.datetime) -> Segment:
    obx = order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    obx.obx_1 = str(set_id)
    obx.obx_2 = value_type
    obx.obx_3 = f"{code[0]}^{code[1]}^{LOINC}"
    obx.obx_5 = value
    obx.obx_11 = "F"
    obx.obx_14 = _ts(observed)
    return obx


def oru_lab(spec: PatientSpec, seed: int) -> str:
    """ORU^R01 with the pre-operative CEA and CA 19-9 results, as ER7 text."""
    times = _times(spec, seed)
    ctrl = control_id(seed, spec.index, "oru-lab")
    msg = _new_message("ORU_R01", "ORU^R01", LAB_APP, spec, times.lab_reported, ctrl)
    order = _order(msg, spec, ctrl, f"{MARKER_PANEL[0]}^{MARKER_PANEL[1]}^{LOCAL}",
                   times.lab_collected, times.lab_reported)
    values = ((CEA, spec.latent.cea_ug_l), (CA19_9, spec.latent.ca19_9_u_ml))
    for set_id, (analyte, value) in enumerate(values, start=1):
        obx = _obx(order, set_id, "NM", (analyte.loinc, analyte.name),
                   f"{value:.{analyte.decimals}f}", times.lab_collected)
        obx.obx_6 = f"{analyte.unit}^{analyte.unit}^{UCUM}"
        obx.obx_7 = f"0-{analyte.upper:g}"
        obx.obx_8 = "H" if value > analyte.upper else "N"
    return str(msg.to_er7())


def pathology_summary(latent: CrcLatent) -> str:
    """The free-text final diagnosis of a CRC resection (no HL7 delimiters in it)."""
    return (f"Adenocarcinoma of the {latent.site}, surgical resection specimen. "
            f"pT{latent.t_stage} pN{latent.n_stage} cM0 (AJCC 8th edition), "
            f"stage {latent.stage_group}.")


def oru_pathology(spec: PatientSpec, seed: int) -> str:
    """ORU^R01 with the surgical pathology report of a CRC patient, as ER7 text.

    Raises
    ------
    SynthError
        If the patient is not a CRC patient.
    """
    if not isinstance(spec.latent, CrcLatent):
        raise SynthError(f"patient {spec.patient_id} is {spec.group}: "
                         "pathology reports exist only for CRC patients")
    latent = spec.latent
    times = _times(spec, seed)
    surgery = dt.datetime.combine(spec.surgery_date, dt.time(9))
    ctrl = control_id(seed, spec.index, "oru-pathology")
    msg = _new_message("ORU_R01", "ORU^R01", PATHOLOGY_APP, spec, times.pathology_reported, ctrl)
    order = _order(msg, spec, ctrl, f"{SURGICAL_PATHOLOGY[0]}^{SURGICAL_PATHOLOGY[1]}^{LOINC}",
                   surgery, times.pathology_reported)
    coded = (
        (PRIMARY_TUMOUR, f"pT{latent.t_stage}", T_TEXT[latent.t_stage]),
        (REGIONAL_NODES, f"pN{latent.n_stage}", N_TEXT[latent.n_stage]),
        (DISTANT_METASTASES, "cM0", M0_TEXT),
        (STAGE_GROUP, latent.stage_group, f"Stage {latent.stage_group}"),
    )
    for set_id, (code, value, text) in enumerate(coded, start=1):
        _obx(order, set_id, "CWE", code, f"{value}^{text}^{TNM_SYSTEM}", surgery)
    site = f"{ICDO3_SITE[latent.site]}^{latent.site}^{ICDO3_SYSTEM}"
    _obx(order, len(coded) + 1, "CWE", PRIMARY_SITE, site, surgery)
    _obx(order, len(coded) + 2, "TX", FINAL_DIAGNOSIS, pathology_summary(latent), surgery)
    return str(msg.to_er7())


def check_message(text: str, name: str) -> None:
    """Parse ``text`` with hl7apy (strict, validated) and with the ``hl7`` package.

    Raises
    ------
    SynthError
        If either parser rejects the message or hl7apy's validation fails; the
        message names ``name`` and the parser's reason.
    """
    try:
        parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
        parsed.validate()
    except HL7apyException as exc:
        raise SynthError(f"HL7 message {name} fails hl7apy strict validation: {exc}") from exc
    try:
        hl7.parse(text)
    except (ValueError, IndexError) as exc:
        raise SynthError(f"HL7 message {name} does not parse with the hl7 package: {exc}") from exc


def hl7_messages(spec: PatientSpec, seed: int) -> list[tuple[str, str]]:
    """All HL7 messages of one patient as (file stem, ER7 text with ``\\r`` separators).

    Every segment, the last included, ends with ``\\r``.

    Raises
    ------
    SynthError
        If a generated message fails validation (a bug in this module).
    """
    messages = [("01-adt-a04", adt_a04(spec, seed)), ("02-oru-lab", oru_lab(spec, seed))]
    if spec.group == "CRC":
        messages.append(("03-oru-pathology", oru_pathology(spec, seed)))
    out = []
    for stem, text in messages:
        check_message(text, f"{stem} of patient index {spec.index}")
        out.append((stem, text.rstrip("\r") + "\r"))
    return out


def write_hl7(spec: PatientSpec, seed: int, out_dir: Path) -> list[Path]:
    """Write the patient's messages to ``out_dir/hl7/<stem>.hl7`` (ASCII, ``\\r`` separators).

    Raises
    ------
    SynthError
        If a message fails validation or a file cannot be written.
    """
    folder = out_dir / "hl7"
    paths = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stem, text in hl7_messages(spec, seed):
            path = folder / f"{stem}.hl7"
            path.write_bytes(text.encode("ascii"))
            paths.append(path)
    except OSError as exc:
        raise SynthError(f"cannot write HL7 messages to {folder}: {exc}") from exc
    logger.debug("wrote %d HL7 messages for patient index %d", len(paths), spec.index)
    return paths
