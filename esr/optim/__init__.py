"""What happens to the weights besides the optimizer step: EffOPD extrapolation and the probes that judge it."""

from esr.optim.extrapolate import ExtrapolationEvent, Extrapolator, extrapolation_params, is_due
from esr.optim.probe import EvalProbe, KLProbe, make_extrapolator

__all__ = ["EvalProbe", "ExtrapolationEvent", "Extrapolator", "KLProbe", "extrapolation_params", "is_due",
           "make_extrapolator"]
