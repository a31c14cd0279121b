"""Reading intermediate values of a model in ONNX Runtime, batch by batch."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx


class Activations:
    """An onnxruntime session that can return any value of the model's main graph, not only its outputs.

    The requested values are appended to the graph outputs just long enough to build the session, so the model
    object is left as it was.
    """

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, names: list[str], providers: tuple[str, ...],
                 workdir: str, label: str) -> None:
        from ..validate.runner import make_session
        from .io import load_model
        if isinstance(model, (str, Path)) and not names:  # nothing extra to read: onnxruntime loads the file
            self.session = make_session(model, providers, workdir, label)
            self.outputs = [o.name for o in self.session.get_outputs()]
            self.inputs = {i.name for i in self.session.get_inputs()}
            self.providers = self.session.get_providers()
            self.feed_names = set(self.inputs)
            self.label = label
            return
        proto = load_model(model).model if isinstance(model, (str, Path)) else model
        self.inputs = {i.name for i in proto.graph.input}
        self.outputs = [o.name for o in proto.graph.output]  # the model's own outputs, in order
        existing = set(self.outputs)
        added = [n for n in dict.fromkeys(names) if n not in existing and n not in self.inputs]
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in added)
        try:
            self.session = make_session(proto, providers, workdir, label)
        finally:
            del proto.graph.output[len(proto.graph.output) - len(added):]
        self.providers = self.session.get_providers()
        self.feed_names = {i.name for i in self.session.get_inputs()}
        self.label = label

    @property
    def device(self) -> str:
        """Where the session computes: 'cuda' when the CUDA provider was created, else 'cpu'."""
        return ort_device(self.providers)

    def _run_bound(self, feeds: Mapping, wanted: list[str]) -> list[np.ndarray]:
        """Run with IO binding: inputs that are already OrtValues on the device are used in place (one upload
        serves both models), outputs are written on the device and copied back once."""
        import onnxruntime as ort
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if name not in self.feed_names:
                continue
            if not isinstance(value, ort.OrtValue):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in wanted:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def run(self, feeds: Mapping[str, np.ndarray], names: list[str], bind: bool | None = None
            ) -> dict[str, np.ndarray]:
        """Values of ``names`` for ``feeds`` (numpy arrays, or OrtValues already on the device). IO binding is
        used on CUDA (``bind`` forces it either way)."""
        wanted = [n for n in dict.fromkeys(names) if n not in self.inputs]
        use_binding = self.device == "cuda" if bind is None else bind
        try:
            if not wanted:
                values = []
            elif use_binding:
                values = self._run_bound(feeds, wanted)
            else:
                values = self.session.run(wanted, {k: v for k, v in feeds.items() if k in self.feed_names})
        except Exception as e:  # the data was checked against the declared inputs before: do not blame it
            from ..errors import UnsupportedError
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnsupportedError(f"onnxruntime failed to run the {self.label} model on data that matches its "
                                   f"declared inputs: {message}") from None
        out = dict(zip(wanted, values))
        out.update({n: host_array(feeds[n]) for n in names if n in self.inputs})
        return out


def host_array(value) -> np.ndarray:
    """A value as a numpy array of its own: an OrtValue's ``numpy()`` is a view that dies with the OrtValue."""
    if isinstance(value, np.ndarray) or not hasattr(value, "numpy"):
        return np.asarray(value)
    return np.array(value.numpy(), copy=True)


def ort_device(providers) -> str:
    """Where sessions with these providers compute: 'cuda' when the CUDA provider comes first, else 'cpu'."""
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"


def upload(batch: Mapping[str, np.ndarray], device: str) -> dict:
    """Put a batch on ``device`` once, as OrtValues both sessions can read (numpy stays as is on the CPU)."""
    if device == "cpu":
        return dict(batch)
    import onnxruntime as ort
    return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0) for k, v in batch.items()}
