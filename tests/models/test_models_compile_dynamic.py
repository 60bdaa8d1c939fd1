"""Every model under ``torch.compile(dynamic=True)``: S3D at two crop sizes (symbolic spatial
sizes reach sparsify's mask pyramid and the ops), BertsWin and ViT-MAE (built for one crop) at two
batch sizes; the compiled loss equals eager's and its backward runs. aot_eager keeps CI time low:
what is checked is that dynamo and the ops' fake implementations accept symbolic sizes."""

from __future__ import annotations

import pytest
import torch

from mae3d.masking import random_block_mask
from mae3d.train.registry import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _mask(batch: int, grid: int, seed: int) -> torch.Tensor:
    return random_block_mask(batch, grid, 0.75, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "shapes"),
    [("s3d", [(1, 32), (1, 40)]), ("bertswin", [(1, 32), (2, 32)]), ("vitmae", [(1, 32), (2, 32)])],
)
def test_model_compiles_with_dynamic_shapes(name, shapes):
    torch.manual_seed(0)
    model = create_model(name, "tiny", input_size=32)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=True, backend="aot_eager")
    for batch, edge in shapes:
        x = torch.randn(batch, 1, edge, edge, edge, generator=torch.Generator().manual_seed(edge))
        mask = _mask(batch, edge // model.mask_cell, batch * 100 + edge)
        model.zero_grad(set_to_none=True)
        got = compiled(x, mask).loss
        got.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads, "the compiled backward reached no parameter"
        model.zero_grad(set_to_none=True)
        want = model(x, mask).loss
        want.backward()
        torch.testing.assert_close(got.detach(), want.detach())
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, msg=lambda s, n=n: f"{n}: {s}")
