"""PACS export: queues the results in the durable outbox and ends the job."""

from app.pipeline import export_results
from operators.base import JobOperator


class PacsExportOperator(JobOperator):
    """Queues the results; ExportPumpOperator delivers them."""

    stage = "export"
    emits = False
    run = staticmethod(export_results)
