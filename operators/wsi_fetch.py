"""WSI fetch (pipeline A): finds the patient's H&E slide in the archive and opens it."""

from app.pipeline import fetch_slide
from operators.base import JobOperator


class WsiFetchOperator(JobOperator):
    """WSI fetch (pipeline A): finds the patient's H&E slide in the archive and opens it."""

    stage = "wsi_fetch"
    run = staticmethod(fetch_slide)
