"""Parse and validate the HL7 v2 messages the clinical store accepts.

hl7apy (tolerant, without groups) splits the message into segments and fields; this
module checks what the clinical store and model A depend on:

- MSH: a supported message type (ADT^A01/A04/A08/A28/A31, ORU^R01), a control id,
  a valid message time. Failures here are rejections (``AR``).
- PID-3: an identifier with its assigning authority (CX.4), since patients are matched
  on both; PID-7 a date, PID-8 a value of HL7 table 0001.
- OBX: a supported value type (NM, CWE/CE/CNE, ST/TX/FT), a number in NM, a result
  status of table 0085, and for the tumour markers a unit that converts to the
  canonical one (CEA in ug/L, CA 19-9 in U/mL); AJCC categories must look like
  ``pT3`` / ``pN1a`` / ``cM0`` / ``IIIB``. Failures here are errors (``AE``).

Error reasons name the segment, field and LOINC code, never a patient's name or id.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, replace
from typing import Protocol

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from ml.errors import OncopacsError

LOINC = "LN"
CEA = "2039-6"
CA19_9 = "24108-3"
T_CATEGORY = "21899-0"
N_CATEGORY = "21900-6"
M_CATEGORY = "21901-4"
STAGE_GROUP = "21902-2"
TUMOUR_SITE = "21905-5"

SUPPORTED_TYPES = frozenset({("ADT", "A01"), ("ADT", "A04"), ("ADT", "A08"), ("ADT", "A28"),
                             ("ADT", "A31"), ("ORU", "R01")})
NUMERIC_TYPES = frozenset({"NM"})
CODED_TYPES = frozenset({"CWE", "CE", "CNE"})
TEXT_TYPES = frozenset({"ST", "TX", "FT"})
RESULT_STATUSES = frozenset("CDFINOPRSUWX")  # HL7 table 0085
VALUE_REQUIRED = frozenset("CFPRSU")  # statuses that report a result
SEX_CODES = frozenset("AFMNOU")  # HL7 table 0001

# (name, canonical unit, {unit key: factor to the canonical unit}); keys are lower-case
UNIT_RULES: dict[str, tuple[str, str, dict[str, float]]] = {
    CEA: ("CEA", "ug/L", {"ug/l": 1.0, "ng/ml": 1.0, "ng/l": 1e-3, "pg/ml": 1e-3,
                          "mg/l": 1e3, "ug/ml": 1e3}),
    CA19_9: ("CA 19-9", "U/mL", {"u/ml": 1.0, "[u]/ml": 1.0, "ku/l": 1.0, "k[u]/l": 1.0,
                                 "u/l": 1e-3, "[u]/l": 1e-3}),
}
CODED_RULES: dict[str, tuple[str, re.Pattern[str]]] = {
    T_CATEGORY: ("an AJCC T category", re.compile(r"(y?[cpr]|yp|a)?T(X|is|[0-4][a-d]?)")),
    N_CATEGORY: ("an AJCC N category", re.compile(r"(y?[cpr]|yp|a)?N(X|[0-3][a-c]?)")),
    M_CATEGORY: ("an AJCC M category", re.compile(r"(y?[cpr]|yp|a)?M(X|0|1[a-c]?)")),
    STAGE_GROUP: ("an AJCC stage group", re.compile(r"(0|0is|I{1,3}|IV)[A-C]?")),
}
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")
TIMESTAMP = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?")


class ClinicalError(OncopacsError):
    """Base class of the clinical store's errors."""


class Hl7MessageError(ClinicalError):
    """An HL7 message the clinical store does not accept.

    Attributes
    ----------
    reason
        What is wrong (segment, field, code), without patient identifiers.
    ack_code
        ``AR`` (unparseable, unsupported, header error) or ``AE`` (bad content).
    error_code
        HL7 table 0357 condition code for ERR-3 (e.g. ``102`` data type error).
    control_id
        MSH-10 when it could be read.
    location
        ERR-2 error location (``SEG^1^5``), empty when not known.
    """

    def __init__(self, reason: str, *, ack_code: str, error_code: str,
                 control_id: str | None = None, location: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.ack_code = ack_code
        self.error_code = error_code
        self.control_id = control_id
        self.location = location


@dataclass(frozen=True)
class PatientIdentity:
    """PID content: identity key (identifier, issuer) and demographics."""

    identifier: str
    issuer: str
    family_name: str | None
    given_name: str | None
    sex: str | None
    birth_date: dt.date | None


@dataclass(frozen=True)
class ObservationRecord:
    """One OBX, with numeric values converted to the canonical unit of known analytes."""

    patient: int  # index into ParsedMessage.patients
    set_id: str
    code: str
    code_system: str
    name: str
    value_type: str
    numeric: float | None
    coded: str | None
    text: str | None
    value_system: str | None
    unit: str | None
    unit_as_sent: str | None
    observed_at: dt.datetime
    status: str


@dataclass(frozen=True)
class ParsedMessage:
    """A validated message: header, patients (PID order) and observations (OBX order)."""

    control_id: str
    message_type: str
    sending_app: str
    sending_facility: str
    message_at: dt.datetime
    patients: tuple[PatientIdentity, ...]
    observations: tuple[ObservationRecord, ...]


@dataclass(frozen=True)
class _Enc:
    field: str
    comp: str
    rep: str
    esc: str
    sub: str

    def unescape(self, value: str) -> str:
        """Resolve HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\.br\\ \\Xhh\\)."""
        if not self.esc or self.esc not in value:
            return value
        plain = {"F": self.field, "S": self.comp, "T": self.sub, "R": self.rep, "E": self.esc,
                 ".br": "\n"}

        def one(match: re.Match[str]) -> str:
            seq = match.group(1)
            if seq in plain:
                return plain[seq]
            if seq.startswith("X") and re.fullmatch(r"X([0-9A-Fa-f]{2})+", seq):
                return bytes.fromhex(seq[1:]).decode("latin-1")
            return ""

        esc = re.escape(self.esc)
        return re.sub(f"{esc}(.*?){esc}", one, value)

    def comp_of(self, raw: str, index: int) -> str:
        """Component ``index`` (1-based) of a raw field, unescaped."""
        parts = raw.split(self.comp)
        return self.unescape(parts[index - 1]) if len(parts) >= index else ""

    def sub_of(self, raw: str, comp: int, sub: int) -> str:
        """Subcomponent ``sub`` of component ``comp`` (both 1-based) of a raw field."""
        parts = raw.split(self.comp)
        subs = parts[comp - 1].split(self.sub) if len(parts) >= comp else []
        return self.unescape(subs[sub - 1]) if len(subs) >= sub else ""


Fields = dict[int, list[str]]


class _ErrorFactory(Protocol):
    """The ``error`` closure of :func:`_observation`."""

    def __call__(self, reason: str, error_code: str, field: int) -> Hl7MessageError: ...


def _first(f: Fields, n: int) -> str:
    reps = f.get(n, [])
    return reps[0] if reps else ""


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\r").replace("\n", "\r").strip("\r\x00 \t")


def _control_id_guess(text: str) -> str | None:
    first = text.split("\r", 1)[0]
    parts = first.split(first[3]) if len(first) > 3 else []
    return parts[9] or None if len(parts) > 9 else None


def parse_timestamp(raw: str, what: str, control_id: str | None, ack_code: str = "AE",
                    *, show_value: bool = True) -> dt.datetime | None:
    """An HL7 TS/DTM value as a naive datetime (offset dropped); None when empty.

    ``show_value`` false keeps the value out of the error (a birth date is PHI).

    Raises
    ------
    Hl7MessageError
        If the value is not an HL7 date/time; the reason names ``what``.
    """
    value = raw.split("^", 1)[0].strip()
    if not value:
        return None
    match = TIMESTAMP.fullmatch(value)
    try:
        if match is None:
            raise ValueError(value)
        year, month, day, hour, minute, second = (
            int(g) if g else d for g, d in zip(match.groups()[:6], (0, 1, 1, 0, 0, 0),
                                               strict=True))
        fraction = float(match.group(7)) if match.group(7) else 0.0
        return dt.datetime(year, month, day, hour, minute, second) + dt.timedelta(
            seconds=fraction)
    except ValueError as exc:
        shown = f" '{value}'" if show_value else ""
        raise Hl7MessageError(f"{what}{shown} is not an HL7 date/time (YYYYMMDD[HHMM[SS]])",
                              ack_code=ack_code, error_code="102",
                              control_id=control_id) from exc


def parse_hl7(text: str) -> ParsedMessage:
    """Parse and validate one ER7 message (segments separated by CR, LF or CRLF).

    Raises
    ------
    Hl7MessageError
        ``ack_code`` AR if the message is unparseable, not of a supported type, or its
        MSH is incomplete; AE if a PID or OBX is not acceptable.
    """
    text = _normalise(text)
    if not text.startswith("MSH") or len(text) < 8:
        raise Hl7MessageError("message does not start with an MSH segment", ack_code="AR",
                              error_code="100", location="MSH")
    control_id = _control_id_guess(text)
    try:
        msg = parse_message(text, find_groups=False,
                            validation_level=VALIDATION_LEVEL.TOLERANT)
        chars = msg.encoding_chars
        enc = _Enc(chars["FIELD"], chars["COMPONENT"], chars["REPETITION"], chars["ESCAPE"],
                   chars["SUBCOMPONENT"])
        segments: list[tuple[str, Fields]] = []
        for seg in msg.children:
            fields: Fields = {}
            for child in seg.children:
                fields.setdefault(int(child.name.rsplit("_", 1)[1]), []).append(child.to_er7())
            segments.append((str(seg.name), fields))
    except Exception as exc:  # hl7apy raises many exception types on malformed input
        raise Hl7MessageError(f"hl7apy cannot parse the message: {type(exc).__name__}: {exc}",
                              ack_code="AR", error_code="102", control_id=control_id) from exc
    header = _header(segments[0][1], enc)
    patients, observations = _body(segments[1:], enc, header)
    return ParsedMessage(header.control_id, header.message_type, header.sending_app,
                         header.sending_facility, header.message_at, tuple(patients),
                         tuple(observations))


def _header(msh: Fields, enc: _Enc) -> ParsedMessage:
    control_id = enc.unescape(_first(msh, 10)).strip()
    if not control_id:
        raise Hl7MessageError("MSH-10 (message control id) is empty", ack_code="AR",
                              error_code="101", location="MSH^1^10")
    kind = (enc.comp_of(_first(msh, 9), 1), enc.comp_of(_first(msh, 9), 2))
    message_type = "^".join(kind)
    if kind not in SUPPORTED_TYPES:
        accepted = ", ".join(sorted("^".join(t) for t in SUPPORTED_TYPES))
        raise Hl7MessageError(f"message type '{message_type}' (MSH-9) is not supported; "
                              f"accepted: {accepted}", ack_code="AR", error_code="200",
                              control_id=control_id, location="MSH^1^9")
    message_at = parse_timestamp(_first(msh, 7), "MSH-7 (message date/time)", control_id, "AR")
    if message_at is None:
        raise Hl7MessageError("MSH-7 (message date/time) is empty", ack_code="AR",
                              error_code="101", control_id=control_id, location="MSH^1^7")
    return ParsedMessage(control_id, message_type, _first(msh, 3), _first(msh, 4), message_at,
                         (), ())


def _body(segments: list[tuple[str, Fields]], enc: _Enc, header: ParsedMessage,
          ) -> tuple[list[PatientIdentity], list[ObservationRecord]]:
    patients: list[PatientIdentity] = []
    observations: list[ObservationRecord] = []
    order_at: dt.datetime | None = None
    cid = header.control_id
    for position, (name, fields) in enumerate(segments, start=2):
        if name == "PID":
            patients.append(_patient(fields, enc, cid))
            order_at = None
        elif name == "OBR":
            order_at = parse_timestamp(_first(fields, 7), "OBR-7 (observation date/time)", cid)
        elif name == "OBX":
            if not patients:
                raise Hl7MessageError(f"OBX {_first(fields, 1) or '?'} (segment {position}) "
                                      "comes before any PID segment", ack_code="AE",
                                      error_code="100", control_id=cid, location="OBX")
            observations.append(_observation(fields, enc, len(patients) - 1,
                                             order_at or header.message_at, cid))
    if not patients:
        raise Hl7MessageError(f"{header.message_type} message has no PID segment",
                              ack_code="AE", error_code="100", control_id=cid, location="PID")
    return patients, observations


def _patient(f: Fields, enc: _Enc, cid: str) -> PatientIdentity:
    ids = [cx for cx in f.get(3, []) if enc.comp_of(cx, 1).strip()]
    if not ids:
        raise Hl7MessageError("PID-3 (patient identifier list) is empty", ack_code="AE",
                              error_code="101", control_id=cid, location="PID^1^3")
    cx = ids[0]
    issuer = (enc.sub_of(cx, 4, 1) or enc.sub_of(cx, 4, 2)).strip()
    if not issuer:
        raise Hl7MessageError("PID-3 identifier has no assigning authority (CX.4); patients "
                              "are matched on identifier and issuer", ack_code="AE",
                              error_code="101", control_id=cid, location="PID^1^3^4")
    born = parse_timestamp(_first(f, 7), "PID-7 (date of birth)", cid, show_value=False)
    sex = enc.comp_of(_first(f, 8), 1).strip() or None
    if sex is not None and sex not in SEX_CODES:
        raise Hl7MessageError(f"PID-8 (administrative sex) '{sex}' is not in HL7 table 0001",
                              ack_code="AE", error_code="103", control_id=cid,
                              location="PID^1^8")
    xpn = _first(f, 5)
    return PatientIdentity(enc.comp_of(cx, 1).strip(), issuer,
                           enc.sub_of(xpn, 1, 1) or None, enc.comp_of(xpn, 2) or None, sex,
                           born.date() if born else None)


def _observation(f: Fields, enc: _Enc, patient: int, default_at: dt.datetime,
                 cid: str) -> ObservationRecord:
    set_id = _first(f, 1)
    value_type = enc.comp_of(_first(f, 2), 1).strip()
    raw_id = _first(f, 3)
    code, system, name = (enc.comp_of(raw_id, i).strip() for i in (1, 3, 2))
    if system != LOINC and enc.comp_of(raw_id, 6).strip() == LOINC:  # LOINC as alternate code
        code, system, name = (enc.comp_of(raw_id, i).strip() for i in (4, 6, 5))
    where = f"OBX {set_id or '?'} ({code or 'no code'})"

    def error(reason: str, error_code: str, field: int) -> Hl7MessageError:
        return Hl7MessageError(f"{where}: {reason}", ack_code="AE", error_code=error_code,
                               control_id=cid, location=f"OBX^{set_id or 1}^{field}")

    if not code:
        raise error("OBX-3 (observation identifier) is empty", "101", 3)
    status = _first(f, 11).strip()
    if status not in RESULT_STATUSES or not status:
        raise error(f"OBX-11 result status '{status}' is not in HL7 table 0085", "103", 11)
    observed_at = parse_timestamp(_first(f, 14), f"{where} OBX-14", cid) or default_at
    values = [enc.unescape(v) for v in f.get(5, []) if v.strip()]
    record = ObservationRecord(patient, set_id, code, system, name, value_type, None, None,
                               None, None, None, None, observed_at, status)
    if not values:
        if status in VALUE_REQUIRED:
            raise error(f"OBX-5 (observation value) is empty but OBX-11 is '{status}'", "101", 5)
        return record
    kind = value_type if value_type in NUMERIC_TYPES | CODED_TYPES | TEXT_TYPES else ""
    if not kind:
        accepted = ", ".join(sorted(NUMERIC_TYPES | CODED_TYPES | TEXT_TYPES))
        raise error(f"OBX-2 value type '{value_type}' is not supported; accepted: {accepted}",
                    "102", 2)
    if system == LOINC and code in UNIT_RULES and kind not in NUMERIC_TYPES:
        raise error(f"{UNIT_RULES[code][0]} must be sent as NM, not {kind}", "102", 2)
    if system == LOINC and code in CODED_RULES and kind not in CODED_TYPES:
        raise error(f"must be coded (CWE), not {kind}", "102", 2)
    if kind in NUMERIC_TYPES:
        return _numeric(record, _first(f, 5), _first(f, 6), enc, error)
    if kind in CODED_TYPES:
        raw = _first(f, 5)
        value, text, vsys = (enc.comp_of(raw, i).strip() for i in (1, 2, 3))
        rule = CODED_RULES.get(code) if system == LOINC else None
        if rule is not None and not rule[1].fullmatch(value):
            raise error(f"OBX-5 code '{value}' is not {rule[0]}", "103", 5)
        if not value and not text:
            raise error("OBX-5 coded value has neither code nor text", "101", 5)
        return replace(record, coded=value or None, text=text or None, value_system=vsys or None)
    return replace(record, text="\n".join(values))


def _numeric(record: ObservationRecord, raw_value: str, raw_unit: str, enc: _Enc,
             error: _ErrorFactory) -> ObservationRecord:
    value_text = enc.unescape(raw_value).strip()
    if not NUMBER.fullmatch(value_text):
        raise error(f"OBX-5 value '{value_text}' is not a number (OBX-2 is NM)", "102", 5)
    value = float(value_text)
    unit = enc.comp_of(raw_unit, 1).strip() or None
    rule = UNIT_RULES.get(record.code) if record.code_system == LOINC else None
    if rule is None:
        return replace(record, numeric=value, unit=unit, unit_as_sent=unit)
    label, canonical, factors = rule
    accepted = ", ".join(sorted(k for k, f in factors.items() if f == 1.0))
    if unit is None:
        raise error(f"OBX-6 unit of {label} is empty; expected {canonical} ({accepted})",
                    "101", 6)
    key = unit.replace("\u00b5", "u").replace("\u03bc", "u").replace("mcg", "ug").lower()
    if key not in factors:
        raise error(f"OBX-6 unit '{unit}' of {label} cannot be converted to {canonical}; "
                    f"accepted: {', '.join(sorted(factors))}", "103", 6)
    if value < 0:
        raise error(f"OBX-5 {label} value {value_text} is negative", "102", 5)
    return replace(record, numeric=value * factors[key], unit=canonical, unit_as_sent=unit)


