"""How a model package is identified inside result objects.

- SEG: the Algorithm Identification Sequence of each segment
  (:func:`algorithm_identification`): name, family "Artificial Intelligence", version,
  source ``oncopacs``, and the package hash as the parameter ``sha256=<hex>``;
- every object: a Contributing Equipment Sequence item (:func:`contributing_equipment`);
- SR: TID 4019 Algorithm Identification (:func:`sr_algorithm_identification`) and the
  device observer (:func:`device_observer`), whose UID is derived from the package
  identity so the same package is always the same device.

Contributing Equipment purpose of reference: IHE AI Results names it "Processing
Algorithm" with the temporary code ``(Newcode1, 99IHE, "Processing Algorithm")``, which
is not in DICOM CID 7005 and which highdicom refuses. The standard code for the same
role, ``(109102, DCM, "Processing Equipment")``, is used, and the item's Contribution
Description says "Processing Algorithm" with the package name, version and hash.
(``109103`` is "Modifying Equipment", which is for objects changed in place.)
"""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from app.results import ModelIdentity, ResultsSettings

__all__ = [
    "PURPOSE_OF_REFERENCE",
    "algorithm_identification",
    "contributing_equipment",
    "device_observer",
    "device_observer_uid",
    "sr_algorithm_identification",
]

PURPOSE_OF_REFERENCE = codes.DCM.ProcessingEquipment
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
ALGORITHM_SOURCE = "oncopacs"


def algorithm_identification(model: ModelIdentity) -> hd.AlgorithmIdentificationSequence:
    """The SEG Algorithm Identification Sequence of ``model``."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name, family=ALGORITHM_FAMILY, version=model.version,
        source=ALGORITHM_SOURCE, parameters={"sha256": model.sha256})


def contribution_description(model: ModelIdentity) -> str:
    """Processing Algorithm, with the package identity (fits the ST value representation)."""
    return f"Processing Algorithm: {model.name} {model.version} sha256={model.sha256}"


def contributing_equipment(model: ModelIdentity,
                           settings: ResultsSettings) -> hd.ContributingEquipment:
    """A Contributing Equipment Sequence item naming ``model`` as the processing algorithm."""
    return hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=PURPOSE_OF_REFERENCE,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=settings.device_serial_number,
        institution_name=settings.institution_name,
        contribution_description=contribution_description(model),
    )


def sr_algorithm_identification(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of ``model``, for SR measurement groups."""
    return hd.sr.AlgorithmIdentification(
        name=model.name, version=model.version, parameters=[f"sha256={model.sha256}"],
        family=ALGORITHM_FAMILY, manufacturer=ALGORITHM_SOURCE)


def device_observer_uid(model: ModelIdentity) -> str:
    """A UID that depends only on the package identity (name, version, hash)."""
    return str(generate_uid(entropy_srcs=["oncopacs-device", model.name, model.version,
                                          model.sha256]))


def device_observer(model: ModelIdentity, settings: ResultsSettings) -> ObserverContext:
    """TID 1002 observer context: ``model`` as the device that made the observations."""
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model),
            name=f"{model.name} {model.version}"[:64],
            manufacturer_name=settings.manufacturer,
            model_name=model.name,
        ),
    )
