"""Helpers for tests/test_export.py: small result objects and a scripted Storage SCP."""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, examples
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE

from tests.tools import free_port


@dataclass(frozen=True)
class Results:
    """A tiny CT series and the result objects written for it."""

    ct: tuple[Path, ...]
    seg: Path
    sc: Path
    uids: dict[Path, str]

    @property
    def all(self) -> list[Path]:
        return [*self.ct, self.seg, self.sc]


def _ct_series(study_uid: str, slices: int) -> list[Dataset]:
    series_uid, frame_uid = generate_uid(), generate_uid()
    out = []
    for number in range(1, slices + 1):
        ds = copy.deepcopy(examples.ct)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [-158.0, -179.0, -5.0 * number]
        out.append(ds)
    return out


def write_results(folder: Path, slices: int = 3) -> Results:
    """Write a CT series, a binary SEG (highdicom) and a Secondary Capture (highdicom)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = _ct_series(generate_uid(), slices)
    mask = np.zeros((slices, source[0].Rows, source[0].Columns), dtype=bool)
    mask[slices // 2, 40:80, 40:80] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="oncopacs-test", version="0.1", family=codes.DCM.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    seg = hd.seg.Segmentation(
        source_images=source, pixel_array=mask, segmentation_type="BINARY",
        segment_descriptions=[segment], series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="oncopacs",
        manufacturer_model_name="test", software_versions="0.1", device_serial_number="0")
    card = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source[0], pixel_array=np.full((32, 48, 3), 200, dtype=np.uint8),
        photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        patient_orientation=("L", "P"), series_instance_uid=generate_uid(), series_number=901,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="oncopacs",
        transfer_syntax_uid=ExplicitVRLittleEndian)
    ct_paths = []
    for ds in source:
        path = folder / f"ct-{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        ct_paths.append(path)
    seg_path, sc_path = folder / "seg.dcm", folder / "card.dcm"
    seg.save_as(seg_path, enforce_file_format=True)
    card.save_as(sc_path, enforce_file_format=True)
    uids = {p: str(ds.SOPInstanceUID) for p, ds in zip(ct_paths, source, strict=True)}
    uids[seg_path], uids[sc_path] = str(seg.SOPInstanceUID), str(card.SOPInstanceUID)
    return Results(tuple(ct_paths), seg_path, sc_path, uids)


@dataclass
class ScriptedScp:
    """A pynetdicom Storage SCP whose status per SOP instance follows a script."""

    port: int
    script: dict[str, list[int]]
    received: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        uid = str(request.AffectedSOPInstanceUID)
        with self.lock:
            self.received.append(uid)
            statuses = self.script.get(uid, [])
            return statuses.pop(0) if statuses else 0x0000


@contextmanager
def scripted_scp(script: Mapping[str, Sequence[int]] | None = None, *, only_ct: bool = False,
                 ) -> Iterator[ScriptedScp]:
    """Run a Storage SCP on a free loopback port; ``script`` maps SOP instance UID -> statuses.

    ``only_ct`` accepts CT Image Storage only (no context for SEG or SC).
    """
    scp = ScriptedScp(free_port(), {uid: list(codes_) for uid, codes_ in (script or {}).items()})
    ae = AE(ae_title="SCRIPTED")
    if only_ct:
        ae.add_supported_context(CTImageStorage)
    else:
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax))
    server = ae.start_server(("127.0.0.1", scp.port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, scp.handle)])
    assert server is not None
    try:
        yield scp
    finally:
        server.shutdown()
