"""Model A (pipeline A): liver-metastasis risk from CT, slide tiles and clinical fields."""

from app.model_steps import predict_crc
from operators.base import JobOperator


class CrcModelOperator(JobOperator):
    """Model A (pipeline A): liver-metastasis risk from CT, slide tiles and clinical fields."""

    stage = "model_a"
    run = staticmethod(predict_crc)
