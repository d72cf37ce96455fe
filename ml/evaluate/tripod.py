"""The TRIPOD+AI (2024) checklist and where an oncopacs evaluation report answers it.

Items follow Collins et al., BMJ 2024;385:e078378 (27 items, with sub-items),
worded briefly. Each entry says which report section answers the item, whether
fully or only in part, or that software cannot answer it and the authors must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["reported", "partly", "authors"]

AUTHORS = "to be completed by the authors"


@dataclass(frozen=True)
class TripodItem:
    """One checklist item and where the report answers it."""

    item: str
    topic: str
    wording: str
    status: Status
    where: str
    """Report section(s) and a short comment; empty for items left to the authors."""


def _i(item: str, topic: str, wording: str, status: Status, where: str = "") -> TripodItem:
    return TripodItem(item, topic, wording, status, where)


TRIPOD_AI_ITEMS: tuple[TripodItem, ...] = (
    _i("1", "Title", "Identify the study as developing or evaluating a prediction model, "
       "the target population and the outcome", "partly",
       "§1 (model, outcome, evaluation on a held-out set); manuscript title by the authors"),
    _i("2", "Abstract", "Structured summary (TRIPOD+AI for Abstracts)", "authors"),
    _i("3a", "Background", "Healthcare context, rationale, existing models", "authors"),
    _i("3b", "Background", "Target population, place in the care pathway, intended users",
       "authors"),
    _i("3c", "Background", "Known health inequalities between groups", "authors"),
    _i("4", "Objectives", "Objectives; development, evaluation or both", "partly",
       "§1: evaluation of a fixed model on held-out data"),
    _i("5a", "Source of data", "Data sources for development and evaluation, representativeness",
       "partly", "§2 (data and split); representativeness by the authors"),
    _i("5b", "Source of data", "Dates of accrual and end of follow-up", "authors"),
    _i("6a", "Participants", "Setting; number and location of centres", "partly",
       "§2 and §6 (centres and their case counts); setting by the authors"),
    _i("6b", "Participants", "Eligibility criteria", "authors"),
    _i("6c", "Participants", "Treatments received", "authors"),
    _i("7", "Data preparation", "Pre-processing and quality checks", "partly",
       "§3 (notes from the scoring code)"),
    _i("8a", "Outcome", "Definition, time horizon, how and when assessed", "partly",
       "§1 (outcome), §9 (follow-up); assessment by the authors"),
    _i("8b", "Outcome", "Qualifications of outcome assessors", "authors"),
    _i("8c", "Outcome", "Blinding of outcome assessment", "authors"),
    _i("9a", "Predictors", "Choice of initial predictors and pre-selection", "authors"),
    _i("9b", "Predictors", "Definition of predictors, how and when measured", "authors",
       "see the model package's MODEL_CARD.md and configs/metadata.json (inputs)"),
    _i("9c", "Predictors", "Qualifications of predictor assessors", "authors"),
    _i("10", "Sample size", "How the study size was arrived at; justification", "partly",
       "§1 and §2 (cases, events, split counts); justification by the authors"),
    _i("11", "Missing data", "How missing data were handled", "partly",
       "§2: every evaluated case has a model output; exclusions by the authors"),
    _i("12a", "Analytical methods", "How data were used and partitioned", "reported",
       "§2 (split: held-out centre, seeds, counts)"),
    _i("12b", "Analytical methods", "Handling of predictors (transformations, scaling)",
       "authors", "see MODEL_CARD.md"),
    _i("12c", "Analytical methods", "Model type, building steps, tuning, internal validation",
       "authors", "see MODEL_CARD.md"),
    _i("12d", "Analytical methods", "Heterogeneity across clusters (centres)", "reported",
       "§6 (AUC per centre) and §10 (methods)"),
    _i("12e", "Analytical methods", "Performance measures and plots: discrimination, "
       "calibration, clinical utility", "reported", "§10 (methods), §4-§9, §11 (figures)"),
    _i("12f", "Analytical methods", "Model updating (e.g. recalibration)", "reported",
       "§10: none; the model and its threshold are applied unchanged"),
    _i("12g", "Analytical methods", "How predictions were calculated in the evaluation",
       "partly", "§1 (model package name and version); code access by the authors"),
    _i("13", "Class imbalance", "Methods for class imbalance and recalibration", "authors"),
    _i("14", "Fairness", "Approaches to model fairness", "authors",
       "no sociodemographic subgroup analysis is computed here"),
    _i("15", "Model output", "Output type; thresholds and how they were chosen", "reported",
       "§7 (probability; threshold fixed on training data)"),
    _i("16", "Training versus evaluation", "Differences between development and evaluation "
       "data", "partly", "§2 (held-out centre); other differences by the authors"),
    _i("17", "Ethical approval", "Ethics committee and consent or waiver", "authors"),
    _i("18a", "Open science", "Funding", "authors"),
    _i("18b", "Open science", "Conflicts of interest", "authors"),
    _i("18c", "Open science", "Protocol", "authors"),
    _i("18d", "Open science", "Registration", "authors"),
    _i("18e", "Open science", "Data sharing", "authors"),
    _i("18f", "Open science", "Code sharing", "authors",
       "the evaluation code is oncopacs ml/evaluate and ml/stats"),
    _i("19", "Patient and public involvement", "Patient and public involvement", "authors"),
    _i("20a", "Participants", "Flow of participants; with and without the outcome; follow-up",
       "partly", "§1, §2 (counts), §9 (follow-up); flow diagram by the authors"),
    _i("20b", "Participants", "Characteristics overall and per data source", "partly",
       "§6 (cases and events per centre); other characteristics by the authors"),
    _i("20c", "Participants", "Comparison with the development data", "partly",
       "§2 (split counts); predictor distributions by the authors"),
    _i("21", "Model development", "Participants and events in each analysis", "reported",
       "§1 (evaluation), §2 (training, validation, test counts)"),
    _i("22", "Model specification", "Full model (code, object, API) and access restrictions",
       "partly", "§1 (package); access by the authors"),
    _i("23a", "Model performance", "Performance with confidence intervals, key subgroups",
       "reported", "§4 (AUC), §5 (DeLong), §7 (threshold), §8 (calibration), "
       "§9 (time to event), §11 (figures)"),
    _i("23b", "Model performance", "Heterogeneity of performance across clusters", "reported",
       "§6"),
    _i("24", "Model updating", "Results of any model updating", "reported",
       "§10: not applicable (no updating)"),
    _i("25", "Interpretation", "Overall interpretation, including fairness", "authors"),
    _i("26", "Limitations", "Limitations and their effects on bias and generalisability",
       "partly", "§3 (notes), §6 (centres not estimable); discussion by the authors"),
    _i("27a", "Usability", "Handling of poor-quality or unavailable input data", "authors"),
    _i("27b", "Usability", "User interaction and expertise required", "authors"),
    _i("27c", "Usability", "Next steps for research", "authors"),
)
"""Every TRIPOD+AI item, in checklist order."""


def checklist_markdown() -> list[str]:
    """The checklist as Markdown table lines."""
    label = {"reported": "reported", "partly": "partly", "authors": AUTHORS}
    lines = ["| Item | Topic | Checklist item (short) | Status | Where answered |",
             "|---|---|---|---|---|"]
    for it in TRIPOD_AI_ITEMS:
        lines.append(f"| {it.item} | {it.topic} | {it.wording} | {label[it.status]} | "
                     f"{it.where or '-'} |")
    return lines
