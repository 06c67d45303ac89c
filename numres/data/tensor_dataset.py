"""``TensorDataset``: PyTorch's dataset of arrays that share their first axis."""
from __future__ import annotations

from .. import backend as B

__all__ = ["TensorDataset"]


class TensorDataset:
    """Wrap arrays (NumPy or CuPy) of equal length along their first axis; ``dataset[i]`` is the tuple
    ``(a[i], b[i], ...)``, as in ``torch.utils.data.TensorDataset``.

    ``i`` may be anything the arrays take as an index on their first axis: an int, a slice, or an
    integer array of indices, which gives a whole batch in one gather::

        dataset = nr.data.TensorDataset(x, y)
        for start in range(0, len(dataset), 64):
            xb, yb = dataset[start:start + 64]

    The arrays are kept as given (``dataset.tensors``), never copied.
    """

    def __init__(self, *tensors):
        if not tensors:
            raise ValueError("TensorDataset needs at least one array")
        for position, tensor in enumerate(tensors):
            try:
                B.backend_of(tensor)
            except TypeError:
                raise TypeError(f"TensorDataset takes NumPy or CuPy arrays; argument {position} is a "
                                f"{type(tensor).__name__}") from None
            if tensor.ndim == 0:
                raise ValueError(f"TensorDataset: argument {position} is a 0-d array, it has no first axis")
        lengths = [tensor.shape[0] for tensor in tensors]
        if len(set(lengths)) != 1:
            raise ValueError(f"Size mismatch between tensors: their first axes have lengths {lengths}")
        self.tensors = tuple(tensors)

    def __getitem__(self, index):
        return tuple(tensor[index] for tensor in self.tensors)

    def __len__(self):
        return self.tensors[0].shape[0]

    def __repr__(self):
        shapes = ", ".join(str(tuple(t.shape)) for t in self.tensors)
        return f"TensorDataset({shapes})"
