"""The losses a network trains with: one table, read by the runtime and by the compiler alike.

A loss is the mean over a batch of a per-image value, each image's output
against its target. The compiler imports this table (``cnnc_runtime`` never
imports ``cnnc``): the train section's parser and ``--loss`` take its names,
autodiff and code generation make one ``step_<name>`` entry point for each,
and the loss kernels (``cnnc.codegen.loss.KERNELS``) and the float64 reference
(``cnnc.reference.LOSS_REFERENCES``) are keyed by the same names, which
``tests/ops/test_table.py`` checks. This module needs nothing but the standard
library.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    """What the rest of cnnc needs to know about a loss."""

    name: str
    labels: bool  # the targets are class labels, one integer per image (else real arrays of the output's shape,
    #               or labels taken as one-hot targets)
    applies_softmax: bool  # the loss applies softmax itself, so it reads the input of a final softmax layer
    per_output: bool  # the mean over every output value, else over images

    def scale(self, images: int, outputs: int) -> float:
        """The factor that turns the summed per-image losses (and their gradient) of a batch into the mean."""
        return 1.0 / (images * outputs) if self.per_output else 1.0 / images


LOSSES: dict[str, Loss] = {
    # softmax, then the negative log-likelihood of the label
    "cross_entropy": Loss("cross_entropy", labels=True, applies_softmax=True, per_output=False),
    # the squared difference of each output from its target
    "mse": Loss("mse", labels=False, applies_softmax=False, per_output=True),
}
DEFAULT_LOSS = "cross_entropy"  # when neither the train section nor the caller names one


def choices() -> str:
    """The names, for messages: "cross_entropy or mse"."""
    return " or ".join(LOSSES)
