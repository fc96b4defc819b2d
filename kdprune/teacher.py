"""Where the teacher's weights come from (``teacher.init``):

  scratch     a fresh model, trained for ``teacher.epochs``
  checkpoint  ``teacher.checkpoint``, a file inside ``teachers/`` (a DVC dependency of the teacher stage):
              what a plain script writes with ``torch.save(model.state_dict(), path)``, or a kdprune
              checkpoint; loaded with ``weights_only=True``, every mismatched key named; NaN, integer or complex
              weights refused, other float dtypes converted to float32 (the returned line says so)
  pretrained  torchvision's DEFAULT weights of ``model.name`` (its weights enum), from torch's hub cache;
              with a class count other than the weights' (1000 for ImageNet) the classifier starts fresh
              and needs ``teacher.epochs > 0``

``teacher.epochs: 0`` (checkpoint or pretrained only) uses the imported teacher as it is: the stage only
measures it. More epochs fine-tune it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from kdprune import checkpoint
from kdprune.errors import UserError
from kdprune.models import torchvision as tvmodels
from kdprune.prune.channel import output_layer


class TeacherError(UserError, ValueError):
    """The teacher cannot be built or imported as params.yaml asks."""


def model_source(model_params) -> str:
    """The param that chose the model, for messages: 'model.factory pkg.mod:fn', 'model.name resnet18', ..."""
    if model_params.arch == "custom":
        return f"model.factory {model_params.factory}"
    if model_params.arch == "torchvision":
        return f"model.name {model_params.name}"
    return f"model.arch {model_params.arch} (depth {model_params.depth})"


def check_runs(model: nn.Module, input_shape: tuple[int, ...], what: str, num_classes: int | None = None,
               source: str | None = None) -> None:
    """One forward pass of a zero batch; a model that cannot take the data's input size fails here, in one line,
    and so does one whose logits per image are not ``num_classes`` (``source``: the param that chose the
    model, as ``model_source`` names it)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=next(model.parameters()).device))
    except Exception as e:  # noqa: BLE001 - whatever the architecture raises, say which model and which input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherError(f"{what} cannot run on inputs of shape {tuple(input_shape)}: {first[:300]}") from None
    finally:
        model.train(was_training)
    if not (isinstance(out, torch.Tensor) and out.ndim == 2):
        raise TeacherError(f"{what} must return logits of shape (batch, classes), got "
                           f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise TeacherError(f"{source or what} returns {out.shape[1]} logits per image but the data has {num_classes} "
                           "classes")


def import_weights(model: nn.Module, t, name: str | None, input_shape: tuple[int, ...]) -> str:
    """Load the weights ``teacher.init`` names into ``model`` (``t``: the teacher params section; ``name``:
    ``model.name``, the torchvision builder); returns a line saying what was loaded."""
    if t.init == "checkpoint":
        note = checkpoint.load_weights(model, checkpoint.state_dict_of(t.checkpoint), t.checkpoint)
        return f"imported {t.checkpoint}" + (f" ({note})" if note else "")
    if t.init == "pretrained":
        state, classes = tvmodels.pretrained_state_dict(name)
        head = output_layer(model.eval(), torch.zeros(1, *input_shape))
        head_name = next(n for n, m in model.named_modules() if m is head)
        own = model.state_dict()
        mismatched = [k for k in state if k.startswith(f"{head_name}.") and k in own and state[k].shape != own[k].shape]
        if mismatched:  # another class count: the classifier starts fresh
            if t.epochs == 0:
                raise TeacherError(f"teacher.init pretrained: {name}'s weights have {classes} classes and the data "
                                   f"{own[mismatched[0]].shape[0]}; its classifier must be trained: set "
                                   "teacher.epochs > 0")
            state = {**state, **{k: own[k] for k in mismatched}}
        checkpoint.load_weights(model, state, f"torchvision {name} DEFAULT weights")
        return f"torchvision's pretrained {name}" + (f" (new {head_name} for the data's classes)" if mismatched else "")
    return "trained from scratch"


CHANCE_MARGIN = 10.0  # points above chance (100 / classes) below which a teacher has learnt next to nothing
MAX_TRAIN_TEST_GAP = 30.0  # points between train and test accuracy beyond which the teacher does not generalise


def accuracy_warning(history: list[dict], num_classes: int) -> str | None:
    """A one-line ``warning:`` when the teacher's final test accuracy is near chance or far below its train
    accuracy (torchvision's MobileNetV3-Small at 32 px: train 98.75 %, test 16.90 %: its BatchNorm statistics
    do not settle), None otherwise. Pruning and distilling such a teacher cannot give a useful student."""
    last = history[-1] if history else {}
    test, train = last.get("test_acc"), last.get("train_acc")
    if not isinstance(test, (int, float)) or not math.isfinite(test):
        return None
    chance = 100.0 / max(1, num_classes)
    problems = []
    if isinstance(train, (int, float)) and math.isfinite(train) and train - test > MAX_TRAIN_TEST_GAP:
        problems.append(f"far below its train accuracy {train:.2f} % ({train - test:.1f} points)")
    if test < chance + CHANCE_MARGIN:
        problems.append(f"near chance ({chance:.1f} % for {num_classes} classes)")
    if not problems:
        return None
    return (f"warning: the teacher's test accuracy {test:.2f} % is {' and '.join(problems)}, so its pruned and "
            "distilled students will not be useful. Try more teacher.epochs at a lower teacher.lr, a larger "
            "data.image_size, or another model (torchvision's MobileNetV3 at 32 px keeps its BatchNorm statistics "
            "unsettled: its eval accuracy stays near chance)")
