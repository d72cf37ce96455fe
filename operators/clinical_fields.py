"""Clinical fields (pipeline A): the latest values from the clinical store, with sources."""

from app.pipeline import clinical_inputs
from operators.base import JobOperator


class ClinicalFieldsOperator(JobOperator):
    """Clinical fields (pipeline A): the latest values from the clinical store, with sources."""

    stage = "clinical_fields"
    run = staticmethod(clinical_inputs)
