"""Attention writer (pipeline A): model A's tile attention as a SEG on the slide."""

from app.model_steps import write_attention
from operators.base import JobOperator


class AttentionWriterOperator(JobOperator):
    """Attention writer (pipeline A): model A's tile attention as a SEG on the slide."""

    stage = "attention_writer"
    run = staticmethod(write_attention)
