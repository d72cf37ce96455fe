"""Result card: a Secondary Capture summary for viewers that do not render SR."""

from app.pipeline import write_card
from operators.base import JobOperator


class ResultCardOperator(JobOperator):
    """Result card: a Secondary Capture summary for viewers that do not render SR."""

    stage = "result_card"
    run = staticmethod(write_card)
