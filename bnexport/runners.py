"""Runners: the one family that runs a model for parity, bench and tune (Polygraphy's
``<Backend>Runner``).

Each runner is configured once and reused across batch sizes. A *feed* maps each input's name (the
ONNX input name, which is also the PyTorch forward's parameter name) to an array:

- ``infer(feed) -> {output name: array}`` — what parity compares (inputs copied, outputs named);
- ``prepare(feed) -> call`` — the call bound to ``feed`` that timing measures (no copies, outputs
  as the backend returns them);
- ``info()`` — what the runner is, for reports.

:class:`TorchRunner` runs a PyTorch module eagerly on the CPU (fp32, or a float64 copy);
:class:`ProgramRunner` a `torch.export` program loaded from a ``.pt2``; :class:`OnnxRuntimeRunner`
an onnxruntime session made by :func:`bnexport.ort.make_session`, or one the caller already holds.
Each knows its tolerance ``kind`` (``torch``, ``cpu``, ``cuda``, ``cuda-tf32``) and whether it
``gating`` (a failing non-gating runner is reported, never fails a check).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from bnexport.errors import ExportError, raise_if_interrupted
from bnexport.signature import (
    SINGLE_OUTPUT_NAME,
    TensorSpec,
    default_output_names,
    flatten_outputs,
    match_inputs,
    name_outputs,
)

if TYPE_CHECKING:
    import numpy as np

    from bnexport.ort import SessionConfig

#: How much of a failure's message an `ExportError` from loading a program carries.
_CAUSE_CHARS = 1500

Feed = Mapping[str, "np.ndarray"]


class Runner:
    """Base class: ``infer(feed) -> outputs``, ``prepare(feed) -> call``, ``info()``."""

    name: str
    kind: str = "torch"
    gating: bool = True
    description: str = ""

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        """Outputs by name for one batch (``feed``: input name → array)."""
        raise NotImplementedError

    def prepare(self, feed: Feed) -> Callable[[], Any]:
        """The call bound to ``feed`` that timing measures (default: ``infer`` on it)."""
        return functools.partial(self.infer, feed)

    def info(self) -> dict[str, Any]:
        """What the runner is, for reports."""
        return {
            "name": self.name,
            "kind": self.kind,
            "gating": self.gating,
            "description": self.description,
        }


class TorchRunner(Runner):
    """A PyTorch module on the CPU (``inference_mode``, eval) in fp32 or a float64 copy.

    Inputs are passed by keyword when every input name is a parameter of ``forward``, else by
    position in ``input_names`` order. Outputs (a tensor, or a tuple/list/dict of them) are
    flattened and named by ``output_names`` — by key when a dict's keys are those names, else by
    order; with no ``output_names``, as the exporter names them (``output``, a dict's keys, or
    ``output_0``, …).
    """

    def __init__(
        self,
        model: Any,
        input_names: Sequence[str],
        output_names: Sequence[str] | None = None,
        *,
        name: str = "",
        dtype: str = "float32",
        kind: str = "torch",
        gating: bool = True,
        description: str = "",
        copy_model: bool = False,
    ) -> None:
        import torch

        self.name = name or ("torch-fp32" if dtype == "float32" else "torch-fp64")
        self.kind = kind
        self.gating = gating
        self.dtype = dtype
        self._torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if copy_model or dtype != "float32":
            model = copy.deepcopy(model)
        self.model = model.to(self._torch_dtype) if dtype != "float32" else model
        self.model.eval()
        self.input_names = tuple(input_names)
        self.output_names = None if output_names is None else tuple(output_names)
        self.by_name = match_inputs(self.input_names, self.model)
        self.description = description or f"PyTorch {dtype} on the CPU"

    def _tensors(self, feed: Feed, *, copy: bool) -> dict[str, Any]:
        """``feed`` as tensors, floats cast to the runner's dtype (copied with ``copy``: a model
        that writes into its input must not change what the next runner sees)."""
        import numpy as np
        import torch

        tensors = {}
        for name in self.input_names:
            array = np.array(feed[name], copy=True) if copy else feed[name]
            tensor = torch.from_numpy(array)
            if np.issubdtype(array.dtype, np.floating):
                tensor = tensor.to(self._torch_dtype)
            tensors[name] = tensor
        return tensors

    def prepare(self, feed: Feed) -> Callable[[], Any]:
        return functools.partial(self._forward, self._tensors(feed, copy=False))

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        out = self._forward(self._tensors(feed, copy=True))
        return _named(out, self.output_names, self.name)

    def _forward(self, tensors: Mapping[str, Any]) -> Any:
        """One forward on ``tensors`` (by name or position) under ``inference_mode``."""
        import torch

        with torch.inference_mode():
            if self.by_name:
                return self.model(**tensors)
            return self.model(*(tensors[n] for n in self.input_names))

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "dtype": self.dtype,
            "inputs_by": "name" if self.by_name else "position",
        }


class ProgramRunner(Runner):
    """A `torch.export` program loaded from a ``.pt2`` (`load`), called as a user calls it:
    ``torch.export.load(path).module()(*inputs)``, positionally in ``input_names`` order."""

    def __init__(
        self,
        module: Any,
        input_names: Sequence[str],
        output_names: Sequence[str],
        *,
        name: str = "torch-export",
        kind: str = "torch",
        gating: bool = True,
        description: str = "",
    ) -> None:
        self.module = module
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.name = name
        self.kind = kind
        self.gating = gating
        self.description = description or "a torch.export program (.pt2) on the CPU"

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        input_names: Sequence[str],
        output_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> ProgramRunner:
        """Load the program at ``path`` with `torch.export.load`; ``output_names`` default to the
        exporter's names for its output structure. Raises `ExportError`."""
        import torch

        try:
            program = torch.export.load(str(path))
            module = program.module()
        except Exception as exc:
            raise_if_interrupted(exc)
            cause = " ".join(f"{type(exc).__name__}: {exc}".split())
            if len(cause) > _CAUSE_CHARS:
                cause = cause[:_CAUSE_CHARS] + " …"
            raise ExportError(f"loading {path} with torch.export.load failed: {cause}") from exc
        names = output_names or default_output_names(program.call_spec.out_spec)
        return cls(module, input_names, names, **kwargs)

    def prepare(self, feed: Feed) -> Callable[[], Any]:
        import torch

        args = tuple(torch.from_numpy(feed[n]) for n in self.input_names)
        module = self.module

        def call() -> Any:
            with torch.inference_mode():
                return module(*args)

        return call

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        import numpy as np
        import torch

        # An exported program's module refuses .eval(): call it as is (it has no modes).
        args = [torch.from_numpy(np.array(feed[n], copy=True)) for n in self.input_names]
        with torch.inference_mode():
            out = self.module(*args)
        return name_outputs(out, self.output_names, "the saved program")


class OnnxRuntimeRunner(Runner):
    """One onnxruntime session: made once by `bnexport.ort.make_session` (which refuses a silent
    CUDA fallback) from a file or bytes and a `SessionConfig`, or `wrap`-ped when the caller
    already holds one (a tuned file opened with its own settings, onnxruntime's defaults).

    The feed is keyed by the session's input names, or by ``feed_names`` (one per session input,
    in order) when the caller names the inputs its own way (another exporter's file of the model).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        config: SessionConfig,
        *,
        name: str,
        kind: str = "cpu",
        gating: bool = True,
        description: str = "",
        feed_names: Sequence[str] | None = None,
    ) -> None:
        from bnexport.ort import make_session

        self._setup(make_session(model, config), config, name, kind, gating, feed_names)
        self.description = description or (
            f"onnxruntime {config.provider.upper()}, graph optimizations "
            f"{config.graph_optimization_level}"
        )

    @classmethod
    def wrap(
        cls,
        session: Any,
        *,
        name: str,
        kind: str = "cpu",
        gating: bool = True,
        description: str = "",
        feed_names: Sequence[str] | None = None,
    ) -> OnnxRuntimeRunner:
        """A runner over an existing ``onnxruntime.InferenceSession``."""
        runner = cls.__new__(cls)
        runner._setup(session, None, name, kind, gating, feed_names)
        runner.description = description or "onnxruntime session"
        return runner

    def _setup(
        self,
        session: Any,
        config: SessionConfig | None,
        name: str,
        kind: str,
        gating: bool,
        feed_names: Sequence[str] | None,
    ) -> None:
        self.session = session
        self.config = config
        self.name = name
        self.kind = kind
        self.gating = gating
        self.output_names = tuple(o.name for o in session.get_outputs())
        session_names = [i.name for i in session.get_inputs()]
        if feed_names is not None and len(feed_names) != len(session_names):
            raise ValueError(
                f"{name}: {len(feed_names)} feed names {list(feed_names)} for the session's "
                f"{len(session_names)} inputs {session_names}"
            )
        self._feed_names = (
            None if feed_names is None else dict(zip(session_names, feed_names, strict=True))
        )

    def _bind(self, feed: Feed) -> dict[str, np.ndarray]:
        """``feed`` keyed by the session's input names."""
        if self._feed_names is None:
            return dict(feed)
        return {name: feed[key] for name, key in self._feed_names.items()}

    @functools.cached_property
    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The session's inputs (``ParityInputError`` for a type a runner cannot feed)."""
        return tuple(TensorSpec.from_ort(n) for n in self.session.get_inputs())

    @functools.cached_property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec.from_ort(n) for n in self.session.get_outputs())

    def prepare(self, feed: Feed) -> Callable[[], Any]:
        """``session.run(None, feed)``, the way users call it (outputs as a list)."""
        bound = self._bind(feed)
        run = self.session.run

        def call() -> Any:
            return run(None, bound)

        return call

    def infer(self, feed: Feed) -> dict[str, np.ndarray]:
        outs = self.session.run(None, self._bind(feed))
        return dict(zip(self.output_names, outs, strict=True))

    def info(self) -> dict[str, Any]:
        providers = list(self.session.get_providers())
        if self.config is None:
            return {**super().info(), "session_providers": providers}
        return {
            **super().info(),
            "provider": self.config.provider,
            "graph_optimization_level": self.config.graph_optimization_level,
            "session_providers": providers,
            "provider_options": self.config.resolved_provider_options(),
            "session_config": self.config.to_dict(),
        }


def _named(out: Any, output_names: tuple[str, ...] | None, runner: str) -> dict[str, np.ndarray]:
    """``out`` named by ``output_names``, or as the exporter names an output structure."""
    if output_names is not None:
        return name_outputs(out, output_names, runner)
    items = flatten_outputs(out)
    keys = [k for k, _ in items]
    if len(items) == 1 and keys[0] is None:
        names: Sequence[str] = (SINGLE_OUTPUT_NAME,)
    elif all(k is not None for k in keys) and len(set(keys)) == len(keys):
        names = [str(k) for k in keys]
    else:
        names = [f"output_{i}" for i in range(len(items))]
    return {n: t.detach().cpu().numpy() for n, (_, t) in zip(names, items, strict=True)}


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` (None: unchanged), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(before)
